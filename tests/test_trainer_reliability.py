"""The trainer under faults of its own: non-finite gradients, damaged checkpoints,
SIGKILL at any moment, and the repeatable asynchronous mode.

All with the tiny model of tests/test_trainer.py on the generated numbers task.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from precond_service.common.events import Event, read_events
from tests.test_trainer import make_trainer, tiny_config
from trainer import checkpoints, train
from trainer import config as config_lib
from trainer.optimizers.service_bridge import staleness
from trainer.optimizers.shampoo import NO_PRECONDITIONER

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory):
    """One SentencePiece model shared by the module's runs (trained by the first)."""
    return str(tmp_path_factory.mktemp("vocab") / "spm.model")


def _embedding(trainer: train.Trainer) -> tf.Variable:
    return next(v for v in trainer.model.trainable_variables if "embedding" in v.path)


def _optimizer_state(trainer: train.Trainer) -> list[np.ndarray]:
    return [v.numpy().copy() for v in trainer.optimizer.variables]


def test_nonfinite_step_is_skipped_and_counted_without_touching_any_state(tmp_path, vocab_path):
    trainer = make_trainer(tiny_config(vocab_path, "shampoo", "sync"), tmp_path)
    trainer.run_steps(None, 4)  # past start_preconditioning_step: statistics and roots exist
    embedding = _embedding(trainer)
    clean = embedding.numpy()
    weights = [v.numpy() for v in trainer.model.trainable_variables]
    state = _optimizer_state(trainer)
    assert any(np.any(s != 0) for s in state), "the optimizer has no state to protect"

    # A NaN in the output embedding makes the loss and every gradient NaN.
    poisoned = clean.copy()
    poisoned[0, 0] = np.nan
    embedding.assign(poisoned)
    values, _ = trainer.run_steps(None, 1)
    assert values["skipped"] == 1 and values["weight_sum"] == 0 and values["loss_sum"] == 0
    assert int(trainer.step.numpy()) == 5  # the batch was consumed
    assert int(trainer.optimizer.iterations.numpy()) == 4  # but no step applied
    assert int(trainer.skipped_steps.numpy()) == 1
    for before, after in zip(state, _optimizer_state(trainer)):
        np.testing.assert_array_equal(before, after)  # statistics, roots, graft, momentum
    for before, variable in zip(weights, trainer.model.trainable_variables):
        if variable is not embedding:
            np.testing.assert_array_equal(before, variable.numpy())

    embedding.assign(clean)
    values, _ = trainer.run_steps(None, 2)
    assert values["skipped"] == 0 and np.isfinite(values["loss_sum"]) and values["weight_sum"] > 0
    assert int(trainer.consecutive_skipped.numpy()) == 0
    assert int(trainer.skipped_steps.numpy()) == 1
    assert int(trainer.optimizer.iterations.numpy()) == 6
    assert all(np.all(np.isfinite(v.numpy())) for v in trainer.optimizer.variables)


def test_nonfinite_steps_in_a_row_stop_the_run_naming_the_step(tmp_path, vocab_path):
    config = tiny_config(vocab_path, "shampoo", "sync")
    config.train.max_consecutive_skipped_steps = 3
    config.train.steps_per_loop = 2
    trainer = make_trainer(config, tmp_path)
    trainer.train(None, until_step=2)
    embedding = _embedding(trainer)
    poisoned = embedding.numpy()
    poisoned[1, 1] = np.inf
    embedding.assign(poisoned)
    with pytest.raises(FloatingPointError, match=r"last 4 steps, up to step 6 .*learning_rate"):
        trainer.train(None)
    skipped = read_events(tmp_path / "events.jsonl", Event.SKIPPED_STEPS)
    assert [(e["step"], e["count"], e["in_a_row"], e["total"]) for e in skipped] == [
        (4, 2, 2, 2),
        (6, 2, 4, 4),
    ]
    assert int(trainer.skipped_steps.numpy()) == 4


# ---------------------------------------------------------------- checkpoints


def _trained_with_checkpoints(workdir: Path, vocab_path: str) -> train.Trainer:
    config = tiny_config(vocab_path, "adam", "off")
    config.train.update(num_steps=12, checkpoint_every_steps=4, keep_checkpoints=5)
    trainer = make_trainer(config, workdir)
    trainer.train(None)
    return trainer


