"""The root settings one statistic may carry, each None for the service's default.

The trainer sends its own ridge, failure threshold and solver with every statistic
(`StatisticsBlock`), so that sync and async modes compute the same root; validation
checks them, the scheduler's `Job` carries them, and the pool applies them over the
service's flags (`SolverOptions`) when it sends the job to a worker.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class RootSettings:
    """Root settings of one statistic; None leaves one to the service's flag.

    Attributes:
        ridge_epsilon: Ridge ε, in (0, 1); relative or absolute as `ridge_mode` says.
        failure_threshold: Largest final error of a published root; finite, > 0.
        method: One of `roots.METHODS`.
        ridge_mode: One of `roots.RIDGE_MODES`.
        preconditioner: One of `eigenbasis.PRECONDITIONERS`: a root or an eigenbasis.
    """

    ridge_epsilon: float | None = None
    failure_threshold: float | None = None
    method: str | None = None
    ridge_mode: str | None = None
    preconditioner: str | None = None

    def overrides(self) -> dict[str, Any]:
        """The settings that are set, by name, to apply over the service's defaults."""
        return {
            name: value for name, value in dataclasses.asdict(self).items() if value is not None
        }
