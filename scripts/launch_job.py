"""Starts the two halves of an asynchronous-Shampoo job explicitly.

By default `python -m trainer` starts its preconditioner service itself. For a
service on another (CPU) host, start each half on its host:

    # on the CPU host (a non-loopback address needs TLS, or --insecure for plaintext):
    python -m scripts.launch_job service --host=0.0.0.0 --port=50051 --workers=16 \\
        --tls_cert=server.pem --tls_key=server.key --token_file=secret \\
        --address_file=/shared/job1.address

    # on the accelerator host:
    python -m scripts.launch_job trainer --address_file=/shared/job1.address \\
        --tls_ca=ca.pem --token_file=secret \\
        -- --config=configs/wmt14_en_fr.py:big_shampoo --workdir=runs/big

The service half runs in its own session and shuts down if this script dies; `--cpus`
pins it and its workers to a CPU list (`1`, `2-5`, `0,2`).

`trainer` waits until the service reports SERVING, then runs `python -m trainer`
with `--config.precond.address` (and the token and TLS files) set. The service's
certificate must name the host written to the address file (`--advertise_host`, else
this host's fully qualified name when binding all interfaces). `local` does both on
this host as two processes, which is what the default does, made explicit:

    python -m scripts.launch_job local --workers=2 -- --config=configs/quickstart.py \\
        --workdir=/tmp/quickstart
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from precond_service.client.process import local_service, parse_cpus, start_service
from precond_service.client.service_client import wait_for_serving
from precond_service.common.auth import TlsConfig


def _service(args: argparse.Namespace) -> int:
    flags = [f"--workers={args.workers}"]
    if args.token_file:
        flags.append(f"--token_file={args.token_file}")
    for flag in ("tls_cert", "tls_key", "tls_client_ca"):
        if getattr(args, flag):
            flags.append(f"--{flag}={getattr(args, flag)}")
    if args.insecure:
        flags.append("--insecure")
    service = None
    try:
        service = start_service(
            flags + args.service_flags,
            host=args.host,
            port=args.port,
            cpus=args.cpus,
            startup_timeout_s=args.startup_timeout_s,
            # Its port file is written once it serves; a TLS health check would need
            # the CA of its certificate, which this host need not have.
            check_health=not args.tls_cert,
        )
        if args.address_file:
            address = _publish_address(args, service.port)
            print(f"precond_service serving at {address} (written to {args.address_file})")
        return service.wait()
    except RuntimeError as e:  # It never served: say why (nothing is left).
        raise SystemExit(str(e)) from None
    except KeyboardInterrupt:
        return 130 if service is None else service.stop()
    finally:
        if service is not None:
            service.stop()


def _publish_address(args: argparse.Namespace, port: int) -> str:
    """Writes "HOST:PORT" that other hosts can reach into --address_file."""
    host = args.advertise_host or (
        socket.getfqdn() if args.host in ("0.0.0.0", "::", "[::]") else args.host
    )
    address = f"{host}:{port}"
    tmp = args.address_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(address + "\n")
    os.replace(tmp, args.address_file)
    return address


def _resolve_address(args: argparse.Namespace) -> str:
    if args.address:
        return args.address
    deadline = time.monotonic() + args.startup_timeout_s
    while time.monotonic() < deadline:
        if os.path.exists(args.address_file):
            address = Path(args.address_file).read_text().strip()
            if address:
                return address
        time.sleep(0.5)
    raise SystemExit(f"no address appeared in {args.address_file} in {args.startup_timeout_s} s")


def _run_trainer(address: str, args: argparse.Namespace) -> int:
    command = [
        sys.executable,
        "-m",
        "trainer",
        *args.trainer_args,
        f"--config.precond.address={address}",
    ]
    if args.token_file:
        command.append(f"--config.precond.token_file={args.token_file}")
    for flag in ("tls_ca", "tls_cert", "tls_key"):
        if getattr(args, flag, ""):
            command.append(f"--config.precond.{flag}_file={getattr(args, flag)}")
    return subprocess.call(command)


def _trainer(args: argparse.Namespace) -> int:
    if (args.tls_cert or args.tls_key) and not args.tls_ca:
        raise SystemExit(
            "--tls_cert and --tls_key need --tls_ca (the CA of the service's certificate)"
        )
    try:
        tls = TlsConfig(args.tls_ca, args.tls_cert, args.tls_key) if args.tls_ca else None
    except ValueError as e:
        raise SystemExit(str(e)) from None
    address = _resolve_address(args)
    if not wait_for_serving(address, args.startup_timeout_s, tls=tls):
        raise SystemExit(f"the service at {address} did not report SERVING")
    print(f"service at {address} is SERVING; starting the trainer", flush=True)
    return _run_trainer(address, args)


def _local(args: argparse.Namespace) -> int:
    extra = list(args.service_flags)
    if args.token_file:
        extra.append(f"--token_file={args.token_file}")
    with local_service(workers=args.workers, extra_args=extra, cpus=args.cpus) as address:
        print(f"service at {address} is SERVING; starting the trainer", flush=True)
        return _run_trainer(address, args)


def _cpu_list(value: str) -> str:
    """--cpus as given, once `parse_cpus` accepts it."""
    try:
        parse_cpus(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def main(argv: list[str] | None = None) -> int:
    # SIGINT stops both halves cleanly, even where the shell started this process with
    # SIGINT ignored (a background job of a script), where Python leaves it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="half", required=True)

    service = sub.add_parser("service", help="run the preconditioner service on this host")
    service.add_argument("--host", default="127.0.0.1", help="address to bind")
    service.add_argument("--port", type=int, default=50051, help="port; 0 picks a free one")
    service.add_argument("--advertise_host", default="", help="host name written for trainers")
    service.add_argument("--address_file", default="", help="file to write HOST:PORT into")
    service.add_argument("--tls_cert", default="", help="PEM certificate chain: serve over TLS")
    service.add_argument("--tls_key", default="", help="PEM private key of --tls_cert")
    service.add_argument(
        "--tls_client_ca", default="", help="PEM CA bundle: trainers must present a certificate"
    )
    service.add_argument(
        "--insecure", action="store_true", help="plaintext on a host other than loopback"
    )

    trainer = sub.add_parser("trainer", help="run the trainer against a running service")
    where = trainer.add_mutually_exclusive_group(required=True)
    where.add_argument("--address", default="", help="HOST:PORT of the service")
    where.add_argument("--address_file", default="", help="file the service half wrote")
    trainer.add_argument("--tls_ca", default="", help="PEM CA of the service's certificate")
    trainer.add_argument("--tls_cert", default="", help="PEM certificate of the trainer")
    trainer.add_argument("--tls_key", default="", help="PEM private key of --tls_cert")

    local = sub.add_parser("local", help="run both halves on this host")
    for p in (service, trainer, local):
        p.add_argument("--token_file", default="", help="shared token file")
        p.add_argument("--startup_timeout_s", type=float, default=300.0)
    for p in (service, local):
        p.add_argument("--workers", type=int, default=1, help="service worker processes")
        p.add_argument(
            "--cpus",
            default="",
            type=_cpu_list,
            help="CPU list ('1', '2-5', '0,2') the service and its workers are pinned to",
        )
        p.add_argument(
            "--service_flag",
            dest="service_flags",
            action="append",
            default=[],
            help="further python -m precond_service flag (repeatable)",
        )
    for p in (trainer, local):
        p.add_argument("trainer_args", nargs="+", help="python -m trainer flags, after --")

    args = parser.parse_args(argv)
    return {"service": _service, "trainer": _trainer, "local": _local}[args.half](args)


if __name__ == "__main__":
    sys.exit(main())
