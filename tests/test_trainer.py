"""The training loop end to end on the generated numbers task, with a tiny model.

Every optimizer and precond.mode trains a few steps; the async mode runs against
a real service child process; checkpoints resume; translation works from a
workdir; the quickstart command runs end to end (slow).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from precond_service.client.service_client import wait_for_serving
from precond_service.client.sharding import shard_of
from precond_service.common.events import Event, read_events
from trainer import train
from trainer.config import default_config
from trainer.optimizers.service_bridge import staleness
from trainer.process_setup import setup_process
from trainer.translate import load_translator

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory):
    """One SentencePiece model shared by the module's runs (trained by the first)."""
    return str(tmp_path_factory.mktemp("vocab") / "spm.model")


def tiny_config(vocab_path: str, optimizer: str = "shampoo", mode: str = "sync"):
    config = default_config()
    data = config.data
    data.source = "numbers"
    data.numbers_train_size = 2000
    data.numbers_eval_size = 20
    data.numbers_max = 99_999
    data.vocab_path = vocab_path
    data.vocab_size = 150
    data.vocab_train_sentences = 4000
    data.max_length = 32
    data.max_eval_length = 40
    data.tokens_per_batch = 256
    data.shuffle_buffer = 500
    data.eval_batch_size = 10
    data.eval_bleu_examples = 10
    config.model.update(
        num_layers=1, d_model=32, num_heads=2, d_ff=64, dropout=0.0, attention_dropout=0.0
    )
    config.model.max_length = 64
    config.decode.beam_size = 2
    config.decode.max_extra_length = 8
    config.train.update(
        num_steps=8,
        steps_per_loop=4,
        summary_every_steps=4,
        checkpoint_every_steps=4,
        eval_every_steps=0,
        log_every_s=0.0,
    )
    config.optimizer.name = optimizer
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 2
    config.optimizer.shampoo.start_preconditioning_step = 2
    config.optimizer.shampoo.block_size = 32
    config.precond.mode = mode
    config.precond.update_steps = 2
    config.precond.pull_interval_s = 0.1
    return config


def make_trainer(config, workdir) -> train.Trainer:
    """A Trainer in `workdir`, with the process set up for `config` as `__main__` does."""
    setup_process(config)
    return train.Trainer(config, str(workdir))


def _weights(model) -> list[np.ndarray]:
    return [v.numpy() for v in model.weights]


@pytest.mark.parametrize(
    ("optimizer", "mode"),
    [("adam", "off"), ("adagrad", "off"), ("shampoo", "off"), ("shampoo", "sync")],
)
def test_each_optimizer_and_mode_trains_checkpoints_and_evaluates(
    tmp_path, vocab_path, optimizer, mode
):
    config = tiny_config(vocab_path, optimizer, mode)
    trainer = make_trainer(config, tmp_path)
    before = _weights(trainer.model)
    result = trainer.train_and_evaluate()

    assert result.step == 8
    assert np.isfinite(result.train_loss) and np.isfinite(result.dev_loss)
    assert any(not np.array_equal(a, b) for a, b in zip(before, _weights(trainer.model)))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["step"] == 8
    # The median step time comes from the loops after the first (tracing) one.
    assert len(trainer.loop_step_ms) >= 2
    assert results["step_ms_median"] == pytest.approx(float(np.median(trainer.loop_step_ms[1:])))
    assert "tok:13a" in results["bleu_signature"]
    assert json.loads((tmp_path / "config.json").read_text())["optimizer"]["name"] == optimizer
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-8")
    assert list((tmp_path / "summaries").glob("events.out.tfevents.*"))
    events = tmp_path / "events.jsonl"
    assert [e["step"] for e in read_events(events, Event.CHECKPOINT_SAVED)] == [4, 8]
    progress = read_events(events, Event.PROGRESS)
    assert progress[-1]["step"] == 8 and np.isfinite(progress[-1]["loss"])
    # Staleness in the event: null without roots, as the log line says "none yet".
    assert progress[-1]["staleness_min"] == (1 if mode == "sync" else None)
    evaluated = read_events(events, Event.EVALUATED)
    assert [(e["step"], e["split"]) for e in evaluated] == [(8, "dev"), (8, "test")]
    # The scores reported, logged as events and written to results.json agree.
    assert [e["bleu"] for e in evaluated] == pytest.approx([result.dev_bleu, result.test_bleu])
    assert (results["dev_bleu"], results["test_loss"]) == (result.dev_bleu, result.test_loss)
    assert [e["event"] for e in read_events(events)][:1] == ["started"]
    assert read_events(events, Event.FINISHED)[0]["step"] == 8
    held = staleness(trainer.optimizer) if optimizer == "shampoo" else None
    if mode == "sync":
        # Roots computed inside updates 3, 5 and 7 (counts 2, 4, 6 before them) are
        # named by the update count that includes their gradient: 3, 5, 7. At 8 the
        # newest is 1 update old.
        assert held.fraction_preconditioned > 0.5
        assert held.min == 1
    if optimizer == "shampoo" and mode == "off":
        assert held.fraction_preconditioned == 0.0


