"""Failures a user causes: `python -m trainer` says what to fix in one line, exits 1.

Each case runs the CLI as a user does (a subprocess), on a tiny model that
shares one vocabulary; `--verbose` adds the traceback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from precond_service.client.probes import descendants
from tests.conftest import free_port, start_service_process

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


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> str:
    """`--config.data.vocab_path` of one SentencePiece model, trained by the first run."""
    return f"--config.data.vocab_path={tmp_path_factory.mktemp('vocab') / 'spm.model'}"


def test_divergence_names_the_limit_and_what_to_try_and_verbose_adds_the_traceback(tmp_path, vocab):
    flags = (vocab, "--config.precond.mode=off", "--config.train.max_loss=0.001")
    line = one_line_error(run_trainer(tmp_path / "quiet", *flags))
    assert "config.train.max_loss=0.001" in line and "config.optimizer.learning_rate" in line
    # The traceback is in train.log without --verbose, and on the console with it.
    assert "Traceback" in (tmp_path / "quiet" / "train.log").read_text()
    verbose = run_trainer(tmp_path / "verbose", *flags, "--verbose")
    assert verbose.returncode == 1
    assert "Traceback" in verbose.stderr and "FloatingPointError" in verbose.stderr
    assert verbose.stderr.rstrip().splitlines()[-1] == line


@pytest.mark.parametrize("problem", ["missing", "empty", "a directory"])
def test_a_bad_data_file_names_the_field_and_the_file(tmp_path, vocab, problem):
    path = tmp_path / "train.tsv"
    if problem == "empty":
        path.write_text("")
    elif problem == "a directory":
        path.mkdir()
    line = one_line_error(
        run_trainer(
            tmp_path / "run",
            vocab,
            "--config.precond.mode=off",
            "--config.data.source=text",
            f"--config.data.train_files={path}",
            f"--config.data.dev_files={path}",
        )
    )
    assert line.startswith(f"python -m trainer: config.data.train_files: {path}") or (
        f"config.data.train_files: file {path} does not exist" in line
    )
    expected = {"missing": "does not exist", "empty": "is empty", "a directory": "not a file"}
    assert expected[problem] in line


def test_a_vocabulary_too_small_for_the_text_names_the_field(tmp_path):
    # No vocab_path: this run trains its own vocabulary, of too few pieces.
    line = one_line_error(
        run_trainer(tmp_path, "--config.precond.mode=off", "--config.data.vocab_size=5")
    )
    assert "config.data.vocab_size=5 cannot hold" in line and "raise config.data.vocab_size" in line


def test_a_trainer_refused_by_its_service_stops_at_once_without_retrying(tmp_path, vocab):
    (tmp_path / "token").write_text("the-right-token\n")
    (tmp_path / "wrong").write_text("a-wrong-token\n")
    service, address = start_service_process(
        tmp_path / "service.log", f"--token_file={tmp_path / 'token'}"
    )
    try:
        completed = run_trainer(
            tmp_path / "run",
            vocab,
            f"--config.precond.address={address}",
            f"--config.precond.token_file={tmp_path / 'wrong'}",
        )
    finally:
        service.terminate()
        service.wait(timeout=30)
    line = one_line_error(completed)
    # Stopped at the first refusal: a refused token is not retried like an outage.
    assert "reset of run" not in (tmp_path / "run" / "train.log").read_text()
    assert "UNAUTHENTICATED" in line and "config precond.token_file" in line
    assert "a-wrong-token" not in completed.stderr


def test_an_unreachable_service_address_names_the_field(tmp_path, vocab):
    address = f"127.0.0.1:{free_port()}"
    line = one_line_error(
        run_trainer(tmp_path, vocab, f"--config.precond.address={address}", timeout_s=120)
    )
    assert f"no preconditioner service answered at {address} (config.precond.address)" in line


def test_the_delay_mode_timeout_names_its_field(tmp_path, vocab):
    service, address = start_service_process(tmp_path / "service.log")
    workers = descendants(service.pid)
    assert workers
    for pid in workers:  # The service answers, but no root is ever computed.
        os.kill(pid, signal.SIGSTOP)
    try:
        completed = run_trainer(
            tmp_path / "run",
            vocab,
            f"--config.precond.address={address}",
            "--config.precond.delay_steps=1",
            "--config.precond.delay_timeout_s=2",
        )
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        service.terminate()
        service.wait(timeout=30)
    line = one_line_error(completed)
    assert "precond.delay_timeout_s=2 s" in line and "precond.delay_steps=0" in line


def test_a_full_disk_when_checkpointing_says_so_and_keeps_the_run(tmp_path, vocab):
    # A real full disk: a tmpfs too small for a checkpoint (mounting needs root).
    workdir = tmp_path / "small_disk"
    workdir.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(workdir)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        completed = run_trainer(
            workdir, vocab, "--config.precond.mode=off", "--config.optimizer.name=adam"
        )
    finally:
        subprocess.run(["umount", "-l", str(workdir)], check=True)
    line = one_line_error(completed)
    assert f"no space left on the disk of {workdir / 'checkpoints'}" in line
    assert "free space there" in line


@pytest.mark.slow
def test_a_worker_whose_chief_dies_says_so_in_one_line(tmp_path, vocab):
    from precond_service.client.probes import free_ports

    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    command = [
        sys.executable,
        "-m",
        "trainer",
        "--config=configs/quickstart.py",
        f"--workdir={tmp_path}",
        *TINY,
        vocab,
        "--config.train.num_steps=100000",
        "--config.train.checkpoint_every_steps=100000",
        "--config.precond.mode=off",
        "--config.train.distribution=multi_worker",
    ]
    workers = [
        subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "TF_CONFIG": json.dumps(
                    {"cluster": cluster, "task": {"type": "worker", "index": index}}
                ),
            },
        )
        for index in range(2)
    ]
    try:
        log = tmp_path / "worker_1" / "train.log"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and "step " not in (
            log.read_text() if log.exists() else ""
        ):
            time.sleep(0.5)
        assert "step " in log.read_text(), "worker_1 never trained"
        workers[0].kill()  # the chief
        stderr = workers[1].communicate(timeout=300)[1]
    finally:
        for worker in workers:
            worker.kill()
    completed = subprocess.CompletedProcess(command, workers[1].returncode, "", stderr)
    line = one_line_error(completed)
    assert "worker_1 lost the other processes" in line and "chief" in line
