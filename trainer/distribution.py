"""Data parallelism with TensorFlow's own engine: `train.distribution` as a tf.distribute.Strategy.

- "none": the default strategy, one device.
- "mirrored": `tf.distribute.MirroredStrategy` over every local GPU; on a host
  without GPUs over the `train.virtual_cpu_devices` logical CPU devices that
  `split_cpu` made (a CPU-only stand-in for tests and correctness runs).
- "multi_worker": `tf.distribute.MultiWorkerMirroredStrategy` over the processes
  `TF_CONFIG` names (`worker_role`), started by `process_setup.setup_process` before
  TensorFlow's runtime. Every process runs the same command; each reads every W-th
  batch of the same input pipeline (its own iterator, checkpointed with it).

The training step (trainer/step_fn.py) runs in each replica on its share of the
global batch. It all-reduces the gradients itself, so that the non-finite check
and clipping see the global gradient and every replica takes the same branch, and
applies them once in cross-replica context, where Keras's own all-reduce is
skipped and each replica's copy of every variable gets the same update. Shampoo's
statistics are therefore computed from the all-reduced gradient and are equal on
every replica; roots from the service are assigned in cross-replica context, so
every local replica installs them at the same step. Across workers only the chief
talks to the service: `RootBroadcast` copies the roots it installed to every
worker through a collective at the same loop boundary, which every worker reaches
at the same step (the loop boundaries of a multi-worker run depend on the step
alone).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence

import ml_collections
import tensorflow as tf

from trainer import checkpoints

log = logging.getLogger(__name__)

# The strategy of "multi_worker", made once per process (`start_multi_worker`).
_multi_worker: tf.distribute.MultiWorkerMirroredStrategy | None = None

_TF_CONFIG_EXAMPLE = (
    'TF_CONFIG=\'{"cluster": {"worker": ["host1:2222", "host2:2222"]}, '
    '"task": {"type": "worker", "index": 0}}\''
)


@dataclasses.dataclass(frozen=True)
class WorkerRole:
    """This process's place in a multi-worker job (one worker of one in the others).

    Attributes:
        task: "type_index" from TF_CONFIG ("worker_1"); "" outside multi_worker.
        index: Position among the job's processes, the chief's 0.
        count: Processes in the job.
        is_chief: Whether this process evaluates, writes summaries and results,
            and talks to the preconditioner service.
    """

    task: str = ""
    index: int = 0
    count: int = 1
    is_chief: bool = True

    def workdir(self, workdir: str) -> str:
        """This process's own directory: the workdir for the chief, a subdirectory otherwise.

        A worker's checkpoints (its input position with them), events and log go
        there, so that workers sharing one filesystem never write the same files.
        """
        return workdir if self.is_chief else os.path.join(workdir, self.task)


def worker_role(config: ml_collections.ConfigDict) -> WorkerRole:
    """This process's role, from TF_CONFIG under "multi_worker" (the only one otherwise).

    Raises:
        ValueError: TF_CONFIG is missing or malformed, or names task types other
            than "chief" and "worker".
    """
    if config.train.distribution != "multi_worker":
        return WorkerRole()
    raw = os.environ.get("TF_CONFIG", "")
    try:
        tf_config = json.loads(raw)
        cluster, task = tf_config["cluster"], tf_config["task"]
        task_type, task_index = task["type"], int(task["index"])
        chiefs, workers = list(cluster.get("chief", [])), list(cluster.get("worker", []))
        unknown = set(cluster) - {"chief", "worker"}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            "config.train.distribution='multi_worker' needs the environment variable "
            f"TF_CONFIG naming the cluster and this process's task, e.g. {_TF_CONFIG_EXAMPLE} "
            f"({'unset' if not raw else f'could not read it: {e!r}'})"
        ) from None
    if unknown or task_type not in ("chief", "worker") or len(chiefs) > 1:
        raise ValueError(
            "TF_CONFIG for config.train.distribution='multi_worker' may name one 'chief' "
            f"and any number of 'worker' tasks, and this task must be one of them; got the "
            f"cluster {sorted(cluster)} and the task {task_type!r}"
        )
    members = len(chiefs) if task_type == "chief" else len(workers)
    if not 0 <= task_index < members:
        raise ValueError(
            f"TF_CONFIG's task index {task_index} is not among its {members} {task_type!r} tasks"
        )
    index = task_index + (len(chiefs) if task_type == "worker" else 0)
    return WorkerRole(
        task=f"{task_type}_{task_index}",
        index=index,
        count=len(chiefs) + len(workers),
        is_chief=index == 0,
    )


def start_multi_worker(config: ml_collections.ConfigDict) -> None:
    """Makes the "multi_worker" strategy (once per process); does nothing otherwise.

    Call it before TensorFlow's runtime starts: collective ops are configured then.

    Raises:
        ValueError: TF_CONFIG does not describe a job (`worker_role`).
    """
    global _multi_worker
    if config.train.distribution != "multi_worker" or _multi_worker is not None:
        return
    worker_role(config)  # A clear error before TensorFlow reads TF_CONFIG itself.
    _multi_worker = tf.distribute.MultiWorkerMirroredStrategy()


def split_cpu(count: int) -> None:
    """Splits the first CPU into `count` logical devices (0 or 1: leaves it whole).

    Call it before TensorFlow's runtime starts (before the first op).

    Raises:
        RuntimeError: The runtime already started with another split.
    """
    if count <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
    try:
        tf.config.set_logical_device_configuration(cpu, wanted)
    except RuntimeError as e:
        if len(tf.config.list_logical_devices("CPU")) != count:
            raise RuntimeError(
                f"config.train.virtual_cpu_devices={count} must be set before TensorFlow "
                f"starts: call trainer.process_setup.setup_process(config) first ({e})"
            ) from None


def make_strategy(config: ml_collections.ConfigDict) -> tf.distribute.Strategy:
    """The strategy `train.distribution` names.

    Raises:
        ValueError: "mirrored" on a CPU-only host without `train.virtual_cpu_devices`
            set up (it would have one replica, which "none" does better).
    """
    if config.train.distribution == "none":
        return tf.distribute.get_strategy()
    if config.train.distribution == "multi_worker":
        if _multi_worker is None:
            raise ValueError(
                "config.train.distribution='multi_worker' needs its strategy made before "
                "TensorFlow starts: call trainer.process_setup.setup_process(config) first"
            )
        return _multi_worker
    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in gpus or tf.config.list_logical_devices("CPU")]
    if len(devices) < 2:
        raise ValueError(
            "config.train.distribution='mirrored' found one device: on a host without "
            "GPUs set config.train.virtual_cpu_devices >= 2 (logical CPU devices)"
        )
    return tf.distribute.MirroredStrategy(devices=devices)


def replica_batch_tokens(config: ml_collections.ConfigDict, replicas: int) -> int:
    """Each replica's share of `data.tokens_per_batch` (the global budget of one micro-batch).

    Raises:
        ValueError: The share would not hold one example of `data.max_length`.
    """
    share = config.data.tokens_per_batch // replicas
    if share < config.data.max_length:
        raise ValueError(
            f"config.data.tokens_per_batch={config.data.tokens_per_batch} split over {replicas} "
            f"replicas leaves {share} tokens each, less than one example of "
            f"config.data.max_length={config.data.max_length}: raise tokens_per_batch"
        )
    return share


def check_same_step(strategy: tf.distribute.Strategy, role: WorkerRole, step: int) -> None:
    """Refuses to train unless every worker of a multi-worker job restored `step`.

    Each worker restores its own newest checkpoint; after a crash between the
    chief's save and another's they differ, and the replicas would diverge.

    Raises:
        checkpoints.ResumeRefusedError: The workers' steps differ (every worker raises it:
            the sum of squares tells each of them, not only those off the mean).
    """

    def replica_fn() -> tf.Tensor:
        context = tf.distribute.get_replica_context()
        mine = tf.constant([float(step), float(step) ** 2], tf.float64)
        return context.all_reduce(tf.distribute.ReduceOp.SUM, mine)

    total, squares = strategy.experimental_local_results(strategy.run(replica_fn))[0].numpy()
    replicas = strategy.num_replicas_in_sync
    # All equal exactly when their variance is 0 (exact in float64 below 2^26 steps).
    if replicas * squares != total * total:
        raise checkpoints.ResumeRefusedError(
            f"this worker ({role.task}) restored step {step}, but the job's workers restored "
            f"different steps (mean {total / replicas:g}): start every worker from the same "
            "checkpoint step (each worker's newest checkpoint is in its own checkpoints "
            "directory; move newer ones of some workers aside by hand)"
        )


class RootBroadcast:
    """Copies the chief's preconditioner roots to every worker ("multi_worker").

    Every worker calls it at the same loop boundary, the chief with the number of
    roots it has just installed, the others with 0: a first all-reduce tells all
    of them whether any were; if so, a second sums every root variable with the
    chief's replica giving its values and every other replica zeros, which
    reproduces the chief's bits exactly (x + 0 = x), and every worker assigns the
    result. Workers thus hold the chief's roots from the same step on.
    """

    def __init__(self, strategy: tf.distribute.Strategy, variables: Sequence[object]) -> None:
        """Prepares the collectives.

        Args:
            strategy: The multi-worker strategy.
            variables: The root variables and their stats_step variables (all the
                host installs), created under `strategy`.
        """
        self._strategy = strategy
        self._variables = list(variables)
        self._count = tf.function(self._sum_count)
        self._copy = tf.function(self._copy_from_chief)

    def __call__(self, installed: int) -> int:
        """Gives every worker the chief's roots if it installed any; returns how many it did."""
        total = int(self._count(tf.constant(float(installed), tf.float64)))
        if total:
            self._copy()
        return total

    def _sum_count(self, installed: tf.Tensor) -> tf.Tensor:
        def replica_fn() -> tf.Tensor:
            context = tf.distribute.get_replica_context()
            mine = tf.where(tf.equal(context.replica_id_in_sync_group, 0), installed, 0.0)
            return context.all_reduce(tf.distribute.ReduceOp.SUM, mine)

        summed = self._strategy.run(replica_fn)
        return self._strategy.experimental_local_results(summed)[0]

    def _copy_from_chief(self) -> None:
        def replica_fn() -> list[tf.Tensor]:
            context = tf.distribute.get_replica_context()
            source = tf.equal(context.replica_id_in_sync_group, 0)
            # float64 holds every stats_step (an int64 step count) exactly.
            values = [tf.cast(tf.convert_to_tensor(v), tf.float64) for v in self._variables]
            values = [tf.where(source, v, tf.zeros_like(v)) for v in values]
            return context.all_reduce(tf.distribute.ReduceOp.SUM, values)

        summed = self._strategy.run(replica_fn)
        for variable, value in zip(self._variables, summed):
            local = self._strategy.experimental_local_results(value)[0]
            variable.assign(tf.cast(local, variable.dtype))


# Longest wait of a multi-worker job's worker for a file the chief writes.
_CHIEF_FILE_TIMEOUT_S = 3600.0


def wait_for_chief_file(path: str, what: str, timeout_s: float = _CHIEF_FILE_TIMEOUT_S) -> None:
    """Waits until `path` exists (written whole by the chief), saying so every half minute.

    Raises:
        TimeoutError: It did not appear within `timeout_s`.
    """
    began = time.monotonic()
    said = began
    while not os.path.exists(path):
        now = time.monotonic()
        if now - began > timeout_s:
            raise TimeoutError(f"{what} did not appear at {path} within {timeout_s:.0f} s")
        if now - said >= 30.0:
            log.info("waiting for %s at %s", what, path)
            said = now
        time.sleep(0.5)