def _damage(path: str, how: str) -> None:
    if how == "truncated data":
        (data,) = [p for p in Path(path).parent.glob(Path(path).name + ".data-*")]
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif how == "flipped bytes":
        (data,) = [p for p in Path(path).parent.glob(Path(path).name + ".data-*")]
        raw = bytearray(data.read_bytes())
        for offset in range(0, len(raw), 97):
            raw[offset] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif how == "garbage index":
        Path(path + ".index").write_bytes(os.urandom(300))
    elif how == "missing data":
        for data in Path(path).parent.glob(Path(path).name + ".data-*"):
            data.unlink()
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["truncated data", "flipped bytes", "garbage index", "missing data"]
)
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, vocab_path, how):
    trainer = _trained_with_checkpoints(tmp_path, vocab_path)
    directory = Path(trainer.manager.directory)
    previous = [v.numpy() for v in trainer.model.weights]  # at step 12
    _damage(str(directory / "ckpt-12"), how)
    del trainer

    resumed = _trained_with_checkpoints_restore(tmp_path, vocab_path)
    assert resumed.restored_step == 8
    (event,) = read_events(tmp_path / "events.jsonl", Event.RESUMED)
    assert (event["step"], event["checkpoint"]) == (8, str(directory / "ckpt-8"))
    assert not list(directory.glob("ckpt-12.*"))  # set aside...
    assert list((directory / "corrupt").glob("ckpt-12.*"))  # ...not deleted
    # The previous checkpoint's weights are not the damaged one's.
    assert any(not np.array_equal(a, v.numpy()) for a, v in zip(previous, resumed.model.weights))
    resumed.train(None)
    assert int(resumed.step.numpy()) == 12
    assert (directory / "ckpt-12.index").exists()


def _trained_with_checkpoints_restore(workdir: Path, vocab_path: str) -> train.Trainer:
    config = tiny_config(vocab_path, "adam", "off")
    config.train.update(num_steps=12, checkpoint_every_steps=4, keep_checkpoints=5)
    return make_trainer(config, workdir)


def test_half_written_checkpoint_state_file_does_not_stop_the_resume(tmp_path, vocab_path):
    trainer = _trained_with_checkpoints(tmp_path, vocab_path)
    state = Path(trainer.manager.directory) / "checkpoint"
    state.write_text("model_checkpoint_path: 'ckpt-12\n{{{ half written")
    del trainer
    resumed = _trained_with_checkpoints_restore(tmp_path, vocab_path)
    assert resumed.restored_step == 12
    resumed.config.train.num_steps = 16
    resumed.train(None)
    assert resumed.manager.latest_checkpoint.endswith("ckpt-16")


def test_every_checkpoint_damaged_starts_afresh_keeping_them(tmp_path, vocab_path):
    trainer = _trained_with_checkpoints(tmp_path, vocab_path)
    directory = Path(trainer.manager.directory)
    del trainer
    for number in (4, 8, 12):
        _damage(str(directory / f"ckpt-{number}"), "missing data")
    # Nothing could be read, so nothing was restored: the run starts afresh, loudly.
    assert _trained_with_checkpoints_restore(tmp_path, vocab_path).restored_step == 0
    started = read_events(tmp_path / "events.jsonl", Event.STARTED)
    assert [(e["step"], e["resumed"]) for e in started] == [(0, False), (0, False)]
    assert not read_events(tmp_path / "events.jsonl", Event.RESUMED)
    assert len(list((directory / "corrupt").glob("ckpt-*.index"))) == 3


# ---------------------------------------------------------------- SIGKILL and resume


def _cli(workdir: Path, vocab_path: str, mode: str, num_steps: int) -> list[str]:
    """`python -m trainer` on the quickstart config shrunk to the tiny model.

    `mode` "sync", or "delay": asynchronous with roots installed 2 steps after
    their statistics (`precond.delay_steps`), from a service child of the trainer.
    """
    overrides: dict[str, object] = {
        "data.vocab_path": vocab_path,
        "data.numbers_train_size": 2000,
        "data.numbers_eval_size": 20,
        "data.vocab_size": 150,
        "data.vocab_train_sentences": 4000,
        "data.tokens_per_batch": 256,
        "data.shuffle_buffer": 500,
        "data.eval_batch_size": 10,
        "data.eval_bleu_examples": 0,
        "model.num_layers": 1,
        "model.d_model": 32,
        "model.num_heads": 2,
        "model.d_ff": 64,
        "model.dropout": 0.1,
        "train.num_steps": num_steps,
        "train.steps_per_loop": 2,
        "train.summary_every_steps": 4,
        "train.checkpoint_every_steps": 4,
        "train.eval_every_steps": 0,
        "train.deterministic": True,
        "precond.update_steps": 4,
        "optimizer.shampoo.start_preconditioning_step": 4,
        "optimizer.shampoo.block_size": 32,
    }
    if mode == "delay":
        overrides.update({"precond.delay_steps": 2, "precond.pull_interval_s": 0.05})
    variant = {"sync": "sync", "delay": "shampoo"}[mode]
    return [
        sys.executable,
        "-m",
        "trainer",
        f"--config=configs/quickstart.py:{variant}",
        f"--workdir={workdir}",
        *(f"--config.{field}={value}" for field, value in overrides.items()),
    ]


