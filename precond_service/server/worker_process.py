"""One worker process as the pool sees it: start it, share its matrix buffer, stop it.

Each worker is a fresh interpreter (`python -m precond_service.worker`), started
with `subprocess` rather than `multiprocessing`: that gives each one an exact
environment (BLAS limited to `threads_per_worker` threads *before* NumPy is
imported, so W workers use W cores), never forks a process that runs gRPC threads,
and never re-imports the parent's `__main__` (a trainer's, with TensorFlow).

Its matrices cross through one shared memory file (`memfd`, or an unlinked
temporary file where there is none), grown to the matrix at hand. A buffer larger
than `_KEPT_BUFFER_BYTES` is given back once its root has been read, so a burst of
large statistics leaves no resident shared memory behind. Nothing has a name, so
nothing leaks when a process dies.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing import connection

import numpy as np

from precond_service.server.scheduler import Job

# Variables that cap the threads of the BLAS/OpenMP libraries NumPy may use.
_THREAD_VARIABLES = (
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "BLIS_NUM_THREADS",
)

# The directory that holds the `precond_service` package, for the workers' path.
_PACKAGE_ROOT = str(pathlib.Path(__file__).resolve().parents[2])

# The largest buffer kept between jobs: a 1024 x 1024 float64 matrix. Reusing it
# saves page faults on every job of the common block sizes; a larger one costs a
# negligible fraction of its root's computation to set up again.
_KEPT_BUFFER_BYTES = 1024 * 1024 * 8


@dataclasses.dataclass(eq=False)
class WorkerProcess:
    """One worker process, its connection and buffer, and the job it computes.

    Touched only by the pool's dispatcher thread.
    """

    process: subprocess.Popen
    conn: connection.Connection
    buffer_fd: int
    buffer: mmap.mmap | None = None
    ready: bool = False
    job: Job | None = None
    job_id: int = 0
    job_started: float = 0.0

    @classmethod
    def spawn(cls, threads_per_worker: int) -> WorkerProcess:
        """Starts a worker process with `threads_per_worker` BLAS threads.

        Raises:
            OSError: If the process cannot be started.
        """
        parent_socket, child_socket = socket.socketpair()
        buffer_fd = _create_buffer_fd()
        env = dict(os.environ)
        env.update({name: str(threads_per_worker) for name in _THREAD_VARIABLES})
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        try:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "precond_service.worker",
                    f"--conn_fd={child_socket.fileno()}",
                    f"--buffer_fd={buffer_fd}",
                ],
                pass_fds=(child_socket.fileno(), buffer_fd),
                env=env,
                stdin=subprocess.DEVNULL,
                # Its own session: Ctrl-C or a process-group SIGTERM meant for the
                # service does not reach the workers; the service stops them itself.
                start_new_session=True,
            )
        except OSError:
            parent_socket.close()
            os.close(buffer_fd)
            raise
        finally:
            child_socket.close()
        return cls(process, connection.Connection(parent_socket.detach()), buffer_fd)

    def write_statistic(self, matrix: np.ndarray) -> None:
        """Writes an n x n statistic into the buffer as float64, growing it if needed."""
        n = matrix.shape[0]
        nbytes = n * n * 8
        if self.buffer is None or len(self.buffer) < nbytes:
            if self.buffer is not None:
                self.buffer.close()
            os.ftruncate(self.buffer_fd, nbytes)
            self.buffer = mmap.mmap(self.buffer_fd, nbytes)
        view = np.frombuffer(self.buffer, dtype="<f8", count=n * n).reshape(n, n)
        np.copyto(view, matrix)

    def read_root(self, n: int) -> np.ndarray:
        """A copy of the n x n float64 root the worker wrote into the buffer."""
        return np.frombuffer(self.buffer[: n * n * 8], dtype="<f8").reshape(n, n)

    def release_large_buffer(self) -> None:
        """Gives the buffer's pages back if it is larger than the one kept between jobs.

        The worker's own mapping stays valid: it maps the file again, or the same
        offsets of the regrown file, at its next job.
        """
        if self.buffer is not None and len(self.buffer) > _KEPT_BUFFER_BYTES:
            self.buffer.close()
            self.buffer = None
            os.ftruncate(self.buffer_fd, 0)

    def close(self) -> None:
        """Closes the connection and the buffer (the process is stopped by the caller)."""
        if not self.conn.closed:
            self.conn.close()
        if self.buffer is not None:
            self.buffer.close()
            self.buffer = None
        if self.buffer_fd >= 0:
            os.close(self.buffer_fd)
            self.buffer_fd = -1


def stop_workers(workers: list[WorkerProcess], timeout_s: float) -> None:
    """Stops worker processes: idle ones on EOF, busy ones by SIGTERM, late ones by SIGKILL."""
    for worker in workers:
        worker.conn.close()  # An idle worker exits on EOF.
        if worker.job is not None:
            worker.process.terminate()  # A busy one would finish its job first.
    deadline = time.monotonic() + timeout_s
    for worker in workers:
        try:
            worker.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()
        worker.close()


def _create_buffer_fd() -> int:
    """Returns a file descriptor of an empty anonymous shared memory file."""
    if hasattr(os, "memfd_create"):
        try:
            return os.memfd_create("precond-worker")
        except OSError:
            pass
    with tempfile.TemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as f:
        return os.dup(f.fileno())
