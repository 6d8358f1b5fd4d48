"""scripts.launch_job: the two halves of a job started explicitly, as on two hosts."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from precond_service.client.service_client import wait_for_serving
from tests.conftest import alive, descendants, wait_until

ROOT = Path(__file__).resolve().parents[1]
SHORT_RUN = [
    "--config=configs/quickstart.py",
    "--config.train.num_steps=20",
    "--config.train.eval_every_steps=0",
    "--config.data.numbers_train_size=2000",
    "--config.data.numbers_eval_size=20",
]


def test_service_half_and_trainer_half_meet_through_the_address_file(tmp_path):
    address_file = tmp_path / "job.address"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    service = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scripts.launch_job",
            "service",
            "--port=0",
            f"--address_file={address_file}",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        trainer = subprocess.run(
            [
                sys.executable,
                "-m",
                "scripts.launch_job",
                "trainer",
                f"--address_file={address_file}",
                "--",
                *SHORT_RUN,
                f"--workdir={tmp_path / 'run'}",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert trainer.returncode == 0, trainer.stderr[-3000:]
        address = address_file.read_text().strip()
        assert address.startswith("127.0.0.1:")
        assert f"service at {address} is SERVING" in trainer.stdout
        # The trainer used that service rather than starting its own child.
        assert f"asynchronous preconditioning: service {address}" in trainer.stderr
        assert "precond_service child" not in trainer.stderr
        assert json.loads((tmp_path / "run" / "results.json").read_text())["step"] == 20
        assert service.poll() is None  # the service outlives the trainer, as on its own host
    finally:
        service.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 30
        while service.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if service.poll() is None:
            service.kill()
    assert service.returncode == 0


def test_service_half_is_pinned_and_ends_with_its_launcher(tmp_path):
    address_file = tmp_path / "job.address"
    cpu = str(min(os.sched_getaffinity(0)))
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scripts.launch_job",
            "service",
            "--port=0",
            f"--cpus={cpu}",
            f"--address_file={address_file}",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_until(address_file.exists, 120), "no address file"
        assert wait_for_serving(address_file.read_text().strip(), 60)
        [service] = [
            pid
            for pid in descendants(launcher.pid)
            if b"precond_service" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        ]
        status = Path(f"/proc/{service}/status").read_text()
        assert f"Cpus_allowed_list:\t{cpu}\n" in status
        # A launcher killed without a chance to stop its service takes the service along.
        launcher.kill()
        launcher.wait()
        assert wait_until(lambda: not alive(service), 30)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
