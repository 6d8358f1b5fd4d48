"""scripts/chaos.py end to end on a short run (slow: three trainer start-ups, about 2 minutes)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_chaos_script_kills_and_restarts_and_the_run_still_converges(tmp_path):
    out = tmp_path / "report.json"
    completed = subprocess.run(
        [
            sys.executable,
            "scripts/chaos.py",
            "--steps=150",
            "--seed=1",
            "--trainer_kills=1",
            "--service_kills=1",
            "--max_down_s=1.5",
            # Loss after 150 steps still moves with the timing of the roots.
            "--tolerance=0.5",
            f"--workdir={tmp_path / 'runs'}",
            f"--out={out}",
            "--timeout_s=600",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1500,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads(out.read_text())
    chaotic, undisturbed = report["chaotic"], report["undisturbed"]
    assert report["passed"] and chaotic["finished"] and undisturbed["finished"]
    assert chaotic["step"] == undisturbed["step"] == 150

    [kill] = chaotic["trainer_kills"]
    # Resumed from the newest checkpoint (every 20 steps) at or before the kill.
    assert kill["resumed_from_step"] is not None
    assert kill["resumed_from_step"] % 20 == 0
    assert kill["killed_after_step"] - 20 <= kill["resumed_from_step"] <= kill["killed_after_step"]

    [outage] = chaotic["service_outages"]
    assert chaotic["service_restarts"] == 1 and outage["restarted_at_step"] is not None
    # While it was down the roots in use aged past anything the undisturbed run saw.
    assert chaotic["staleness_max_peak"] > undisturbed["staleness_max_peak"]
    assert undisturbed["trainer_kills"] == [] and undisturbed["service_restarts"] == 0
    assert "PASS" in completed.stdout
