"""The controller: inner loops end exactly where an action is due, and actions run in order."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.controller import Action, Controller, LoopMetrics


class _Counter:
    """An inner loop over plain numbers: each step has loss 1 on weight 1."""

    def __init__(self) -> None:
        self.step = 0
        self.lengths: list[int] = []

    def __call__(self, num_steps: int) -> dict[str, np.ndarray]:
        self.step += num_steps
        self.lengths.append(num_steps)
        ones = np.float32(num_steps)
        return {
            "loss_sum": ones,
            "weight_sum": ones,
            "tokens": ones,
            "grad_norm_sum": ones,
            "skipped": np.float32(0),
        }


def _recording(name: str, log: list, **schedule) -> Action:
    return Action(name, lambda step, metrics: log.append((name, step, metrics.steps)), **schedule)


def test_loops_end_at_every_due_step_and_actions_see_their_steps():
    loop, log = _Counter(), []
    service_due = [7]  # another clock: due at step 7, then at 100

    def service(step: int, _: LoopMetrics) -> None:
        log.append(("service", step, 0))
        if step >= service_due[0]:
            service_due[0] = 100

    actions = [
        Action(
            "service",
            service,
            part_of_step=True,
            steps_until_due=lambda: service_due[0] - loop.step,
        ),
        _recording("every3", log, every_steps=3),
        _recording("every4_and_last", log, every_steps=4, at_last_step=True),
        _recording("end", log, at_loop_end=True),
    ]
    Controller(loop, lambda: loop.step, actions, steps_per_loop=5, last_step=10).run(10)

    boundaries = list(np.cumsum(loop.lengths))
    assert boundaries == [3, 4, 6, 7, 8, 9, 10]
    assert [step for name, step, _ in log if name == "service"] == boundaries
    assert [(s, n) for name, s, n in log if name == "every3"] == [(3, 3), (6, 3), (9, 3)]
    assert [(s, n) for name, s, n in log if name == "every4_and_last"] == [(4, 4), (8, 4), (10, 2)]
    assert [(s, n) for name, s, n in log if name == "end"] == [(10, 10)]
    # The part of a step runs first after each loop.
    for boundary in boundaries:
        assert next(name for name, step, _ in log if step == boundary) == "service"


def test_run_to_an_earlier_step_ends_there_and_time_cadence_zero_runs_every_loop():
    loop, log = _Counter(), []
    actions = [_recording("each", log, every_seconds=0.0), _recording("end", log, at_loop_end=True)]
    controller = Controller(loop, lambda: loop.step, actions, steps_per_loop=4, last_step=100)
    controller.run(6)
    assert loop.lengths == [4, 2]
    assert [(name, step) for name, step, _ in log] == [("each", 4), ("each", 6), ("end", 6)]
    controller.run(6)  # already there: no loop
    assert loop.lengths == [4, 2]


def test_loop_metrics_average_over_applied_steps():
    metrics = LoopMetrics()
    metrics.add(
        {"loss_sum": 6.0, "weight_sum": 3.0, "tokens": 30.0, "grad_norm_sum": 2.0, "skipped": 1.0},
        steps=2,
        seconds=0.5,
    )
    assert metrics.loss == 2.0 and metrics.step_time == 0.25 and metrics.tokens_per_second == 60.0
    assert metrics.grad_norm == 1.0 and metrics.skipped == 1


def test_steps_per_loop_must_be_positive():
    with pytest.raises(ValueError, match="steps_per_loop must be >= 1, got 0"):
        Controller(_Counter(), lambda: 0, [], steps_per_loop=0, last_step=1)
