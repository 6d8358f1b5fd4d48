"""One clock across the seam: the optimizer's update count, also after skipped steps.

Steps with non-finite gradients consume a batch (the trainer's step advances)
but apply no update (`optimizer.iterations` does not). With a real service
child, every pushed statistic must be named by the update count at the push,
pushes must happen at multiples of `precond.update_steps` of that count, and
staleness must be measured against it.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from precond_service.common.events import Event, read_events
from tests.test_trainer import make_trainer, tiny_config
from tests.test_trainer_reliability import _embedding
from trainer.optimizers.service_bridge import staleness
from trainer.optimizers.shampoo import NO_PRECONDITIONER

UPDATE_STEPS = 3
POISONED = 2  # batches skipped, so that batch and update counts differ by 2


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory):
    return str(tmp_path_factory.mktemp("vocab") / "spm.model")


def test_async_pushes_and_staleness_follow_the_update_count_across_skipped_steps(
    tmp_path, vocab_path
):
    config = tiny_config(vocab_path, "shampoo", "async")
    config.train.update(num_steps=14, steps_per_loop=4, checkpoint_every_steps=100)
    config.precond.update_steps = UPDATE_STEPS
    trainer = make_trainer(config, tmp_path)
    # (batch step, update count) on the training thread when the statistics are read
    # for a push, and the step the snapshot names them by.
    reads: list[tuple[int, int, int]] = []
    read_statistics = trainer.optimizer.read_statistics

    def recording_read():
        snapshot = read_statistics()
        reads.append((int(trainer.step.numpy()), int(trainer.optimizer.iterations), snapshot.step))
        return snapshot

    trainer.optimizer.read_statistics = recording_read
    with trainer.preconditioning() as bridge:
        trainer.train(bridge, until_step=4)
        embedding = _embedding(trainer)
        clean = embedding.numpy()
        poisoned = clean.copy()
        poisoned[0, 0] = np.nan
        embedding.assign(poisoned)
        trainer.train(bridge, until_step=4 + POISONED)
        embedding.assign(clean)
        trainer.train(bridge)
        updates = int(trainer.optimizer.iterations.numpy())
        _wait_for_roots(bridge, trainer)
        held = staleness(trainer.optimizer)
        roots = set(trainer.optimizer.preconditioner_stats_steps().values()) - {NO_PRECONDITIONER}

    assert int(trainer.step.numpy()) == 14 and updates == 14 - POISONED
    (skipped,) = read_events(tmp_path / "events.jsonl", Event.SKIPPED_STEPS)
    assert (skipped["step"], skipped["count"], skipped["total"]) == (6, POISONED, POISONED)
    # Each push names its statistics by the update count at the push, which is
    # a multiple of update_steps; the batch count is 2 ahead after the skips.
    assert [(batch, count) for batch, count, _ in reads] == [(3, 3), (8, 6), (11, 9), (14, 12)]
    assert all(step == count for _, count, step in reads)
    # Roots are named by pushed update counts; their age is counted in updates.
    assert roots <= {count for _, count, _ in reads}
    assert held.min == updates - max(roots) and held.max == updates - min(roots)
    installed = read_events(tmp_path / "events.jsonl", Event.ROOTS_INSTALLED)
    assert installed and all(e["count"] > 0 for e in installed)


def _wait_for_roots(bridge, trainer, timeout_s: float = 60.0) -> None:
    """Installs roots as they arrive until those of the last push are held."""
    last_push = bridge.step // UPDATE_STEPS * UPDATE_STEPS
    deadline = time.monotonic() + timeout_s
    while last_push not in trainer.optimizer.preconditioner_stats_steps().values():
        assert time.monotonic() < deadline, bridge.client.status()
        bridge.client.pull_now()
        time.sleep(0.05)
        trainer.service_work(bridge, int(trainer.step.numpy()))  # installs, with events
