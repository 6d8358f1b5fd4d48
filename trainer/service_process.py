"""Starts the preconditioner service as a supervised child process on a loopback port.

This is the default shape of a job: the trainer starts `python -m precond_service`,
waits until its health service reports SERVING, uses it, and stops it (SIGTERM,
then SIGKILL if it does not exit) when the `with` block ends, also on errors and
Ctrl-C.

While the block is active a monitor thread watches the child. If it exits (killed,
out of memory, crashed) it is started again on the same port, so the client's
channel reconnects by itself and re-pushes its statistics to the new incarnation.
Restarts back off exponentially while the child keeps dying soon after it starts,
up to one attempt every `max_restart_delay_s`; supervision never gives up and never
raises into the training loop. Training goes on with the roots it holds meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence

from precond_service.client import wait_for_serving

log = logging.getLogger(__name__)


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

    Raises:
        ValueError: If a duration is out of range.
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
        self._workers = workers
        self._extra_args = tuple(extra_args)
        self._startup_timeout_s = startup_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._restart_delay_s = restart_delay_s
        self._max_restart_delay_s = max_restart_delay_s
        self._stable_after_s = stable_after_s

        self._tmp: tempfile.TemporaryDirectory | None = None
        self._process: subprocess.Popen | None = None
        self._started_at = 0.0
        self._port: int | None = None
        self._restarts = 0
        self._stopping = threading.Event()
        # Held while a child is started: once `stop` has set `_stopping` and taken
        # it, no new child can appear behind its back.
        self._launching = threading.Lock()
        self._monitor: threading.Thread | None = None

    @property
    def address(self) -> str:
        """ "127.0.0.1:PORT", the same for every incarnation of the child."""
        if self._port is None:
            raise RuntimeError("the service child has not been started: call start() first")
        return f"127.0.0.1:{self._port}"

    @property
    def pid(self) -> int | None:
        """Process id of the current child (None before `start`)."""
        process = self._process
        return None if process is None else process.pid

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
            port_file = os.path.join(self._tmp.name, "port")
            process = self._launch(["--port=0", f"--port_file={port_file}"], append=False)
            self._port = wait_for_port(process, port_file, self._startup_timeout_s, self.log_path)
            if not wait_for_serving(self.address, self._startup_timeout_s):
                raise RuntimeError(
                    f"precond_service at {self.address} did not report SERVING within "
                    f"{self._startup_timeout_s:.0f} s; its log ends:\n{_tail(self.log_path)}"
                )
        except BaseException:
            self.stop()
            raise
        log.info("precond_service child (pid %d) serving at %s", process.pid, self.address)
        self._monitor = threading.Thread(
            target=self._watch, name="precond-service-monitor", daemon=True
        )
        self._monitor.start()
        return self.address

    def stop(self) -> None:
        """Stops watching, then stops the child (SIGTERM, SIGKILL after the timeout); idempotent."""
        self._stopping.set()
        with self._launching:
            process = self._process
        try:
            if process is not None:
                _stop(process, self._stop_timeout_s)
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

    def _launch(self, port_args: list[str], append: bool) -> subprocess.Popen:
        """Starts one incarnation of the service with its output going to the log."""
        command = [
            sys.executable,
            "-m",
            "precond_service",
            "--host=127.0.0.1",
            *port_args,
            f"--workers={self._workers}",
            # Exits by itself if this process dies without stopping it (SIGKILL).
            f"--parent_pid={os.getpid()}",
            *self._extra_args,
        ]
        self._started_at = time.monotonic()
        with open(self.log_path, "ab" if append else "wb") as log_file:
            self._process = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        return self._process

    def _watch(self) -> None:
        """The monitor thread: restarts the child whenever it exits before `stop`."""
        quick_exits = 0
        while True:
            process = self._process
            assert process is not None
            # Polling rather than a blocking wait lets `stop` end this thread at once.
            while process.poll() is None:
                if self._stopping.wait(0.1):
                    return
            if self._stopping.is_set():
                return
            lived = time.monotonic() - self._started_at
            quick_exits = quick_exits + 1 if lived < self._stable_after_s else 1
            delay = min(self._max_restart_delay_s, self._restart_delay_s * 2 ** (quick_exits - 1))
            status = _describe_exit(process.returncode)
            log.warning(
                "precond_service child (pid %d) at %s exited with %s after %.1f s; "
                "restarting it on the same port in %.1f s",
                process.pid,
                self.address,
                status,
                lived,
                delay,
            )
            if self._stopping.wait(delay):
                return
            with self._launching:
                if self._stopping.is_set():
                    return
                try:
                    with open(self.log_path, "ab") as log_file:
                        log_file.write(
                            f"--- restart {self._restarts + 1}: previous child exited with "
                            f"{status} ---\n".encode()
                        )
                    new = self._launch([f"--port={self._port}"], append=True)
                except Exception:  # noqa: BLE001 - keep supervising; the next try may work.
                    log.exception("could not restart precond_service; will try again")
                    self._started_at = time.monotonic()
                    continue
                self._restarts += 1
            log.info(
                "precond_service child restarted (pid %d, restart %d) on %s",
                new.pid,
                self._restarts,
                self.address,
            )


@contextlib.contextmanager
def local_service(
    workers: int = 1,
    extra_args: Sequence[str] = (),
    startup_timeout_s: float = 60.0,
    stop_timeout_s: float = 15.0,
) -> Iterator[str]:
    """Runs a supervised service child (`ServiceChild`) for the duration of the block.

    Args:
        workers: Worker processes of the service.
        extra_args: Further `python -m precond_service` flags (e.g. `--method=eigh`).
        startup_timeout_s: How long to wait for SERVING.
        stop_timeout_s: How long the service gets to shut down before SIGKILL.

    Yields:
        The service address, "127.0.0.1:PORT"; it stays the same across restarts.

    Raises:
        RuntimeError: The service exited or did not report SERVING in time; the
            message carries the end of its log.
    """
    with ServiceChild(
        workers=workers,
        extra_args=extra_args,
        startup_timeout_s=startup_timeout_s,
        stop_timeout_s=stop_timeout_s,
    ) as child:
        yield child.address


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
                f"precond_service exited with status {process.returncode} before serving"
                + _log_tail(log_path)
            )
        with contextlib.suppress(FileNotFoundError, ValueError):
            with open(port_file) as f:
                return int(f.read().strip())
        time.sleep(0.05)
    raise RuntimeError(
        f"precond_service did not report its port within {timeout_s:.0f} s" + _log_tail(log_path)
    )


def _describe_exit(returncode: int) -> str:
    """ "status 1", or "status -9 (SIGKILL)" for a child ended by a signal."""
    if returncode >= 0:
        return f"status {returncode}"
    try:
        return f"status {returncode} ({signal.Signals(-returncode).name})"
    except ValueError:
        return f"status {returncode}"


def _log_tail(log_path: str | None) -> str:
    """ "; its log ends: ..." read now (the service may have written since), or ""."""
    return f"; its log ends:\n{_tail(log_path)}" if log_path else ""


def _stop(process: subprocess.Popen, timeout_s: float) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    # A stopped (SIGSTOP) child would hold the SIGTERM until someone continued it.
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGCONT)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("precond_service did not stop within %.0f s; killing it", timeout_s)
        process.kill()
        process.wait()


def _tail(path: str, lines: int = 20) -> str:
    with contextlib.suppress(OSError), open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])
    return "(no log)"
