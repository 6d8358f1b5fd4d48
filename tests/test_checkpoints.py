"""Checkpoints never lose a run: a changed config is refused before anything moves.

Damage (the four kinds in test_trainer_reliability.py) is set aside; a config or
a checkpoint that does not fit the run is refused, and the files stay as they
were; `train.restart=True` moves the earlier run to `previous/`, never deletes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from precond_service.common.events import Event, read_events
from tests.test_config import ROOT, load_config_file
from tests.test_trainer import make_trainer, tiny_config
from trainer import checkpoints
from trainer import config as config_lib


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory):
    """One SentencePiece model shared by the module's runs (trained by the first)."""
    return str(tmp_path_factory.mktemp("vocab") / "spm.model")


def _config(vocab_path: str, num_steps: int = 4):
    config = tiny_config(vocab_path, "adam", "off")
    config.train.update(num_steps=num_steps, checkpoint_every_steps=2, keep_checkpoints=5)
    return config


def _trained(workdir: Path, vocab_path: str) -> None:
    make_trainer(_config(vocab_path), workdir).train(None)


def _files(workdir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(workdir)): p.read_bytes() for p in workdir.rglob("*") if p.is_file()}


def test_changed_model_is_refused_naming_the_field_and_nothing_moves(tmp_path, vocab_path):
    _trained(tmp_path, vocab_path)
    before = _files(tmp_path)
    changed = _config(vocab_path)
    changed.model.d_model = 64
    changed.optimizer.learning_rate = 2e-3
    with pytest.raises(checkpoints.ResumeRefusedError) as refused:
        make_trainer(changed, tmp_path)
    message = str(refused.value)
    assert "model.d_model: 32 -> 64" in message
    assert "optimizer.learning_rate: 0.001 -> 0.002" in message
    assert "--config.train.restart=True" in message and "new --workdir" in message
    assert _files(tmp_path) == before  # config.json, checkpoints, events: byte-identical


def test_allowed_change_resumes(tmp_path, vocab_path):
    _trained(tmp_path, vocab_path)
    longer = _config(vocab_path, num_steps=6)
    longer.train.log_every_s = 100.0
    longer.decode.beam_size = 1
    trainer = make_trainer(longer, tmp_path)
    assert trainer.restored_step == 4
    trainer.train(None)
    assert int(trainer.step.numpy()) == 6
    assert json.loads((tmp_path / "config.json").read_text())["train"]["num_steps"] == 6


def test_restart_moves_the_earlier_run_to_previous(tmp_path, vocab_path):
    _trained(tmp_path, vocab_path)
    old_config = (tmp_path / "config.json").read_bytes()
    old_checkpoints = _files(tmp_path / checkpoints.CHECKPOINT_DIR)
    changed = _config(vocab_path)
    changed.model.d_model = 64
    changed.train.restart = True
    trainer = make_trainer(changed, tmp_path)
    assert trainer.restored_step == 0
    (moved,) = (tmp_path / checkpoints.PREVIOUS_DIR).iterdir()
    assert (moved / "config.json").read_bytes() == old_config
    assert _files(moved / checkpoints.CHECKPOINT_DIR) == old_checkpoints
    assert json.loads((tmp_path / "config.json").read_text())["model"]["d_model"] == 64
    started = read_events(tmp_path / "events.jsonl", Event.STARTED)
    assert [e["resumed"] for e in started] == [False, False]


def test_checkpoint_that_does_not_fit_is_refused_and_nothing_moves(tmp_path, vocab_path):
    _trained(tmp_path, vocab_path)
    # A config.json that agrees with the new config, over checkpoints that do not:
    # the restore itself finds the mismatch (as after a code change).
    changed = _config(vocab_path)
    changed.model.d_ff = 128
    written = json.loads((tmp_path / "config.json").read_text())
    written["model"]["d_ff"] = 128
    (tmp_path / "config.json").write_text(json.dumps(written))
    before = _files(tmp_path)
    with pytest.raises(RuntimeError, match=r"ckpt-4 does not fit .*Nothing was moved"):
        make_trainer(changed, tmp_path)
    assert _files(tmp_path) == before  # config.json kept, nothing set aside
    assert not (tmp_path / checkpoints.CHECKPOINT_DIR / checkpoints.CORRUPT_DIR).exists()


def test_config_differences_skip_resumable_and_unknown_fields():
    old = config_lib.default_config().to_dict()
    new = config_lib.default_config()
    new.train.num_steps = 7
    new.decode.beam_size = 1
    new.precond.address = "host:1"
    assert config_lib.config_differences(old, new.to_dict()) == {}
    new.seed = 3
    new.precond.mode = "sync"
    new.data.vocab_size = 100
    assert config_lib.config_differences(old, new.to_dict()) == {
        "data.vocab_size": (32_000, 100),
        "precond.mode": ("async", "sync"),
        "seed": (0, 3),
    }
    del old["optimizer"]["shampoo"]["root_method"]  # a config.json from before the field
    new = config_lib.default_config()
    new.optimizer.shampoo.root_method = "eigh"
    assert config_lib.config_differences(old, new.to_dict()) == {}


def test_every_resumable_field_exists():
    fields = config_lib.flatten_fields(config_lib.default_config().to_dict())
    for allowed in config_lib.RESUMABLE_FIELDS:
        assert any(f == allowed or f.startswith(allowed) for f in fields), allowed


def test_cli_refuses_a_changed_config_with_the_fields_and_the_way_out(tmp_path):
    config = load_config_file("quickstart")
    checkpoints.write_config(config, str(tmp_path))
    before = (tmp_path / "config.json").read_bytes()
    d_model = config.model.d_model
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "--config=configs/quickstart.py",
            f"--workdir={tmp_path}",
            f"--config.model.d_model={2 * d_model}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert completed.returncode != 0
    assert f"model.d_model: {d_model} -> {2 * d_model}" in completed.stderr
    assert "--config.train.restart=True" in completed.stderr
    assert (tmp_path / "config.json").read_bytes() == before
    assert not (tmp_path / checkpoints.CHECKPOINT_DIR).exists()
