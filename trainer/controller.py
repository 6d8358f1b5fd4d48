"""The outer loop on the host: inner loops on the device, actions between them (as in Orbit).

An `Action` is host work with a schedule: every k steps, every s seconds, at the
last step of the run, and/or after a deadline on another clock (the service's
update count). The controller ends each inner loop at the next step an action
is due, so work scheduled on step counts happens exactly there.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np


@dataclasses.dataclass
class LoopMetrics:
    """Sums over inner loops (since an action last ran)."""

    steps: int = 0
    seconds: float = 0.0
    loss_sum: float = 0.0
    weight_sum: float = 0.0
    tokens: float = 0.0
    grad_norm_sum: float = 0.0
    skipped: int = 0

    def add(self, values: dict[str, np.ndarray], steps: int, seconds: float) -> None:
        self.steps += steps
        self.seconds += seconds
        self.loss_sum += float(values["loss_sum"])
        self.weight_sum += float(values["weight_sum"])
        self.tokens += float(values["tokens"])
        self.grad_norm_sum += float(values["grad_norm_sum"])
        self.skipped += int(values["skipped"])

    def merge(self, other: LoopMetrics) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.weight_sum, 1.0)

    @property
    def step_time(self) -> float:
        return self.seconds / max(self.steps, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def grad_norm(self) -> float:
        return self.grad_norm_sum / max(self.steps, 1)


@dataclasses.dataclass
class Action:
    """Host work run between inner loops when due.

    Attributes:
        name: What it is, for messages.
        run: Called with the step and the metrics since this action last ran.
        every_steps: Due at multiples of this step count; 0 for never.
        every_seconds: Due when this long has passed since it last ran (0: after
            every inner loop); None for never.
        at_last_step: Also due at the run's last step.
        at_loop_end: Also due when `Controller.run` reaches its `until`.
        part_of_step: Runs after every inner loop, before the others, and its
            time counts as training time (the service work).
        steps_until_due: A deadline on another clock, in steps (the service's
            next push or install); inner loops end there too.
    """

    name: str
    run: Callable[[int, LoopMetrics], None]
    every_steps: int = 0
    every_seconds: float | None = None
    at_last_step: bool = False
    at_loop_end: bool = False
    part_of_step: bool = False
    steps_until_due: Callable[[], int] | None = None
    last_ran: float = dataclasses.field(default_factory=time.monotonic)
    pending: LoopMetrics = dataclasses.field(default_factory=LoopMetrics)

    def steps_left(self, step: int) -> int | None:
        """Steps from `step` until this action is next due by step count; None: not by steps."""
        left = [self.every_steps - step % self.every_steps] if self.every_steps else []
        if self.steps_until_due is not None:
            left.append(self.steps_until_due())
        return min(left) if left else None

    def is_due(self, step: int, now: float, loop_end: bool, last_step: bool) -> bool:
        return bool(
            self.part_of_step
            or (self.every_steps and step % self.every_steps == 0)
            or (self.every_seconds is not None and now - self.last_ran >= self.every_seconds)
            or (self.at_last_step and last_step)
            or (self.at_loop_end and loop_end)
        )


class Controller:
    """Runs inner loops up to a step and the actions due between them.

    Args:
        inner_loop: Runs n steps on the device; returns the loop's sums
            (`step_fn.LOOP_SUMS`) and advances the step.
        current_step: The step now (batches trained on).
        actions: Host work, run in this order when due.
        steps_per_loop: Most steps in one inner loop.
        last_step: The run's last step (`train.num_steps`).
    """

    def __init__(
        self,
        inner_loop: Callable[[int], dict[str, np.ndarray]],
        current_step: Callable[[], int],
        actions: Sequence[Action],
        steps_per_loop: int,
        last_step: int,
    ):
        if steps_per_loop < 1:
            raise ValueError(f"steps_per_loop must be >= 1, got {steps_per_loop}")
        self.inner_loop = inner_loop
        self.current_step = current_step
        self.actions = list(actions)
        self.steps_per_loop = steps_per_loop
        self.last_step = last_step

    def loop_length(self, step: int, until: int) -> int:
        """Steps until the next due action or `until`, at most `steps_per_loop`."""
        length = min(self.steps_per_loop, until - step)
        for action in self.actions:
            left = action.steps_left(step)
            if left is not None:
                length = min(length, max(left, 1))
        return length

    def run_inner_loop(self, num_steps: int) -> tuple[dict[str, np.ndarray], float]:
        """`num_steps` steps and the actions that are part of a step; returns sums, seconds."""
        began = time.perf_counter()
        values = self.inner_loop(num_steps)
        step = self.current_step()
        for action in self.actions:
            if action.part_of_step:
                action.run(step, LoopMetrics())
        return values, time.perf_counter() - began

    def run(self, until: int) -> None:
        """Trains to step `until`, running each action when it is due."""
        step = self.current_step()
        while step < until:
            length = self.loop_length(step, until)
            values, seconds = self.run_inner_loop(length)
            step = self.current_step()
            loop = LoopMetrics()
            loop.add(values, length, seconds)
            now = time.monotonic()
            for action in self.actions:
                if action.part_of_step:
                    continue
                action.pending.merge(loop)
                if action.is_due(step, now, step >= until, step >= self.last_step):
                    metrics, action.pending = action.pending, LoopMetrics()
                    action.run(step, metrics)
                    action.last_ran = time.monotonic()
