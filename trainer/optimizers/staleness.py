"""How old the preconditioners a Shampoo optimizer holds are, in its own updates."""

from __future__ import annotations

import dataclasses

import numpy as np

from trainer.optimizers.shampoo import NO_PRECONDITIONER, Shampoo


@dataclasses.dataclass(frozen=True)
class Staleness:
    """How old the roots in use are, in steps (current step - stats_step).

    Attributes:
        min: Freshest root's age; nan when no block has a root.
        mean: Mean age over blocks that have a root.
        max: Oldest root's age.
        fraction_preconditioned: Share of block factors that hold a root.
    """

    min: float
    mean: float
    max: float
    fraction_preconditioned: float


def block_ages(optimizer: Shampoo) -> np.ndarray:
    """Per block factor that holds a root: its age (update count - stats_step)."""
    return _ages(optimizer, np.array(list(optimizer.preconditioner_stats_steps().values())))


def _ages(optimizer: Shampoo, held: np.ndarray) -> np.ndarray:
    return int(optimizer.iterations.numpy()) - held[held != NO_PRECONDITIONER]


def staleness(optimizer: Shampoo) -> Staleness:
    """Summarises the age of the preconditioners `optimizer` holds now."""
    held = np.array(list(optimizer.preconditioner_stats_steps().values()), dtype=np.int64)
    ages = _ages(optimizer, held)
    if ages.size == 0:
        return Staleness(float("nan"), float("nan"), float("nan"), 0.0)
    return Staleness(
        float(ages.min()), float(ages.mean()), float(ages.max()), ages.size / held.size
    )