def test_run_steps_advances_the_step_and_loss_only_evaluation_matches(tmp_path, vocab_path):
    trainer = make_trainer(tiny_config(vocab_path, "adam", "off"), tmp_path)
    values, seconds = trainer.run_steps(None, 3)

    assert int(trainer.step.numpy()) == 3
    assert int(trainer.optimizer.iterations.numpy()) == 3
    assert seconds > 0 and values["weight_sum"] > 0 and np.isfinite(values["loss_sum"])
    loss, accuracy = trainer.evaluator.loss("dev")
    full = trainer.evaluator.evaluate("dev", max_bleu_examples=1)
    assert loss == pytest.approx(full.loss, rel=1e-6)
    assert accuracy == pytest.approx(full.accuracy, rel=1e-6)
    assert full.bleu_sentences == 1


def test_accumulated_updates_take_k_batches_each(tmp_path, vocab_path):
    config = tiny_config(vocab_path, "adam", "off")
    plain, _ = make_trainer(config, tmp_path / "plain").run_steps(None, 4)
    config.train.accumulate_steps = 2
    trainer = make_trainer(config, tmp_path / "accumulated")
    values, _ = trainer.run_steps(None, 2)

    assert int(trainer.step.numpy()) == int(trainer.optimizer.iterations.numpy()) == 2
    # The same 4 batches, in the same order, made 2 updates instead of 4.
    assert values["weight_sum"] == plain["weight_sum"]
    assert values["tokens"] == plain["tokens"]


@pytest.mark.parametrize(("policy", "scaled"), [("mixed_float16", True), ("mixed_bfloat16", False)])
def test_mixed_precision_trains_shampoo_with_loss_scaling_for_float16(
    tmp_path, vocab_path, policy, scaled
):
    config = tiny_config(vocab_path, "shampoo", "sync")
    config.train.mixed_precision = policy
    try:
        trainer = make_trainer(config, tmp_path)
        trainer.train(None)
        assert keras.mixed_precision.global_policy().name == policy
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert isinstance(trainer.step_optimizer, keras.optimizers.LossScaleOptimizer) == scaled
    # Steps count batches, even where loss scaling skipped an update.
    assert int(trainer.step.numpy()) == 8
    assert int(trainer.optimizer.iterations.numpy()) <= 8
    assert np.isfinite(trainer.last_train_loss)
    assert all(v.dtype == "float32" for v in trainer.model.trainable_variables)
    assert staleness(trainer.optimizer).fraction_preconditioned > 0.5


