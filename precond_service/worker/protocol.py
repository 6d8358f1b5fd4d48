"""The records the worker pool and its worker processes exchange, pickled over a socket.

They live apart from `worker.py` because that module runs as `__main__` in the
worker, where a class defined in it would pickle under a name the pool cannot load.
Matrices never travel in them: the statistic and its root go through the shared
buffer (see `pool.py`).

    worker -> pool   Ready        once, after importing NumPy
    pool -> worker   Compute      the statistic is in the buffer as n*n float64
    worker -> pool   Done         the root replaced the statistic when outcome.ok
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class SolverOptions:
    """How a worker computes one root; keyword arguments of `roots.inverse_pth_root`.

    Attributes:
        method: One of `roots.METHODS`.
        ridge_epsilon: Ridge ε (relative to the largest eigenvalue, or absolute).
        ridge_mode: One of `roots.RIDGE_MODES`.
        preconditioner: One of `eigenbasis.PRECONDITIONERS`: a root or an eigenbasis.
        failure_threshold: Largest final error of a root that is published.
        max_iterations: Most Schur-Newton iterations.
        symmetry_tolerance: Largest relative asymmetry of a statistic accepted.
    """

    method: str = "schur_newton"
    ridge_epsilon: float = 1e-6
    ridge_mode: str = "relative"
    preconditioner: str = "root"
    failure_threshold: float = 0.1
    max_iterations: int = 100
    symmetry_tolerance: float = 1e-4


@dataclasses.dataclass(frozen=True)
class RootOutcome:
    """How computing one root went.

    Attributes:
        ok: Whether the root may be published (converged, finite error).
        error: Final solver residual (NaN when unknown).
        iterations: Solver iterations.
        method: Solver used.
        ridge_epsilon: Relative ridge used.
        compute_seconds: Solver wall time in the worker.
        reason: Why it is not ok ("" when ok).
    """

    ok: bool
    error: float = math.nan
    iterations: int = 0
    method: str = ""
    ridge_epsilon: float = math.nan
    compute_seconds: float = 0.0
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class Ready:
    """The worker has started and waits for jobs."""

    pid: int


@dataclasses.dataclass(frozen=True)
class Compute:
    """Compute the inverse `exponent`-th root of the n x n statistic in the buffer."""

    job_id: int
    n: int
    exponent: int
    options: SolverOptions


@dataclasses.dataclass(frozen=True)
class Done:
    """Job `job_id` is done; when `outcome.ok` its root is in the buffer."""

    job_id: int
    outcome: RootOutcome
