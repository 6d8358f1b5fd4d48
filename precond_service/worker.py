"""One worker process of the pool: computes inverse roots in float64 with `roots`.

`pool.py` starts it as `python -m precond_service.worker --conn_fd=N --buffer_fd=M`
with the BLAS thread variables already in its environment, so NumPy reads them at
import. It talks to the pool over a socket with `multiprocessing.connection`
framing, in small pickled tuples; matrices never go through the socket but through
a shared memory file (`--buffer_fd`) that the pool grows as needed:

    worker -> pool   ("ready", pid)                    once, after importing NumPy
    pool -> worker   ("job", job_id, n, exponent, options)
                     the statistic is in the buffer as n*n float64, row-major
    worker -> pool   ("done", job_id, result)          the root replaced the statistic
                                                       in the buffer when result["ok"]

The worker exits when the pool closes the socket (also when the service dies). It
runs in a session of its own, so signals meant for the service do not reach it.
"""

from __future__ import annotations

import argparse
import math
import mmap
import os
import time
from multiprocessing import connection
from typing import Any

import numpy as np

from precond_service import roots


def solve(
    matrix: np.ndarray, exponent: int, options: dict[str, Any]
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Computes one inverse root and says whether it may be published.

    Args:
        matrix: Square float64 statistic.
        exponent: p of the inverse p-th root.
        options: Keyword arguments for `roots.inverse_pth_root` (method,
            ridge_epsilon, failure_threshold, max_iterations).

    Returns:
        (root or None, result) where result has `ok` (publishable: converged with a
        finite error), `error`, `iterations`, `method`, `ridge_epsilon`,
        `compute_seconds` and, when not ok, `reason`.
    """
    start = time.perf_counter()
    try:
        solved = roots.inverse_pth_root(matrix, exponent, **options)
    except (ValueError, ArithmeticError) as e:
        seconds = time.perf_counter() - start
        return None, {
            "ok": False,
            "reason": f"solver raised {type(e).__name__}: {e}",
            "error": math.nan,
            "iterations": 0,
            "method": options.get("method", ""),
            "ridge_epsilon": options.get("ridge_epsilon", math.nan),
            "compute_seconds": seconds,
        }
    seconds = time.perf_counter() - start
    result = {
        "ok": bool(solved.converged) and math.isfinite(solved.error),
        "error": float(solved.error),
        "iterations": int(solved.iterations),
        "method": solved.method,
        "ridge_epsilon": float(solved.ridge_epsilon),
        "compute_seconds": seconds,
    }
    if not result["ok"]:
        result["reason"] = (
            f"solver did not converge: error {solved.error:.3g} after {solved.iterations} "
            f"iterations of {solved.method}"
        )
    return solved.root, result


def serve(conn: connection.Connection, buffer_fd: int) -> None:
    """Answers jobs from the pool until it closes the connection.

    Args:
        conn: Connection to the pool.
        buffer_fd: File descriptor of the shared matrix buffer.
    """
    buffer: mmap.mmap | None = None
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        _, job_id, n, exponent, options = message
        size = os.fstat(buffer_fd).st_size
        if buffer is None or len(buffer) != size:
            if buffer is not None:
                buffer.close()
            buffer = mmap.mmap(buffer_fd, size)
        view = np.frombuffer(buffer, dtype="<f8", count=n * n).reshape(n, n)
        root, result = solve(view, exponent, options)
        if result["ok"]:
            view[...] = root
        del view
        conn.send(("done", job_id, result))


def main() -> None:
    """Entry point: `python -m precond_service.worker --conn_fd=N --buffer_fd=M`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conn_fd", type=int, required=True, help="socket to the pool")
    parser.add_argument("--buffer_fd", type=int, required=True, help="shared matrix buffer")
    args = parser.parse_args()
    serve(connection.Connection(args.conn_fd), args.buffer_fd)


if __name__ == "__main__":
    main()
