"""Starts the preconditioner service as a child process on a free loopback port.

This is the default shape of a job: the trainer starts `python -m precond_service`,
waits until its health service reports SERVING, uses it, and stops it (SIGTERM,
then SIGKILL if it does not exit) when the `with` block ends, also on errors and
Ctrl-C.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence

from precond_service.client import wait_for_serving

log = logging.getLogger(__name__)


@contextlib.contextmanager
def local_service(
    workers: int = 1,
    extra_args: Sequence[str] = (),
    startup_timeout_s: float = 60.0,
    stop_timeout_s: float = 15.0,
) -> Iterator[str]:
    """Runs the service as a child process for the duration of the block.

    Args:
        workers: Worker processes of the service.
        extra_args: Further `python -m precond_service` flags (e.g. `--method=eigh`).
        startup_timeout_s: How long to wait for SERVING.
        stop_timeout_s: How long the service gets to shut down before SIGKILL.

    Yields:
        The service address, "127.0.0.1:PORT".

    Raises:
        RuntimeError: The service exited or did not report SERVING in time; the
            message carries the end of its log.
    """
    with tempfile.TemporaryDirectory(prefix="precond_service_") as tmp:
        port_file = os.path.join(tmp, "port")
        log_path = os.path.join(tmp, "service.log")
        command = [
            sys.executable,
            "-m",
            "precond_service",
            "--host=127.0.0.1",
            "--port=0",
            f"--port_file={port_file}",
            f"--workers={workers}",
            *extra_args,
        ]
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            address = f"127.0.0.1:{wait_for_port(process, port_file, startup_timeout_s, log_path)}"
            if not wait_for_serving(address, startup_timeout_s):
                raise RuntimeError(
                    f"precond_service at {address} did not report SERVING within "
                    f"{startup_timeout_s:.0f} s; its log ends:\n{_tail(log_path)}"
                )
            log.info("precond_service child (pid %d) serving at %s", process.pid, address)
            yield address
        finally:
            _stop(process, stop_timeout_s)


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


def _log_tail(log_path: str | None) -> str:
    """ "; its log ends: ..." read now (the service may have written since), or ""."""
    return f"; its log ends:\n{_tail(log_path)}" if log_path else ""


def _stop(process: subprocess.Popen, timeout_s: float) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
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
