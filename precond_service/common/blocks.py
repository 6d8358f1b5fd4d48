"""The records that cross between the trainer and the preconditioner service.

`StatisticsBlock` goes out (one Kronecker-factor statistic of one block of one
variable), `PreconditionerBlock` comes back (its inverse root), or `RootFailure`
(its root could not be computed). The optimizer, the client library and the server
all speak these; the wire format is in `protos/`.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class StatisticsBlock:
    """One symmetric PSD statistic whose root `statistics^(-1/exponent)` is wanted.

    The root settings travel with the statistic, so that the service computes the
    same root from it as the optimizer's own sync mode does. None leaves a setting
    to the service's flag of the same name (for clients that do not care).

    Attributes:
        key: Stable name of the block and dimension, the same across runs and
            restarts (for example `"dense/kernel|b0.1|d0"`).
        step: Optimizer step at which the statistic was read.
        exponent: p of the inverse p-th root (2r for a rank-r block, or an override).
        statistics: Square [n, n] float32 or float64 matrix.
        ridge_epsilon: Ridge added before the root, relative to the largest
            eigenvalue or absolute as `ridge_mode` says; in (0, 1).
        ridge_mode: How the ridge is added, one of `precond_service.common.roots.RIDGE_MODES`.
        failure_threshold: A root whose final residual is above this (or not
            finite) is not published; > 0.
        method: Solver, one of `precond_service.common.roots.METHODS`.
        preconditioner: What is wanted back, one of
            `precond_service.common.eigenbasis.PRECONDITIONERS`: the inverse root
            ("root", also for None) or the eigenbasis ("eigenbasis").
    """

    key: str
    step: int
    exponent: int
    statistics: np.ndarray
    ridge_epsilon: float | None = None
    failure_threshold: float | None = None
    method: str | None = None
    ridge_mode: str | None = None
    preconditioner: str | None = None


@dataclasses.dataclass(frozen=True)
class PreconditionerBlock:
    """A published inverse root for one block key.

    Attributes:
        key: The `StatisticsBlock.key` it was computed for.
        stats_step: The `StatisticsBlock.step` of the statistic it was computed from.
        root: [n, n] inverse p-th root.
        error: Final residual `max|M - I|` of the solver (0 when not measured).
        iterations: Solver iterations used.
        method: Solver that produced it ("schur_newton" or "eigh").
        compute_seconds: Wall time the solver took.
    """

    key: str
    stats_step: int
    root: np.ndarray
    error: float = 0.0
    iterations: int = 0
    method: str = ""
    compute_seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class RootFailure:
    """A root the service failed to compute; the key's previous root (if any) stays.

    Attributes:
        key: The `StatisticsBlock.key`.
        stats_step: The `StatisticsBlock.step` of the statistic whose root failed.
        reason: What went wrong (the solver's error, a dead worker, a time limit).
    """

    key: str
    stats_step: int
    reason: str
