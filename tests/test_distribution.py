"""Data parallelism: `mirrored` over 2 logical CPU devices trains as one device does.

Logical devices can only be made before TensorFlow starts, so each run is its own
process: this file, run as a script, trains a tiny config and saves its state.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _config(vocab_path: str, overrides: dict):
    from tests.test_trainer import tiny_config

    config = tiny_config(vocab_path, overrides.pop("optimizer"), overrides.pop("mode"))
    # A ridge well above float32 rounding: roots of rank-deficient statistics are
    # then set by the statistics, not by the rounding of their null directions.
    config.optimizer.shampoo.matrix_epsilon = 1e-3
    for field, value in overrides.items():
        section, name = field.split(".")
        config[section][name] = value
    return config


def _train(vocab_path: str, out: str, overrides: dict) -> None:
    """Trains 3 updates of the tiny config with `overrides`; saves every variable to `out`."""
    from trainer.process_setup import setup_process
    from trainer.train import Trainer

    config = _config(vocab_path, overrides)
    setup_process(config)
    trainer = Trainer(config, str(Path(out).parent / "workdir"))
    trainer.run_steps(None, 3)
    replicas = trainer.strategy.num_replicas_in_sync
    state, names = {}, []
    for index, variable in enumerate(
        [*trainer.model.trainable_variables, *trainer.optimizer.variables]
    ):
        # Every replica's copy, to show they are equal.
        copies = trainer.strategy.experimental_local_results(getattr(variable, "value", variable))
        for replica, copy in enumerate(copies):
            state[f"{index}/{replica}"] = copy.numpy()
        names.append(variable.path)
    np.savez(out, replicas=replicas, names=np.array(names), **state)


def _run(tmp_path: Path, name: str, vocab_path: str, overrides: dict) -> dict[str, np.ndarray]:
    out = tmp_path / name / "state.npz"
    out.parent.mkdir()
    command = [sys.executable, __file__, vocab_path, str(out), json.dumps(overrides)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(out))


@pytest.mark.parametrize("optimizer", [pytest.param("adam", marks=pytest.mark.slow), "shampoo"])
def test_mirrored_over_two_devices_equals_one_device_with_the_same_global_batch(
    tmp_path, optimizer
):
    vocab_path = str(tmp_path / "spm.model")
    common = {"optimizer": optimizer, "mode": "sync" if optimizer == "shampoo" else "off"}
    # One device: 2 micro-batches of 256 tokens per update. Two replicas: one each.
    single = _run(
        tmp_path,
        "single",
        vocab_path,
        {**common, "data.tokens_per_batch": 256, "train.accumulate_steps": 2},
    )
    mirrored = _run(
        tmp_path,
        "mirrored",
        vocab_path,
        {
            **common,
            "data.tokens_per_batch": 512,
            "train.distribution": "mirrored",
            "train.virtual_cpu_devices": 2,
        },
    )

    assert int(single.pop("replicas")) == 1 and int(mirrored.pop("replicas")) == 2
    names = list(single.pop("names"))
    assert names == list(mirrored.pop("names"))
    indices = {key.split("/")[0] for key in single}
    assert len(indices) > 10
    mirrored_copies = 0
    for index in indices:
        first = mirrored[f"{index}/0"]
        if f"{index}/1" in mirrored:  # (a counter like `iterations` has one copy)
            np.testing.assert_array_equal(first, mirrored[f"{index}/1"])  # never diverge
            mirrored_copies += 1
        expected = single[f"{index}/0"]
        scale = float(np.abs(expected).max()) if expected.size else 0.0
        # Summation order differs (all-reduce vs accumulation): float rounding.
        np.testing.assert_allclose(first, expected, rtol=2e-4, atol=2e-5 * scale + 1e-7)
    assert mirrored_copies >= len(indices) - 3


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _train(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
