"""The README's Keras example (examples/keras_fit.py) against a real local service."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_keras_fit_example_trains_and_reports_staleness() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "keras_fit.py"), "--epochs=3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loss"][-1] < 0.7 * result["loss"][0]
    # Roots arrived from the service child and are in use, a few steps old.
    assert result["preconditioned_fraction"][-1] == 1.0
    assert 0 <= result["staleness_mean"][-1] <= result["staleness_max"][-1] < 100
