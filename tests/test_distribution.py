"""Data parallelism: `mirrored` and `multi_worker` train as one device does.

Logical devices and collective ops can only be set up before TensorFlow starts, so
each run is its own process: this file, run as a script, trains a tiny config and
saves its state. `multi_worker` runs two such processes, configured by TF_CONFIG on
loopback, with roots from the preconditioner service that the chief starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from precond_service.client.probes import free_ports

ROOT = Path(__file__).resolve().parents[1]


def _config(vocab_path: str, overrides: dict):
    from tests.test_trainer import tiny_config

    config = tiny_config(vocab_path, overrides.pop("optimizer"), overrides.pop("mode"))
    # A ridge well above float32 rounding: roots of rank-deficient statistics are
    # then set by the statistics, not by the rounding of their null directions.
    config.optimizer.shampoo.matrix_epsilon = 1e-3
    for field, value in overrides.items():
        *sections, name = field.split(".")
        node = config
        for section in sections:
            node = node[section]
        node[name] = value
    return config


def _train(vocab_path: str, out: str, overrides: dict, job: bool) -> None:
    """Trains the tiny config with `overrides`; saves every variable to `out`.

    Three updates without host work; or (`job`) the whole run to train.num_steps
    as `python -m trainer` trains it, with the service's roots.
    """
    from trainer.process_setup import setup_process
    from trainer.train import Trainer

    config = _config(vocab_path, overrides)
    setup_process(config)
    trainer = Trainer(config, str(Path(out).parent.parent / "workdir"))
    if job:
        with trainer.preconditioning() as bridge:
            trainer.train(bridge)
    else:
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


def _command(out: Path, vocab_path: str, overrides: dict, job: bool) -> list[str]:
    out.parent.mkdir(parents=True)
    return [sys.executable, __file__, vocab_path, str(out), json.dumps(overrides), str(int(job))]


def _run(
    tmp_path: Path, name: str, vocab_path: str, overrides: dict, job: bool = False
) -> dict[str, np.ndarray]:
    out = tmp_path / name / "run" / "state.npz"
    command = _command(out, vocab_path, overrides, job)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(out))


def _run_workers(
    tmp_path: Path, name: str, vocab_path: str, overrides: dict, workers: int
) -> list[dict[str, np.ndarray]]:
    """Runs the job in `workers` processes of one multi-worker cluster on loopback."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(workers)]}
    processes, outs = [], []
    for index in range(workers):
        out = tmp_path / name / f"worker{index}" / "state.npz"
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        processes.append(
            subprocess.Popen(
                _command(out, vocab_path, overrides, job=True),
                cwd=ROOT,
                env=dict(os.environ, TF_CONFIG=json.dumps(tf_config)),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
        outs.append(out)
    try:
        errors = [process.communicate(timeout=600)[1] for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, error in zip(processes, errors):
        assert process.returncode == 0, error[-3000:]
    return [dict(np.load(out)) for out in outs]


def _assert_like_one_device(
    single: dict,
    parallel: dict,
    replicas: int,
    unstable: tuple[str, ...] = (),
    rtol: float = 2e-4,
) -> tuple[int, int]:
    """`parallel`'s replicas hold equal copies, each equal to `single`'s to float rounding.

    Variables whose name contains one of `unstable` are only checked for equal copies:
    an eigenbasis, and Adam's second moment in it, turn within a cluster of close
    eigenvalues under the rounding that separates the two runs, far beyond it; the
    weights then differ by more than rounding too (`rtol`).

    Returns:
        How many variables have a copy per replica, and how many were compared.
    """
    assert int(single.pop("replicas")) == 1 and int(parallel.pop("replicas")) == replicas
    names = list(single.pop("names"))
    assert names == list(parallel.pop("names"))
    indices = {key.split("/")[0] for key in single}
    assert len(indices) > 10
    copies = 0
    for index in indices:
        first = parallel[f"{index}/0"]
        if f"{index}/1" in parallel:  # (a counter like `iterations` has one copy)
            np.testing.assert_array_equal(first, parallel[f"{index}/1"])  # never diverge
            copies += 1
        if any(part in str(names[int(index)]) for part in unstable):
            continue
        expected = single[f"{index}/0"]
        scale = float(np.abs(expected).max()) if expected.size else 0.0
        # Summation order differs (all-reduce vs accumulation): float rounding.
        np.testing.assert_allclose(first, expected, rtol=rtol, atol=rtol / 10 * scale + 1e-7)
    return copies, len(indices)


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

    copies, variables = _assert_like_one_device(single, mirrored, replicas=2)
    assert copies >= variables - 3


@pytest.mark.parametrize(
    "preconditioner", ["root", pytest.param("eigenbasis", marks=pytest.mark.slow)]
)
def test_multi_worker_processes_stay_bitwise_equal_with_async_roots(
    tmp_path, preconditioner
) -> None:
    vocab_path = str(tmp_path / "spm.model")
    # The repeatable mode: roots of the statistics of step t are installed at exactly
    # t + 1, so that the runs can be compared with each other.
    common = {
        "optimizer": "shampoo",
        "mode": "async",
        "precond.delay_steps": 1,
        "precond.host_cpus": "",
        "optimizer.shampoo.preconditioner": preconditioner,
    }
    single = _run(
        tmp_path,
        "single",
        vocab_path,
        {**common, "data.tokens_per_batch": 256, "train.accumulate_steps": 2},
        job=True,
    )
    workers = _run_workers(
        tmp_path,
        "multi",
        vocab_path,
        {**common, "data.tokens_per_batch": 512, "train.distribution": "multi_worker"},
        workers=2,
    )
    first, second = workers
    # Each worker holds one replica: the two processes' copies must be the same bits,
    # roots included (only the chief talks to the service).
    assert set(first) == set(second)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    # A held eigenbasis is not the identity it starts as; a held root is not zero.
    roots = [
        index
        for index, name in enumerate(first["names"])
        if "_root_g" in str(name)
        and not np.array_equal(first[f"{index}/0"], _initial(first[f"{index}/0"], preconditioner))
    ]
    assert roots, "no root was installed"
    _assert_like_one_device(
        single,
        first,
        replicas=2,
        **(
            {"unstable": ("_root_g", "_v_g"), "rtol": 1e-2}
            if preconditioner == "eigenbasis"
            else {}
        ),
    )
    workdir = tmp_path / "multi" / "workdir"
    assert (workdir / "checkpoints").is_dir() and (workdir / "worker_1" / "checkpoints").is_dir()
    assert not (workdir / "worker_1" / "summaries").exists()


def _initial(value: np.ndarray, preconditioner: str) -> np.ndarray:
    """What a preconditioner variable holds before any is installed."""
    if preconditioner == "eigenbasis":
        return np.broadcast_to(np.eye(value.shape[-1], dtype=value.dtype), value.shape)
    return np.zeros_like(value)


def test_worker_role_comes_from_tf_config(monkeypatch) -> None:
    from trainer.config import default_config
    from trainer.distribution import WorkerRole, worker_role

    config = default_config()
    assert worker_role(config) == WorkerRole()  # not multi_worker: the only process
    config.train.distribution = "multi_worker"
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs the environment variable TF_CONFIG.*unset"):
        worker_role(config)
    cluster = {"chief": ["h0:1"], "worker": ["h1:1", "h2:1"]}
    for task, expected in (
        ({"type": "chief", "index": 0}, WorkerRole("chief_0", 0, 3, True)),
        ({"type": "worker", "index": 1}, WorkerRole("worker_1", 2, 3, False)),
    ):
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": task}))
        assert worker_role(config) == expected
    assert WorkerRole("worker_1", 2, 3, False).workdir("/w") == "/w/worker_1"
    assert WorkerRole("chief_0", 0, 3, True).workdir("/w") == "/w"
    for tf_config, words in (
        ("{not json", "could not read it"),
        (
            {"cluster": {"ps": ["h:1"], "worker": ["h:2"]}, "task": {"type": "worker", "index": 0}},
            "may name one 'chief'",
        ),
        (
            {"cluster": {"worker": ["h:1"]}, "task": {"type": "worker", "index": 3}},
            "task index 3 is not among its 1 'worker' tasks",
        ),
    ):
        raw = tf_config if isinstance(tf_config, str) else json.dumps(tf_config)
        monkeypatch.setenv("TF_CONFIG", raw)
        with pytest.raises(ValueError, match=words):
            worker_role(config)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _train(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), job=sys.argv[4] == "1")
