"""Connects a Shampoo optimizer in async mode to the preconditioner service.

The host calls `ServicePreconditioning.after_steps()` between inner training
loops (or lets `ShampooServiceCallback` do it in `model.fit`). It never waits on
the service: statistics go to the client's push thread, and whatever roots the
pull thread has received by then are installed.
"""

from __future__ import annotations

import dataclasses
import logging

import keras
import numpy as np

from precond_service.client import PreconditionerClient
from trainer.optimizers.shampoo import NO_PRECONDITIONER, Shampoo

log = logging.getLogger(__name__)


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


def staleness(optimizer: Shampoo) -> Staleness:
    """Summarises the age of the preconditioners `optimizer` holds now."""
    held = np.array(list(optimizer.preconditioner_stats_steps().values()), dtype=np.int64)
    if held.size == 0:
        return Staleness(float("nan"), float("nan"), float("nan"), 0.0)
    ages = int(optimizer.iterations.numpy()) - held[held != NO_PRECONDITIONER]
    fraction = ages.size / held.size
    if ages.size == 0:
        return Staleness(float("nan"), float("nan"), float("nan"), 0.0)
    return Staleness(float(ages.min()), float(ages.mean()), float(ages.max()), fraction)


class ServicePreconditioning:
    """Pushes statistics every `update_steps` steps and installs newer roots.

    Args:
        optimizer: A built Shampoo optimizer with `precondition_mode="async"`
            (`optimizer.build(model.trainable_variables)`).
        client: A started `PreconditionerClient`.
        update_steps: Steps between statistics pushes (N).

    Raises:
        ValueError: The optimizer is not in async mode, or update_steps < 1.
        RuntimeError: The optimizer is not built yet.
    """

    def __init__(self, optimizer: Shampoo, client: PreconditionerClient, update_steps: int):
        if optimizer.precondition_mode != "async":
            raise ValueError(
                "ServicePreconditioning needs Shampoo(precondition_mode='async'), "
                f"got precondition_mode={optimizer.precondition_mode!r}"
            )
        if not isinstance(update_steps, int) or update_steps < 1:
            raise ValueError(f"update_steps must be a positive integer, got {update_steps!r}")
        self.optimizer = optimizer
        self.client = client
        self.update_steps = update_steps
        self._keys = frozenset(optimizer.preconditioner_stats_steps())
        # key -> stats_step already offered to the optimizer, so that a batch with
        # nothing new reads no optimizer variable. The optimizer still decides what
        # is newer than what it holds (after a checkpoint restore, for example).
        self._offered: dict[str, int] = {}
        self._last_push_step: int | None = None

    def after_steps(self) -> int:
        """Host work between inner loops; returns how many roots were installed."""
        step = int(self.optimizer.iterations.numpy())
        due = self._last_push_step is None or step - self._last_push_step >= self.update_steps
        if due and step > 0:
            self.client.push(self.optimizer.statistics_snapshot())
            self._last_push_step = step
        fresh = [
            block
            for key, block in self.client.latest().items()
            if key in self._keys and block.stats_step > self._offered.get(key, NO_PRECONDITIONER)
        ]
        if not fresh:
            return 0
        self._offered.update((block.key, block.stats_step) for block in fresh)
        return self.optimizer.assign_preconditioners(fresh)


class ShampooServiceCallback(keras.callbacks.Callback):
    """`model.fit` callback running `ServicePreconditioning.after_steps` after each batch.

    Args:
        bridge: The `ServicePreconditioning` to drive.
    """

    def __init__(self, bridge: ServicePreconditioning):
        super().__init__()
        self.bridge = bridge

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.bridge.after_steps()
