"""`python -m trainer` as a user runs it: Ctrl-C, the service address file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from precond_service.common.events import Event, read_events
from tests.conftest import alive, wait_until

ROOT = Path(__file__).resolve().parents[1]


def test_ctrl_c_saves_says_one_line_exits_130_and_stops_the_service(tmp_path):
    workdir = tmp_path / "run"
    log_path = tmp_path / "stderr.txt"
    command = [
        sys.executable,
        "-m",
        "trainer",
        "--config=configs/quickstart.py",
        f"--workdir={workdir}",
        "--config.train.num_steps=100000",
        "--config.train.log_every_s=0.1",
        "--config.data.numbers_train_size=2000",
    ]
    with open(log_path, "w") as stderr:
        # Its own process group, as a job in a terminal: Ctrl-C signals the group.
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
        )
    events = workdir / "events.jsonl"
    try:
        assert wait_until(lambda: read_events(events, Event.PROGRESS), timeout_s=300)
        (child,) = read_events(events, Event.CHILD_STARTED)
        os.killpg(process.pid, signal.SIGINT)
        status = process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    stderr_text = log_path.read_text()

    assert status == 130, stderr_text[-3000:]
    assert "Traceback" not in stderr_text
    (line,) = [line for line in stderr_text.splitlines() if "interrupted at step" in line]
    (interrupted,) = read_events(events, Event.INTERRUPTED)
    saved = read_events(events, Event.CHECKPOINT_SAVED)[-1]
    assert saved["step"] == interrupted["step"] and saved["path"] in line
    assert Path(saved["path"] + ".index").is_file()
    # The service child got no signal of its own (its own session); the trainer
    # stopped it, and its supervisor neither reported a crash nor restarted it.
    assert not alive(child["pid"])
    assert not read_events(events, Event.CHILD_RESTARTED)
    assert (workdir / "service_address").read_text().strip() == child["address"]
