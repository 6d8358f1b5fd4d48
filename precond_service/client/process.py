# Over 400 lines for a reason: every way a service process starts, is watched and stops.
"""Starts, supervises and stops `python -m precond_service` processes: the one way to do it.

(Over 400 lines: one job, a service process's life from start to stop, supervised or
not; the brief for issue 12 asks for it as one module.)

`start_service` starts one process (on a free port by default), waits for its port
and for SERVING on the standard health service, and returns a `ServiceProcess`
that can be stopped (SIGTERM, then SIGKILL after a timeout). Tests, benchmarks and
scripts use it for a service they control themselves.

`ServiceChild` (and `local_service`, its context manager) is a supervised child, as
a trainer runs its own service: while it is active a monitor thread restarts the
child on the same port whenever it exits (killed, out of memory, crashed), so the
client's channel reconnects by itself and re-pushes its statistics to the new
incarnation. Restarts back off exponentially while the child keeps dying soon after
it starts, up to one attempt every `max_restart_delay_s`; supervision never gives up
and never raises into the training loop. A child stopped by `stop` is never taken
for a crash.

Every child runs in its own session, so Ctrl-C in a terminal reaches only its parent,
which stops it; with `--parent_pid` it also shuts down if the parent dies without
stopping it. `cpus` pins the service and its workers to a list of CPUs. This module
imports no TensorFlow.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence

import precond_service
from precond_service.client.service_client import wait_for_serving
from precond_service.common.auth import TlsConfig
from precond_service.common.events import Event, EventLog

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"

# Runs in the child before it becomes the service: pins it (and so the workers it
# starts) to CPUS, then execs `python ARGS...` under the same pid.
_PIN_AND_EXEC = (
    "import os, sys; os.sched_setaffinity(0, {cpus!r}); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


# The CPUs this process may use (its affinity), taken before anything pins it: a
# trainer pinned to its own "device" cores still starts its service on the "host" cores.
CPUS_AT_START = frozenset(os.sched_getaffinity(0))


def parse_cpus(cpus: str) -> frozenset[int]:
    """The CPUs of a list like "1", "2-5" or "0,2"; "" is no pinning (an empty set).

    Raises:
        ValueError: `cpus` is not such a list, or names a CPU outside `CPUS_AT_START`
            (a CPU the machine has but taskset or a cpuset keeps this process off).
    """
    if not cpus.strip():
        return frozenset()
    allowed = CPUS_AT_START
    usage = (
        f"cpus={cpus!r} is not a CPU list: use e.g. '1', '2-5' or '0,2' of the CPUs this "
        f"process may use ({_format_cpus(allowed)}), or '' for no pinning"
    )
    chosen: set[int] = set()
    for part in cpus.split(","):
        bounds = part.strip().split("-")
        if len(bounds) > 2 or not all(b.isascii() and b.isdigit() for b in bounds):
            raise ValueError(usage)
        first, last = int(bounds[0]), int(bounds[-1])
        if last < first:
            raise ValueError(usage)
        chosen.update(range(first, last + 1))
    if not chosen <= allowed:
        raise ValueError(
            f"cpus={cpus!r} names CPUs {_format_cpus(chosen - allowed)} this process may not "
            f"use: choose among {_format_cpus(allowed)} (its CPU affinity, as taskset or a "
            "container's cpuset set it), or '' for no pinning"
        )
    return frozenset(chosen)


def _format_cpus(cpus: set[int] | frozenset[int]) -> str:
    return ",".join(str(cpu) for cpu in sorted(cpus))


def _child_environment() -> dict[str, str]:
    """This environment, with the checkout that holds `precond_service` importable."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(precond_service.__file__)))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path)