def _final_tensors(workdir: Path) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(str(workdir / checkpoints.CHECKPOINT_DIR))
    return {
        name: reader.get_tensor(name)
        for name, dtype in reader.get_variable_to_dtype_map().items()
        if dtype != tf.variant
    }


def _run(command: list[str]) -> subprocess.CompletedProcess:
    completed = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def _kill_after_checkpoint(command: list[str], workdir: Path, seed: int) -> int:
    """Starts `command`, SIGKILLs it at a random moment after its first checkpoint."""
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 300
        while not list((workdir / checkpoints.CHECKPOINT_DIR).glob("ckpt-*.index")):
            assert process.poll() is None, "the trainer ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        time.sleep(random.Random(seed).uniform(0.0, 1.5))
        process.send_signal(signal.SIGKILL)
        return process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize("mode", ["sync", "delay"])
def test_sigkilled_trainer_resumes_to_bitwise_the_same_weights(tmp_path, vocab_path, mode):
    num_steps = 40
    undisturbed = tmp_path / "undisturbed"
    _run(_cli(undisturbed, vocab_path, mode, num_steps))
    expected = _final_tensors(undisturbed)

    killed = tmp_path / "killed"
    command = _cli(killed, vocab_path, mode, num_steps)
    kills = 0
    for seed in range(2):
        status = _kill_after_checkpoint(command, killed, seed)
        if status == -signal.SIGKILL:
            kills += 1
    assert kills >= 1, "the trainer finished before it could be killed; use more steps"
    _run(command)
    resumes = read_events(killed / "events.jsonl", Event.RESUMED)
    assert len(resumes) >= 1 and all(e["step"] % 4 == 0 for e in resumes)

    got = _final_tensors(killed)
    assert set(got) == set(expected)
    assert int(got["step/.ATTRIBUTES/VARIABLE_VALUE"]) == num_steps
    different = [name for name in expected if not np.array_equal(expected[name], got[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


# ---------------------------------------------------------------- repeatable async mode


def _delay_config(vocab_path: str, delay: int):
    config = tiny_config(vocab_path, "shampoo", "async")
    config.train.update(
        num_steps=16, steps_per_loop=8, checkpoint_every_steps=8, deterministic=True
    )
    config.precond.update_steps = 4
    config.precond.delay_steps = delay
    config.precond.pull_interval_s = 0.05
    return config


def _train_recording_roots(config, workdir: Path) -> tuple[train.Trainer, dict[int, dict]]:
    trainer = make_trainer(config, workdir)
    held: dict[int, dict] = {}
    with trainer.preconditioning() as bridge:
        while int(trainer.step.numpy()) < config.train.num_steps:
            step = int(trainer.step.numpy())
            length = trainer.controller(bridge).loop_length(step, config.train.num_steps)
            trainer.run_steps(bridge, length)
            held[int(trainer.step.numpy())] = trainer.optimizer.preconditioner_stats_steps()
    return trainer, held


def test_delay_mode_installs_each_root_exactly_delay_steps_after_its_statistics(
    tmp_path, vocab_path
):
    delay = 2
    config = _delay_config(vocab_path, delay)
    first, held = _train_recording_roots(config, tmp_path / "a")
    # Loops end at every push (multiples of 4) and every install of a pushed
    # statistic's root (4k + 2, k >= 1: nothing is awaited at step 2).
    assert sorted(held) == [4, 6, 8, 10, 12, 14, 16]
    for step, roots in held.items():
        steps = set(roots.values()) - {NO_PRECONDITIONER}
        # Statistics exist from step 1; pushes at 4, 8, 12 are installed at 6, 10, 14.
        newest_due = max((t for t in (4, 8, 12) if t + delay <= step), default=None)
        if newest_due is None:
            assert not steps, (step, steps)
        else:
            assert steps == {newest_due}, (step, steps)
    assert staleness(first.optimizer).max == 16 - 12

    second, held_again = _train_recording_roots(config, tmp_path / "b")
    assert held_again == held
    for a, b in zip(first.model.weights, second.model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_delay_mode_config_is_checked():
    config = tiny_config("unused", "shampoo", "async")
    config.precond.update_steps = 4
    config.precond.delay_steps = 5
    with pytest.raises(ValueError, match=r"config.precond.delay_steps must be between 1 and"):
        config_lib.validate(config)
    config.precond.delay_steps = 2
    config.train.checkpoint_every_steps = 6
    with pytest.raises(ValueError, match=r"checkpoint_every_steps must be a multiple"):
        config_lib.validate(config)
    config.precond.mode = "sync"
    with pytest.raises(ValueError, match=r'delay_steps applies to config.precond.mode="async"'):
        config_lib.validate(config)