def wait_for_every_root(trainer, bridge, timeout_s: float = 60.0) -> None:
    """Installs roots as they come until every block holds one (fails after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while staleness(trainer.optimizer).fraction_preconditioned < 1.0:
        assert time.monotonic() < deadline, bridge.client.status()
        time.sleep(0.1)
        bridge.after_steps()


def test_async_mode_gets_roots_from_a_real_service_child(tmp_path, vocab_path):
    config = tiny_config(vocab_path, "shampoo", "async")
    config.train.num_steps = 12
    trainer = make_trainer(config, tmp_path)
    with trainer.preconditioning() as bridge:
        address = bridge.client.address
        assert address.startswith("127.0.0.1:")
        assert wait_for_serving(address, 5.0)
        trainer.train(bridge, until_step=4)
        # The pushes went out at steps 2 and 4; wait for every block's root to come back.
        wait_for_every_root(trainer, bridge)
        first = staleness(trainer.optimizer)
        trainer.train(bridge, until_step=12)
        status = bridge.client.status()
    assert first.fraction_preconditioned == 1.0
    assert first.max <= 4
    assert status.pushes_sent >= 2 and status.preconditioners_received > 0
    assert status.push_failures == 0 and status.blocks_rejected == 0
    assert int(trainer.optimizer.iterations.numpy()) == 12
    # The pictures: staleness and root error over blocks, and per variable how far
    # Shampoo turned the graft's step, once roots were held (summaries at 8 and 12).
    tags = summary_tags(tmp_path / "summaries")
    assert {"precond/staleness", "precond/root_error"} <= tags["histo"]
    cosines = {tag for tag in tags["simple_value"] if tag.startswith("precond/direction_cosine/")}
    assert len(cosines) == len(trainer.optimizer.direction_cosines())
    # The child is gone once the block ends.
    assert not wait_for_serving(address, 1.0)


def test_two_service_shards_started_by_the_trainer_each_serve_their_keys(tmp_path, vocab_path):
    config = tiny_config(vocab_path, "shampoo", "async")
    config.precond.shards = 2
    trainer = make_trainer(config, tmp_path)
    with trainer.preconditioning() as bridge:
        shards = bridge.client.clients
        assert len(shards) == 2 and shards[0].address != shards[1].address
        trainer.train(bridge, until_step=4)
        wait_for_every_root(trainer, bridge)
        held = [set(shard.latest()) for shard in shards]
    # Every block's root came from the shard its key hashes to; both shards served.
    assert held[0] and held[1] and not held[0] & held[1]
    assert held[0] | held[1] == set(trainer.optimizer.preconditioner_stats_steps())
    assert all(shard_of(key, 2) == index for index in (0, 1) for key in held[index])
    assert (tmp_path / "service_address").read_text().strip().count(",") == 1


def test_resume_restores_weights_optimizer_and_step(tmp_path, vocab_path):
    config = tiny_config(vocab_path, "shampoo", "sync")
    first = make_trainer(config, tmp_path)
    initial = _weights(first.model)
    first.train(None, until_step=4)
    saved = _weights(first.model)
    saved_roots = first.optimizer.preconditioner_stats_steps()
    assert first.manager.latest_checkpoint.endswith("ckpt-4")
    # Every model weight and optimizer variable is in the checkpoint (each once,
    # under whichever path reaches it first).
    stored = tf.train.list_variables(first.manager.latest_checkpoint)
    values = [name for name, _ in stored if name.endswith("VARIABLE_VALUE")]
    assert len(values) >= len(first.model.weights) + len(first.optimizer.variables)

    # The same seed initialises the new model exactly as the first one was, so a
    # weight left out of the checkpoint would still hold its initial value.
    second = make_trainer(config, tmp_path)
    assert second.restored_step == 4
    for path, start, a, b in zip(
        [v.path for v in second.model.weights], initial, saved, _weights(second.model)
    ):
        np.testing.assert_array_equal(a, b, err_msg=path)
        if "kernel" in path or "embeddings" in path:
            assert not np.array_equal(start, b), f"{path} was not trained or not restored"
    assert second.optimizer.preconditioner_stats_steps() == saved_roots
    second.train(None)
    assert int(second.optimizer.iterations.numpy()) == 8


def test_diverging_loss_stops_with_the_step_and_what_to_try(tmp_path, vocab_path):
    config = tiny_config(vocab_path, "adam", "off")
    config.train.max_loss = 1e-3
    trainer = make_trainer(config, tmp_path)
    with pytest.raises(FloatingPointError, match=r"at step 4 .*learning_rate"):
        trainer.train(None)


def test_translate_cli_and_library_use_the_newest_checkpoint(tmp_path, vocab_path):
    config = tiny_config(vocab_path, "adam", "off")
    config.train.num_steps = 4
    trained = make_trainer(config, tmp_path)
    trained.train(None)
    translator, checkpoint = load_translator(str(tmp_path), beam_size=1)
    assert checkpoint.endswith("ckpt-4")
    for a, b in zip(_weights(trained.model), _weights(translator.model)):
        np.testing.assert_array_equal(a, b)
    lines = ["twelve", "three hundred and four", ""]
    assert len(translator.translate(lines)) == 3

    completed = subprocess.run(
        [sys.executable, "-m", "trainer.translate", f"--workdir={tmp_path}"],
        input="twelve\nforty-one\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert completed.returncode == 0, completed.stderr
    assert len(completed.stdout.splitlines()) == 2
    missing = subprocess.run(
        [sys.executable, "-m", "trainer.translate", f"--workdir={tmp_path / 'nothing'}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert missing.returncode != 0
    assert "config.json does not exist" in missing.stderr


@pytest.mark.slow
def test_quickstart_command_end_to_end(tmp_path):
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "--config=configs/quickstart.py",
            f"--workdir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1200,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["dev_bleu"] > 20.0
    assert "staleness" in completed.stderr


def summary_tags(directory) -> dict[str, set[str]]:
    """Tags in the TensorBoard event files under `directory`, by summary kind."""
    tags: dict[str, set[str]] = {"histo": set(), "simple_value": set()}
    for path in directory.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                kind = value.metadata.plugin_data.plugin_name
                if kind == "histograms" or value.HasField("histo"):
                    tags["histo"].add(value.tag)
                elif kind == "scalars" or value.HasField("simple_value"):
                    tags["simple_value"].add(value.tag)
    return tags