class ServiceProcess:
    """One running `python -m precond_service` process (see `start_service`).

    Attributes:
        process: The process.
        host: The host it was told to bind.
        port: Its port (0 until known for a process started on a free port).
        log_path: Where its stdout and stderr go; None when they are this process's.
    """

    def __init__(
        self, process: subprocess.Popen, host: str, port: int, log_path: str | None
    ) -> None:
        self.process = process
        self.host = host
        self.port = port
        self.log_path = log_path

    @property
    def address(self) -> str:
        """ "HOST:PORT" to connect to (loopback for a service bound to all interfaces)."""
        host = LOOPBACK if self.host in ("", "0.0.0.0", "::", "[::]") else self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        """Its exit status, or None while it runs."""
        return self.process.poll()

    def wait(self, timeout_s: float | None = None) -> int:
        """Waits for it to exit; returns its exit status (raises `TimeoutExpired`)."""
        return self.process.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILLs the service alone, as a crash would (its workers see it gone and exit)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self, timeout_s: float = 15.0) -> int:
        """Stops it: SIGTERM, then SIGKILL after `timeout_s`; idempotent.

        The service stops its workers itself (they run in sessions of their own);
        killed, it leaves them to exit when they see it gone.

        Returns:
            Its exit status: 0 after a graceful shutdown.
        """
        process = self.process
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            # A stopped (SIGSTOP) service would hold the SIGTERM until continued.
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGCONT)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("precond_service did not stop within %.0f s; killing it", timeout_s)
                process.kill()
                process.wait()
        return process.returncode

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def launch_service(
    flags: Sequence[str] = (),
    *,
    host: str = LOOPBACK,
    port: int = 0,
    log_path: str | os.PathLike | None = None,
    cpus: str = "",
    die_with_parent: bool = True,
) -> ServiceProcess:
    """Starts `python -m precond_service --host=HOST --port=PORT FLAGS` and returns at once.

    Args:
        flags: Further service flags, e.g. ["--workers=2", "--port_file=..."].
        host: Interface to bind.
        port: Port to bind; 0 picks a free one (its `port` stays 0: see `start_service`).
        log_path: File its stdout and stderr are appended to; None: this process's.
        cpus: CPU list ("1", "2-5", "0,2") the service and its workers are pinned to;
            "" for no pinning.
        die_with_parent: Pass `--parent_pid` so that it shuts down when this process ends.

    Raises:
        ValueError: A bad `cpus` list.
    """
    pinned = parse_cpus(cpus)
    command = [sys.executable]
    if pinned:
        command += ["-c", _PIN_AND_EXEC.format(cpus=set(pinned))]
    command += ["-m", "precond_service", f"--host={host}", f"--port={port}", *flags]
    if die_with_parent:
        command.append(f"--parent_pid={os.getpid()}")
    with contextlib.ExitStack() as stack:
        out = None if log_path is None else stack.enter_context(open(log_path, "ab"))
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=None if out is None else subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_child_environment(),
            start_new_session=True,
        )
    return ServiceProcess(process, host, port, None if log_path is None else os.fspath(log_path))


def start_service(
    flags: Sequence[str] = (),
    *,
    host: str = LOOPBACK,
    port: int = 0,
    log_path: str | os.PathLike | None = None,
    cpus: str = "",
    die_with_parent: bool = True,
    startup_timeout_s: float = 60.0,
    check_health: bool = True,
    tls: TlsConfig | None = None,
) -> ServiceProcess:
    """Starts a service (`launch_service`) and waits until it serves; the caller stops it.

    Args:
        flags, host, port, log_path, cpus, die_with_parent: As for `launch_service`.
        startup_timeout_s: How long it may take to write its port and report SERVING.
        check_health: Also wait for SERVING on the health service (the port is
            written once serving; skip the check where this host cannot make it).
        tls: TLS settings of the health check for a TLS service.

    Returns:
        The running service, its `port` known.

    Raises:
        ValueError: A bad `cpus` list.
        RuntimeError: It exited, or did not serve within `startup_timeout_s`; the
            message carries the end of its log.
    """
    scratch = tempfile.mkdtemp(prefix="precond_service_")
    port_file = os.path.join(scratch, "port")
    try:
        service = launch_service(
            [*flags, f"--port_file={port_file}"],
            host=host,
            port=port,
            log_path=log_path,
            cpus=cpus,
            die_with_parent=die_with_parent,
        )
        try:
            service.port = wait_for_port(
                service.process, port_file, startup_timeout_s, service.log_path
            )
            if check_health and not wait_for_serving(service.address, startup_timeout_s, tls):
                raise RuntimeError(
                    f"precond_service at {service.address} did not report SERVING within "
                    f"{startup_timeout_s:.0f} s" + _log_tail(service.log_path)
                )
        except BaseException:
            service.stop(timeout_s=5.0)
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return service


