"""One worker process of the pool: computes inverse roots in float64 with `roots`.

`pool.py` starts it as `python -m precond_service.worker --conn_fd=N --buffer_fd=M`
with the BLAS thread variables already in its environment, so NumPy reads them at
import. It talks to the pool over a socket with `multiprocessing.connection`
framing, in the small records of `worker_protocol`; matrices never go through the
socket but through a shared memory file (`--buffer_fd`) that the pool grows as
needed.

The worker exits when the pool closes the socket (also when the service dies). It
runs in a session of its own, so signals meant for the service do not reach it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import mmap
import os
import time
from multiprocessing import connection

import numpy as np

from precond_service.common import eigenbasis
from precond_service.worker.protocol import Compute, Done, Ready, RootOutcome, SolverOptions


def solve(
    matrix: np.ndarray, exponent: int, options: SolverOptions
) -> tuple[np.ndarray | None, RootOutcome]:
    """Computes one inverse root and says whether it may be published.

    Args:
        matrix: Square float64 statistic.
        exponent: p of the inverse p-th root.
        options: How to compute it.

    Returns:
        (root or None, outcome); `outcome.ok` when it converged with a finite error.
    """
    start = time.perf_counter()
    try:
        solved = eigenbasis.compute(matrix, exponent, **dataclasses.asdict(options))
    except (ValueError, ArithmeticError) as e:
        return None, RootOutcome(
            ok=False,
            reason=f"solver raised {type(e).__name__}: {e}",
            method=options.method,
            ridge_epsilon=options.ridge_epsilon,
            compute_seconds=time.perf_counter() - start,
        )
    ok = bool(solved.converged) and math.isfinite(solved.error)
    reason = (
        ""
        if ok
        else f"solver did not converge: error {solved.error:.3g} after {solved.iterations} "
        f"iterations of {solved.method}"
    )
    return solved.root, RootOutcome(
        ok=ok,
        error=float(solved.error),
        iterations=int(solved.iterations),
        method=solved.method,
        ridge_epsilon=float(solved.ridge_epsilon),
        compute_seconds=time.perf_counter() - start,
        reason=reason,
    )


def serve(conn: connection.Connection, buffer_fd: int) -> None:
    """Answers jobs from the pool until it closes the connection.

    Args:
        conn: Connection to the pool.
        buffer_fd: File descriptor of the shared matrix buffer.
    """
    buffer: mmap.mmap | None = None
    conn.send(Ready(os.getpid()))
    while True:
        try:
            request: Compute = conn.recv()
        except (EOFError, OSError):
            return
        size = os.fstat(buffer_fd).st_size
        if buffer is None or len(buffer) != size:
            if buffer is not None:
                buffer.close()
            buffer = mmap.mmap(buffer_fd, size)
        n = request.n
        view = np.frombuffer(buffer, dtype="<f8", count=n * n).reshape(n, n)
        root, outcome = solve(view, request.exponent, request.options)
        if outcome.ok:
            view[...] = root
        del view
        conn.send(Done(request.job_id, outcome))


def main() -> None:
    """Entry point: `python -m precond_service.worker --conn_fd=N --buffer_fd=M`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conn_fd", type=int, required=True, help="socket to the pool")
    parser.add_argument("--buffer_fd", type=int, required=True, help="shared matrix buffer")
    args = parser.parse_args()
    serve(connection.Connection(args.conn_fd), args.buffer_fd)


if __name__ == "__main__":
    main()
