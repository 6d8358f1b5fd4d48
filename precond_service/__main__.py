"""Runs the preconditioner service: `python -m precond_service --port=PORT --workers=W`.

Binds loopback by default and logs one line `precond_service listening on HOST:PORT`
once it reports SERVING; `--port=0` picks a free port, and `--port_file=PATH` writes
it there at that moment so a parent process can find it. SIGTERM or SIGINT shut it
down gracefully (health NOT_SERVING, in-flight RPCs finish, workers stop) and it
exits 0. Only NumPy, gRPC and protobuf are needed: no TensorFlow.

`--tls_cert` and `--tls_key` serve over TLS; `--tls_client_ca` also requires every
client to present a certificate signed by that CA. A host other than loopback is
refused without TLS unless `--insecure` says that plaintext is meant.

The `--max_*` flags bound what the service holds and what one request may cost; see
`ServiceConfig`. With glibc, buffers of 4 MiB or more are returned to the system as
soon as they are freed (`_release_large_buffers`), and freed smaller ones every second
(`_trim_freed_memory`).
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import logging
import os
import pathlib
import signal
import sys
import threading

import grpc

from precond_service.common.auth import TOKEN_ENV, read_pem, read_token, server_credentials
from precond_service.common.events import EventLog
from precond_service.common.roots import METHODS, RIDGE_MODES
from precond_service.server.server import RunningServer, serve
from precond_service.server.service_records import ServiceConfig

logger = logging.getLogger("precond_service")


# Help of each ServiceConfig field; each is the flag of the same name.
_CONFIG_FLAGS = {
    "workers": "worker processes",
    "method": "root solver, where a statistic does not name one",
    "ridge_epsilon": "ridge added to each statistic, relative to its largest eigenvalue, where "
    "a statistic does not carry its own",
    "ridge_mode": "'relative' (epsilon * largest eigenvalue, always) or 'absolute_if_needed' "
    "(epsilon, only when the smallest eigenvalue is below it), where a statistic does not say",
    "failure_threshold": "largest solver error of a root that is published, where a statistic "
    "does not carry its own",
    "max_iterations": "most Schur-Newton iterations",
    "max_matrix_size": "largest matrix side accepted; sets the gRPC message size limit",
    "max_blocks": "most (run, key) blocks held over all runs",
    "max_blocks_per_run": "most keys held for one run; a new key beyond it is rejected",
    "max_runs": "most runs held; a block of a new run beyond it is rejected",
    "max_blocks_per_request": "most blocks in one push, and most known_steps entries in one "
    "pull (>= --max_blocks_per_run)",
    "max_run_id_length": "most characters of a run_id",
    "threads_per_worker": "BLAS threads in each worker",
    "job_timeout_s": "fail a root taking longer and replace its worker; 0: no limit",
    "max_streams": "most pushes and pulls open at once (health, status, DropRun not counted)",
    "max_streams_per_peer": "most pushes and pulls open at once on one connection",
    "stream_idle_timeout_s": "close a push whose next message does not arrive, or a pull "
    "whose next message is not taken, within this",
    "stream_timeout_s": "close a push or pull open longer than this",
    "run_ttl_s": "drop a run with no push or pull for this long",
    "memory_budget_mb": "most MiB held for clients (push messages being received and validated, "
    "pending and computing statistics, published roots); a push beyond it gets "
    "RESOURCE_EXHAUSTED",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line.

    Args:
        argv: Arguments without the program name; None means sys.argv[1:].

    Returns:
        The parsed arguments.
    """
    parser = argparse.ArgumentParser(
        prog="python -m precond_service",
        description="Computes Shampoo inverse roots for trainers over gRPC.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (loopback)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one")
    parser.add_argument("--port_file", help="write the bound port here once serving")
    defaults = ServiceConfig()
    for name, help_text in _CONFIG_FLAGS.items():
        default = getattr(defaults, name)
        parser.add_argument(
            f"--{name}",
            type=type(default),
            default=default,
            choices={"method": METHODS, "ridge_mode": RIDGE_MODES}.get(name),
            help=help_text,
        )
    _add_security_flags(parser)
    parser.add_argument(
        "--grace_s", type=float, default=5.0, help="seconds in-flight RPCs get at shutdown"
    )
    parser.add_argument(
        "--parent_pid",
        type=int,
        default=0,
        help="shut down when this process ends (a trainer's own service child); 0: never",
    )
    parser.add_argument(
        "--events_file",
        help="append the service's events here as JSON lines (precond_service.common.events)",
    )
    parser.add_argument("--log_level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    return parser.parse_args(argv)


def _add_security_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token_file",
        help=f"file holding a shared secret clients must send (or set ${TOKEN_ENV})",
    )
    parser.add_argument("--tls_cert", help="PEM certificate chain of the service: serve over TLS")
    parser.add_argument("--tls_key", help="PEM private key of --tls_cert")
    parser.add_argument(
        "--tls_client_ca", help="PEM CA bundle: clients must present a certificate it signed"
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow plaintext on a host other than loopback (refused by default)",
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tls_credentials(args: argparse.Namespace) -> grpc.ServerCredentials | None:
    """Server credentials from the --tls_* flags; None without them.

    Raises:
        ValueError: The flags do not go together, or a file cannot be read.
    """
    if bool(args.tls_cert) != bool(args.tls_key):
        given, missing = (
            ("--tls_cert", "--tls_key") if args.tls_cert else ("--tls_key", "--tls_cert")
        )
        raise ValueError(f"{given} needs {missing} too: pass both, or neither for plaintext")
    if args.tls_client_ca and not args.tls_cert:
        raise ValueError("--tls_client_ca needs --tls_cert and --tls_key (it is a TLS setting)")
    if not args.tls_cert:
        return None
    return server_credentials(
        read_pem(args.tls_cert, "--tls_cert"),
        read_pem(args.tls_key, "--tls_key"),
        read_pem(args.tls_client_ca, "--tls_client_ca") if args.tls_client_ca else None,
    )


# glibc's mallopt parameters: the size from which allocations get their own mapping,
# and the most arenas (heaps shared by threads).
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

# Allocations this large or larger are unmapped when freed.
_MMAP_THRESHOLD_BYTES = 4 << 20


def _release_large_buffers() -> None:
    """Makes glibc return freed buffers of 4 MiB or more to the system at once.

    By default glibc raises that threshold to the largest buffer freed so far (up to
    32 MiB), after which such buffers come from per-thread arenas that keep them: a
    few large requests (statistics, or hostile ones that are refused) would leave
    hundreds of MiB resident for good. A fixed threshold keeps resident memory near
    what the service holds, at the cost of fresh pages for each large message.

    The heap also gets one arena for all threads: gRPC receives a message in many
    small buffers on whichever thread polls, and with an arena per thread what one
    thread freed cannot be reused by another, so a burst of concurrent pushes peaked
    at about twice what the service held (measured: 0.5-0.9 GiB against a 512 MiB
    budget, 0.44-0.48 GiB with one arena). The service's computation runs in its
    worker processes, so the lock the threads then share costs little.

    An explicit MALLOC_MMAP_THRESHOLD_ or MALLOC_ARENA_MAX in the environment wins;
    without glibc this does nothing.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    if "MALLOC_ARENA_MAX" not in os.environ:
        mallopt(_M_ARENA_MAX, 1)


# Seconds between returns of freed heap memory to the system (`_trim_freed_memory`).
_TRIM_PERIOD_S = 1.0


def _trim_freed_memory(stop: threading.Event) -> None:
    """Returns freed heap pages to the system every `_TRIM_PERIOD_S` until `stop` is set.

    gRPC receives a message in many small buffers, below the mmap threshold, so a
    burst of large requests leaves their freed pages in glibc's arenas, resident
    for good; `malloc_trim(0)` gives them back. Without glibc this does nothing.
    """
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    while not stop.wait(_TRIM_PERIOD_S):
        malloc_trim(0)


def _write_port_file(path: str, port: int) -> None:
    """Writes the port atomically, so a reader never sees a partial file."""
    target = pathlib.Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temporary.write_text(f"{port}\n")
    temporary.replace(target)


def main(argv: list[str] | None = None) -> int:
    """Runs the service until SIGTERM or SIGINT.

    Args:
        argv: Arguments without the program name; None means sys.argv[1:].

    Returns:
        The exit status: 0 after a graceful shutdown, 1 if it could not start.
    """
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = ServiceConfig(**{name: getattr(args, name) for name in _CONFIG_FLAGS})
        token = read_token(args.token_file)
        credentials = _tls_credentials(args)
    except (ValueError, OSError) as e:
        logger.error("%s", e)
        return 1
    if not _exposure_allowed(args, token, credentials):
        return 1

    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        logger.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    _release_large_buffers()
    with EventLog(args.events_file) as events:
        try:
            running = serve(
                config,
                host=args.host,
                port=args.port,
                token=token,
                credentials=credentials,
                events=events,
            )
        except RuntimeError as e:
            logger.error("could not start: %s", e)
            return 1
        trimmer_stop = threading.Event()
        threading.Thread(
            target=_trim_freed_memory, args=(trimmer_stop,), name="malloc-trim", daemon=True
        ).start()
        try:
            _serve_until_stopped(running, stop, args)
        finally:
            trimmer_stop.set()
    return 0


def _exposure_allowed(
    args: argparse.Namespace, token: str | None, credentials: grpc.ServerCredentials | None
) -> bool:
    """Refuses plaintext on a non-loopback host without --insecure; warns of other risks."""
    if args.tls_client_ca:
        logger.info("clients must present a TLS certificate signed by %s", args.tls_client_ca)
    if _is_loopback(args.host):
        return True
    if credentials is None and not args.insecure:
        logger.error(
            "refusing to listen on %s without TLS: pass --tls_cert/--tls_key, or "
            "--insecure to serve plaintext on purpose (e.g. on a private network)",
            args.host,
        )
        return False
    if credentials is None:
        logger.warning(
            "listening on %s without TLS (--insecure): anyone on the network can read "
            "the traffic%s",
            args.host,
            ", the token included" if token else "",
        )
    if not token and not args.tls_client_ca:
        logger.warning(
            "listening on %s without a token: anyone who reaches this port can use the "
            "service; pass --token_file (or set $%s)",
            args.host,
            TOKEN_ENV,
        )
    return True


def _serve_until_stopped(
    running: RunningServer, stop: threading.Event, args: argparse.Namespace
) -> None:
    """Writes the port file, waits for `stop` (or the parent's end), shuts down."""
    try:
        if args.port_file:
            _write_port_file(args.port_file, running.port)
        while not stop.wait(0.5):
            if args.parent_pid and os.getppid() != args.parent_pid:
                # Our parent died (a trainer killed with SIGKILL, say): we were
                # reparented. Nobody is left to use or stop us.
                logger.warning("parent process %d has ended: shutting down", args.parent_pid)
                break
    finally:
        running.stop(args.grace_s)


if __name__ == "__main__":
    sys.exit(main())