def wait_for_port(
    process: subprocess.Popen, port_file: str, timeout_s: float, log_path: str | None = None
) -> int:
    """Waits until `python -m precond_service --port_file=...` has written its port.

    Args:
        process: The service process.
        port_file: Its `--port_file`.
        timeout_s: How long to wait.
        log_path: The service's log, whose end goes into error messages.

    Returns:
        The port the service listens on.

    Raises:
        RuntimeError: The service exited first, or wrote nothing in time.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"precond_service exited with {describe_exit(process.returncode)} before "
                "serving" + _log_tail(log_path)
            )
        with contextlib.suppress(FileNotFoundError, ValueError):
            with open(port_file) as f:
                return int(f.read().strip())
        time.sleep(0.05)
    raise RuntimeError(
        f"precond_service did not report its port within {timeout_s:.0f} s" + _log_tail(log_path)
    )


def describe_exit(returncode: int) -> str:
    """ "status 1", or "status -9 (SIGKILL)" for a process ended by a signal."""
    if returncode >= 0:
        return f"status {returncode}"
    try:
        return f"status {returncode} ({signal.Signals(-returncode).name})"
    except ValueError:
        return f"status {returncode}"


def _log_tail(log_path: str | None, lines: int = 20) -> str:
    """ "; its log ends: ..." read now (the service may have written since), or ""."""
    if not log_path:
        return ""
    with contextlib.suppress(OSError), open(log_path, errors="replace") as f:
        return "; its log ends:\n" + "".join(f.readlines()[-lines:])
    return "; it left no log"


class ServiceChild:
    """A `python -m precond_service` child on loopback, restarted on its port if it dies.

    Usage:

        with ServiceChild(workers=2) as child:
            client = PreconditionerClient(child.address, run_id)
            ...
            child.restarts  # times the child was started again

    Args:
        workers: Worker processes of the service.
        extra_args: Further `python -m precond_service` flags (e.g. `--method=eigh`).
        startup_timeout_s: How long the first start may take to report SERVING.
        stop_timeout_s: How long the service gets to shut down before SIGKILL.
        restart_delay_s: Wait before restarting a child that exited.
        max_restart_delay_s: Longest wait between restarts: the wait doubles for each
            child that exits within `stable_after_s` of its start, up to this.
        stable_after_s: A child that ran this long before exiting resets the wait
            to `restart_delay_s`.
        cpus: CPU list ("1", "2-5", "0,2") every incarnation and its workers are
            pinned to; "" for no pinning.
        events: Gets CHILD_STARTED (pid, address) once the first child serves, and
            CHILD_RESTARTED (pid, address, restarts, exit_status: the exit status
            of the child that ended, delay_s: the wait before it) for each restart.

    Raises:
        ValueError: If a duration is out of range, or `cpus` is not a CPU list.
    """

    def __init__(
        self,
        workers: int = 1,
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 60.0,
        stop_timeout_s: float = 15.0,
        restart_delay_s: float = 0.5,
        max_restart_delay_s: float = 30.0,
        stable_after_s: float = 60.0,
        *,
        cpus: str = "",
        events: EventLog | None = None,
    ) -> None:
        for name, value in (
            ("startup_timeout_s", startup_timeout_s),
            ("stop_timeout_s", stop_timeout_s),
            ("restart_delay_s", restart_delay_s),
            ("stable_after_s", stable_after_s),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if max_restart_delay_s < restart_delay_s:
            raise ValueError(
                f"max_restart_delay_s must be >= restart_delay_s ({restart_delay_s}), "
                f"got {max_restart_delay_s}"
            )
        parse_cpus(cpus)
        self._flags = (f"--workers={workers}", *extra_args)
        self._cpus = cpus
        self._events = events or EventLog(None)
        self._startup_timeout_s = startup_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._restart_delay_s = restart_delay_s
        self._max_restart_delay_s = max_restart_delay_s
        self._stable_after_s = stable_after_s

        self._tmp: tempfile.TemporaryDirectory | None = None
        self._service: ServiceProcess | None = None
        self._started_at = 0.0
        self._restarts = 0
        self._stopping = threading.Event()
        # Held while a child is started: once `stop` has set `_stopping` and taken
        # it, no new child can appear behind its back.
        self._launching = threading.Lock()
        self._monitor: threading.Thread | None = None

    @property
    def address(self) -> str:
        """ "127.0.0.1:PORT", the same for every incarnation of the child."""
        if self._service is None:
            raise RuntimeError("the service child has not been started: call start() first")
        return self._service.address

    @property
    def pid(self) -> int | None:
        """Process id of the current child (None before `start`)."""
        service = self._service
        return None if service is None else service.pid

    @property
    def restarts(self) -> int:
        """Times the child was started again after it exited."""
        return self._restarts

    @property
    def log_path(self) -> str:
        """The child's log: stdout and stderr of every incarnation, appended."""
        if self._tmp is None:
            raise RuntimeError("the service child has not been started: call start() first")
        return os.path.join(self._tmp.name, "service.log")

    def start(self) -> str:
        """Starts the child, waits for SERVING, and starts watching it.

        Returns:
            The service address, "127.0.0.1:PORT".

        Raises:
            RuntimeError: It was started before, or the service exited or did not
                report SERVING in time; the message carries the end of its log.
        """
        if self._tmp is not None:
            raise RuntimeError("ServiceChild.start() called twice: create a new ServiceChild")
        self._tmp = tempfile.TemporaryDirectory(prefix="precond_service_")
        try:
            self._started_at = time.monotonic()
            self._service = start_service(
                self._flags,
                log_path=self.log_path,
                cpus=self._cpus,
                startup_timeout_s=self._startup_timeout_s,
            )
        except BaseException:
            self.stop()
            raise
        log.info("precond_service child (pid %d) serving at %s", self.pid, self.address)
        self._events.write(Event.CHILD_STARTED, pid=self.pid, address=self.address)
        self._monitor = threading.Thread(
            target=self._watch, name="precond-service-monitor", daemon=True
        )
        self._monitor.start()
        return self.address

    def stop(self) -> int | None:
        """Stops watching, then stops the child (SIGTERM, SIGKILL after the timeout); idempotent.

        Returns:
            The exit status of the last child (0 after a graceful shutdown); None if
            none was started.
        """
        self._stopping.set()
        with self._launching:
            service = self._service
        try:
            return None if service is None else service.stop(self._stop_timeout_s)
        finally:
            if self._monitor is not None:
                self._monitor.join(timeout=5.0)
            if self._tmp is not None:
                self._tmp.cleanup()

    def __enter__(self) -> ServiceChild:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _watch(self) -> None:
        """The monitor thread: restarts the child whenever it exits before `stop`."""
        quick_exits = 0
        while True:
            ended = self._service
            assert ended is not None
            # Polling rather than a blocking wait lets `stop` end this thread at once.
            while ended.poll() is None:
                if self._stopping.wait(0.1):
                    return
            if self._stopping.is_set():
                return
            lived = time.monotonic() - self._started_at
            quick_exits = quick_exits + 1 if lived < self._stable_after_s else 1
            delay = min(self._max_restart_delay_s, self._restart_delay_s * 2 ** (quick_exits - 1))
            status = describe_exit(ended.process.returncode)
            log.warning(
                "precond_service child (pid %d) at %s exited with %s after %.1f s; "
                "restarting it on the same port in %.1f s",
                ended.pid,
                self.address,
                status,
                lived,
                delay,
            )
            if self._stopping.wait(delay) or not self._restart(ended, delay):
                return

    def _restart(self, ended: ServiceProcess, delay_s: float) -> bool:
        """Starts the next incarnation on the same port; False once `stop` has begun."""
        with self._launching:
            if self._stopping.is_set():
                return False
            self._started_at = time.monotonic()
            try:
                with open(self.log_path, "ab") as log_file:
                    log_file.write(
                        f"--- restart {self._restarts + 1}: previous child exited with "
                        f"{describe_exit(ended.process.returncode)} ---\n".encode()
                    )
                self._service = launch_service(
                    self._flags, port=ended.port, log_path=self.log_path, cpus=self._cpus
                )
            except Exception:  # noqa: BLE001 - keep supervising; the next try may work.
                log.exception("could not restart precond_service; will try again")
                return True
            self._restarts += 1
        log.info(
            "precond_service child restarted (pid %d, restart %d) on %s",
            self.pid,
            self._restarts,
            self.address,
        )
        self._events.write(
            Event.CHILD_RESTARTED,
            pid=self.pid,
            address=self.address,
            restarts=self._restarts,
            exit_status=ended.process.returncode,
            delay_s=delay_s,
        )
        return True


