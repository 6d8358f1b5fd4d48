"""scripts.chaos: its report from a trainer's event log, and a short run end to end (slow)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from precond_service.common.events import Event, EventLog
from scripts.chaos import targets
from scripts.chaos_report import (
    ServiceOutage,
    TrainerEvents,
    TrainerKill,
    both_runs_report,
    job_report,
)

ROOT = Path(__file__).resolve().parents[1]


def write_run(path: Path, *, dev_loss: float, killed: bool) -> None:
    """The events of a 40-step run, as the trainer writes them; `killed`: once after step 30."""
    with EventLog(path) as events:
        events.write(Event.STARTED, step=0, resumed=False)
        events.write(Event.PROGRESS, step=10, loss=2.0, step_ms=5.0, **staleness(None))
        events.write(Event.CHECKPOINT_SAVED, step=20, path="ckpt-20")
        events.write(Event.PROGRESS, step=20, loss=1.5, step_ms=5.0, **staleness((0, 5, 10)))
        if killed:
            events.write(Event.PROGRESS, step=30, loss=1.2, step_ms=5.0, **staleness((10, 15, 30)))
            events.write(Event.STARTED, step=20, resumed=True)
            events.write(Event.RESUMED, step=20, checkpoint="ckpt-20")
            events.write(Event.SERVICE_RESTART_SEEN, step=24, restarts_seen=1)
        events.write(Event.PROGRESS, step=30, loss=1.1, step_ms=5.0, **staleness((0, 4, 20)))
        events.write(Event.PROGRESS, step=40, loss=1.0, step_ms=5.0, **staleness((0, 5, 10)))
        events.write(Event.EVALUATED, step=40, split="dev", loss=dev_loss, bleu=12.5)
        events.write(Event.FINISHED, step=40)


def staleness(held: tuple[float, float, float] | None) -> dict:
    names = ("staleness_min", "staleness_mean", "staleness_max")
    return dict(zip(names, held or (None, None, None)))


@pytest.mark.parametrize(("chaotic_dev_loss", "passed"), [(1.05, True), (1.2, False)])
def test_report_is_read_from_the_trainer_events(tmp_path, chaotic_dev_loss, passed):
    write_run(tmp_path / "chaotic" / "events.jsonl", dev_loss=chaotic_dev_loss, killed=True)
    write_run(tmp_path / "undisturbed" / "events.jsonl", dev_loss=1.0, killed=False)
    common = {"steps": 40, "failure": None, "wall_s": 1.0, "service_exits_not_by_chaos": 0}
    chaotic = job_report(
        TrainerEvents(tmp_path / "chaotic" / "events.jsonl"),
        trainer_kills=[TrainerKill(killed_after_step=30)],
        outages=[ServiceOutage(killed_after_step=22, down_s=1.0, restarted_at_step=24)],
        service_restarts=1,
        **common,
    )
    undisturbed = job_report(
        TrainerEvents(tmp_path / "undisturbed" / "events.jsonl"),
        trainer_kills=[],
        outages=[],
        service_restarts=0,
        **common,
    )
    assert chaotic.finished and chaotic.step == 40 and chaotic.dev_loss == chaotic_dev_loss
    assert chaotic.trainer_kills == [TrainerKill(killed_after_step=30, resumed_from_step=20)]
    assert chaotic.steps_trained_again == 10 and undisturbed.steps_trained_again == 0
    assert (chaotic.restarts_seen_by_client, undisturbed.restarts_seen_by_client) == (1, 0)
    assert chaotic.staleness_max_peak == 30 and undisturbed.staleness_max_peak == 20
    assert chaotic.progress_without_roots == 1 and chaotic.train_loss == 1.0

    report = both_runs_report(chaotic, undisturbed, {"seed": 3}, tolerance=0.1)
    assert report["seed"] == 3 and report["passed"] is passed
    # The same criteria as targets: each met where the verdict passes.
    rows = targets(chaotic, undisturbed, tolerance=0.1)
    excess = rows["chaotic run's final dev loss over the undisturbed run's, relative"]
    assert excess["threshold"] == "<= 0.1" and excess["met"] is passed
    assert excess["value"] == pytest.approx(chaotic_dev_loss - 1.0)
    assert rows["chaotic run finished"]["met"] and rows["undisturbed run finished"]["met"]
    # An outage whose roots never came back is a warning, not a failure.
    assert any(
        "no fresh root came after the service restart at step 24" in w for w in report["warnings"]
    )
    json.dumps(report)


def test_run_without_a_finished_event_fails(tmp_path):
    path = tmp_path / "events.jsonl"
    with EventLog(path) as events:
        events.write(Event.STARTED, step=0, resumed=False)
        events.write(Event.PROGRESS, step=10, loss=2.0, step_ms=5.0, **staleness(None))
    common = {"steps": 40, "wall_s": 1.0, "trainer_kills": [], "outages": []}
    broken = job_report(
        TrainerEvents(path),
        failure=None,
        service_restarts=0,
        service_exits_not_by_chaos=0,
        **common,
    )
    assert not broken.finished and "no FINISHED event at step 40" in broken.failure
    report = both_runs_report(broken, broken, {}, tolerance=0.1)
    assert not report["passed"]
    rows = targets(broken, broken, tolerance=0.1)
    assert rows["chaotic run finished"] == {"value": 0, "threshold": ">= 1", "met": False}
    assert report["problems"][0].startswith("the chaotic run did not finish")


@pytest.mark.slow
def test_chaos_script_kills_and_restarts_and_the_run_still_converges(tmp_path):
    out = tmp_path / "report.json"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.chaos",
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
    written = json.loads(out.read_text())
    assert written["benchmark"] == "chaos" and written["metadata"]["split"]["service_workers"] == 1
    # The verdict's criteria, each a target the run met.
    targets = written["targets"]
    assert targets["chaotic run finished"] == {"value": 1, "threshold": ">= 1", "met": True}
    excess = targets["chaotic run's final dev loss over the undisturbed run's, relative"]
    assert excess["threshold"] == "<= 0.5" and excess["met"]
    assert all(row["met"] for row in targets.values())
    report = written["results"]
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
