"""Failures a user causes: `python -m trainer` says what to fix in one line, exits 1.

Each case runs the CLI as a user does (a subprocess), on a tiny model that
shares one vocabulary; `--verbose` adds the traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The quickstart config shrunk to a model that builds and steps in seconds.
TINY = (
    "--config.data.numbers_train_size=2000",
    "--config.data.numbers_eval_size=20",
    "--config.data.numbers_max=99999",
    "--config.data.vocab_train_sentences=4000",
    "--config.data.tokens_per_batch=256",
    "--config.data.shuffle_buffer=500",
    "--config.model.num_layers=1",
    "--config.model.d_model=32",
    "--config.model.num_heads=2",
    "--config.model.d_ff=64",
    "--config.train.num_steps=4",
    "--config.train.steps_per_loop=2",
    "--config.train.eval_every_steps=0",
    "--config.train.checkpoint_every_steps=4",
    "--config.train.log_every_s=0",
    "--config.optimizer.shampoo.start_preconditioning_step=1",
    "--config.optimizer.shampoo.block_size=32",
    "--config.precond.update_steps=2",
    "--config.precond.pull_interval_s=0.1",
)


def run_trainer(
    workdir: Path, *flags: str, timeout_s: float = 180, cpus: set[int] | None = None
) -> subprocess.CompletedProcess:
    """`python -m trainer --config=configs/quickstart.py` with TINY and `flags`, captured."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "--config=configs/quickstart.py",
            f"--workdir={workdir}",
            *TINY,
            *flags,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
    )


def one_line_error(completed: subprocess.CompletedProcess) -> str:
    """The error line of a run that failed as a user's mistake should: status 1, no traceback."""
    assert completed.returncode == 1, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr, completed.stderr[-3000:]
    last = completed.stderr.rstrip().splitlines()[-1]
    assert last.startswith("python -m trainer: "), completed.stderr[-3000:]
    return last


@pytest.mark.parametrize("field", ["train.device_cpus", "precond.host_cpus"])
def test_a_cpu_outside_the_affinity_is_refused_naming_the_field_and_the_allowed_cpus(
    tmp_path, field
):
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs two CPUs: one to run on, one outside its affinity")
    # The machine has the CPU, but the trainer may not use it.
    completed = run_trainer(tmp_path, f"--config.{field}={allowed[1]}", cpus={allowed[0]})
    line = one_line_error(completed)
    assert f"config.{field}" in line
    assert f"choose among {allowed[0]} " in line