@contextlib.contextmanager
def local_service(
    workers: int = 1,
    extra_args: Sequence[str] = (),
    startup_timeout_s: float = 60.0,
    stop_timeout_s: float = 15.0,
    *,
    cpus: str = "",
    events: EventLog | None = None,
) -> Iterator[str]:
    """Runs a supervised service child (`ServiceChild`) for the duration of the block.

    Args:
        workers: Worker processes of the service.
        extra_args: Further `python -m precond_service` flags (e.g. `--method=eigh`).
        startup_timeout_s: How long to wait for SERVING.
        stop_timeout_s: How long the service gets to shut down before SIGKILL.
        cpus: CPU list the service and its workers are pinned to; "" for none.
        events: Gets the child's CHILD_STARTED and CHILD_RESTARTED events.

    Yields:
        The service address, "127.0.0.1:PORT"; it stays the same across restarts.

    Raises:
        ValueError: `cpus` is not a CPU list.
        RuntimeError: The service exited or did not report SERVING in time; the
            message carries the end of its log.
    """
    with ServiceChild(
        workers=workers,
        extra_args=extra_args,
        startup_timeout_s=startup_timeout_s,
        stop_timeout_s=stop_timeout_s,
        cpus=cpus,
        events=events,
    ) as child:
        yield child.address
