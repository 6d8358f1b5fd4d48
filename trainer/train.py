"""Training and evaluation: the inner loop on the device, host work between inner loops.

`train_and_evaluate(config, workdir)` is the whole job behind `python -m trainer`:

1. data: pairs from the configured source, a joint SentencePiece vocabulary
   (trained once, cached), a bucketed tf.data pipeline;
2. model and optimizer, restored from the newest checkpoint in the workdir if any
   (weights, optimizer state with the preconditioners held and their versions,
   and the input iterator's position);
3. with `precond.mode="async"`, the preconditioner service: started as a child
   process on a free loopback port unless `precond.address` names one;
4. the loop: a `tf.function` runs up to `train.steps_per_loop` steps; between
   such inner loops the host pushes statistics every `precond.update_steps`
   steps, installs newer roots, writes summaries, checkpoints and evaluates.
   Inner loops end exactly at those events, so a push happens at a multiple of
   `precond.update_steps` whatever `steps_per_loop` is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import math
import os
import re
import secrets
import shlex
import shutil
import time
from collections.abc import Iterator
from typing import Any

import keras
import ml_collections
import numpy as np
import tensorflow as tf

from precond_service.auth import TlsConfig, read_token, run_digest
from precond_service.client import PreconditionerClient
from trainer import config as config_lib
from trainer import evaluation
from trainer.data import pipeline, sources
from trainer.data import tokenizer as tokenizer_lib
from trainer.model import bleu, transformer
from trainer.optimizers import Shampoo
from trainer.optimizers.service_bridge import ServicePreconditioning, staleness
from trainer.optimizers.shampoo import run_then_true
from trainer.service_process import local_service

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
# Checkpoints that could not be read are moved here, out of the way of resumes.
CORRUPT_DIR = "corrupt"
# What reading or restoring a damaged checkpoint raises (the reader raises
# IndexError for a file cut short, DataLossError for a bad checksum).
_UNREADABLE_CHECKPOINT = (tf.errors.OpError, ValueError, IndexError, AssertionError)


class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `peak`, then `peak * sqrt(warmup / step)` ("rsqrt") or flat.

    Args:
        peak: Learning rate at the end of warmup.
        warmup_steps: Steps of the linear warmup (0 for none).
        decay: "rsqrt" or "constant".
    """

    def __init__(self, peak: float, warmup_steps: int, decay: str = "rsqrt"):
        if decay not in config_lib.SCHEDULES:
            raise ValueError(f"decay must be one of {config_lib.SCHEDULES}, got {decay!r}")
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.decay = decay

    def __call__(self, step: tf.Tensor) -> tf.Tensor:
        # Step s applies learning_rate(s); count from 1 so the first step moves.
        step = tf.cast(step, tf.float32) + 1.0
        warmup = float(max(self.warmup_steps, 1))
        rate = self.peak * tf.minimum(1.0, step / warmup)
        if self.decay == "rsqrt":
            rate *= tf.minimum(1.0, tf.sqrt(warmup / step))
        return rate

    def get_config(self) -> dict[str, Any]:
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "decay": self.decay}


def make_optimizer(config: ml_collections.ConfigDict) -> keras.optimizers.Optimizer:
    """The optimizer `config.optimizer` and `config.precond` describe."""
    opt = config.optimizer
    schedule = WarmupSchedule(opt.learning_rate, opt.warmup_steps, opt.schedule)
    common: dict[str, Any] = {"learning_rate": schedule}
    if opt.weight_decay:
        common["weight_decay"] = opt.weight_decay
    if opt.name == "adam":
        return keras.optimizers.Adam(
            beta_1=opt.beta1, beta_2=opt.beta2, epsilon=opt.epsilon, **common
        )
    if opt.name == "adagrad":
        # Sums start at zero, as in Duchi et al. and Shampoo's own AdaGrad graft;
        # Keras's default of 0.1 damps every step while the sums are small.
        return keras.optimizers.Adagrad(
            initial_accumulator_value=0.0, epsilon=opt.epsilon, **common
        )
    sh = opt.shampoo
    return Shampoo(
        block_size=sh.block_size,
        beta1=opt.beta1,
        beta2=opt.beta2,
        nesterov=sh.nesterov,
        matrix_epsilon=sh.matrix_epsilon,
        diagonal_epsilon=opt.epsilon,
        graft_type=sh.graft_type,
        start_preconditioning_step=sh.start_preconditioning_step,
        statistics_compute_steps=sh.statistics_compute_steps,
        preconditioning_compute_steps=config.precond.update_steps,
        skip_preconditioning_dim_size_gt=sh.skip_preconditioning_dim_size_gt,
        exponent_override=sh.exponent_override or None,
        inverse_failure_threshold=sh.inverse_failure_threshold,
        precondition_mode=config.precond.mode,
        **common,
    )


RUN_ID_FILE = "run_id"


def run_id_for(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The run's name at the service, which is also the key to its preconditioners.

    `precond.run_id` if set; otherwise a random one made at the run's first start
    and kept in `workdir/run_id` (readable by the owner only), so that a resumed
    run uses it again and nobody can guess it to read the run's roots.
    """
    if config.precond.run_id:
        return config.precond.run_id
    path = os.path.join(workdir, RUN_ID_FILE)
    with contextlib.suppress(FileNotFoundError):
        with open(path) as f:
            run_id = f.read().strip()
        if run_id:
            return run_id
    run_id = f"{os.uname().nodename}-{secrets.token_hex(16)}"
    tmp = f"{path}.tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(run_id + "\n")
    os.replace(tmp, path)
    return run_id


def service_token(config: ml_collections.ConfigDict) -> str | None:
    """The service token from `precond.token_file` or $PRECOND_SERVICE_TOKEN; None if neither."""
    try:
        return read_token(config.precond.token_file)
    except OSError as e:
        raise ValueError(
            f"config.precond.token_file={config.precond.token_file!r} cannot be read: {e}"
        ) from e


def service_tls(config: ml_collections.ConfigDict) -> TlsConfig | None:
    """TLS settings from `precond.tls_*_file`; None (plaintext) without `precond.tls_ca_file`."""
    precond = config.precond
    if not precond.tls_ca_file:
        return None
    try:
        return TlsConfig(precond.tls_ca_file, precond.tls_cert_file, precond.tls_key_file)
    except ValueError as e:
        raise ValueError(f"config.precond.tls_*_file: {e}") from e


def write_config(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Writes the final config as JSON into the workdir, for reproducing the run."""
    path = os.path.join(workdir, "config.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run wrote into `workdir` (for translation and inspection)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist: is {workdir!r} the --workdir of a training run?"
        )
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def vocab_path_for(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Where the SentencePiece model lives: `data.vocab_path` or the workdir."""
    return config.data.vocab_path or os.path.join(workdir, "spm.model")


@dataclasses.dataclass
class LoopMetrics:
    """Sums over the steps since the last report."""

    steps: int = 0
    seconds: float = 0.0
    loss_sum: float = 0.0
    weight_sum: float = 0.0
    tokens: float = 0.0
    grad_norm_sum: float = 0.0

    def add(self, values: dict[str, np.ndarray], steps: int, seconds: float) -> None:
        self.steps += steps
        self.seconds += seconds
        self.loss_sum += float(values["loss_sum"])
        self.weight_sum += float(values["weight_sum"])
        self.tokens += float(values["tokens"])
        self.grad_norm_sum += float(values["grad_norm_sum"])

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.weight_sum, 1.0)

    @property
    def step_time(self) -> float:
        return self.seconds / max(self.steps, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def grad_norm(self) -> float:
        return self.grad_norm_sum / max(self.steps, 1)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a finished run reports (also written to `workdir/results.json`)."""

    step: int
    train_loss: float | None
    dev_loss: float
    dev_bleu: float
    test_loss: float | None
    test_bleu: float | None
    train_seconds: float
    bleu_signature: str


class Trainer:
    """Builds data, model and optimizer from a config, and runs the training loop.

    Args:
        config: A full config (see trainer/config.py); validated here.
        workdir: Checkpoints, summaries, vocabulary and the final config go here.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        config_lib.validate(config)
        self.config = config
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        write_config(config, workdir)
        keras.utils.set_random_seed(config.seed)
        if config.train.deterministic:
            tf.config.experimental.enable_op_determinism()
        if config.train.mixed_precision:
            keras.mixed_precision.set_global_policy(config.train.mixed_precision)

        train_pairs = sources.load_pairs(config.data, "train", seed=config.seed)
        self.tokenizer = tokenizer_lib.load_or_train(
            vocab_path_for(config, workdir),
            train_pairs,
            vocab_size=config.data.vocab_size,
            max_sentences=config.data.vocab_train_sentences,
            seed=config.seed,
        )
        train_ds = pipeline.train_dataset(
            train_pairs,
            self.tokenizer,
            max_length=config.data.max_length,
            tokens_per_batch=config.data.tokens_per_batch,
            shuffle_buffer=config.data.shuffle_buffer,
            seed=config.seed,
        )
        self.iterator = iter(train_ds)
        self.model = transformer.build_transformer(config.model, self.tokenizer.vocab_size)
        self.optimizer = make_optimizer(config)
        # Loss scaling for float16; bfloat16 has float32's range and needs none.
        self.step_optimizer = (
            keras.optimizers.LossScaleOptimizer(self.optimizer)
            if config.train.mixed_precision == "mixed_float16"
            else self.optimizer
        )
        # Builds the wrapped optimizer too: its state must exist before a restore.
        self.step_optimizer.build(self.model.trainable_variables)
        # Batches trained on. The optimizer's own `iterations` lags behind it when
        # float16 loss scaling skips a step with non-finite gradients.
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        # Steps skipped for non-finite gradients: in all, and in a row now.
        self.skipped_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped")
        self.consecutive_skipped = tf.Variable(
            0, dtype=tf.int64, trainable=False, name="consecutive_skipped"
        )
        # Dropout's random-number state is not among the model's weights; without it
        # a resumed run would draw the dropout masks of its first steps again.
        weights = {id(v) for v in self.model.weights}
        seeds = {v.path.replace("/", "."): v for v in self.model.variables if id(v) not in weights}
        self.checkpoint = tf.train.Checkpoint(
            model=self.model,
            seeds=seeds,
            optimizer=self.step_optimizer,
            iterator=self.iterator,
            step=self.step,
            skipped_steps=self.skipped_steps,
            consecutive_skipped=self.consecutive_skipped,
        )
        # An unreadable `checkpoint` state file (cut short by a crash) is ignored
        # with a warning by the manager; `_restore` finds checkpoints by their files.
        self.manager = tf.train.CheckpointManager(
            self.checkpoint,
            os.path.join(workdir, CHECKPOINT_DIR),
            max_to_keep=config.train.keep_checkpoints,
        )
        self.restored_step = self._restore()
        self._loop_fn = self._make_loop_fn()
        self.evaluator = evaluation.Evaluator(self.model, self.tokenizer, config)
        self.summary_writer = tf.summary.create_file_writer(os.path.join(workdir, "summaries"))
        self.last_train_loss = float("nan")
        self.train_seconds = 0.0

    # ------------------------------------------------------------ building

    def _restore(self) -> int:
        """Restores the newest readable checkpoint; returns its step (0 if none).

        Each checkpoint is read in full (every tensor's checksum is verified) before
        anything is restored from it; one that fails, such as a checkpoint cut short
        by a crash or damaged on disk, is moved to `checkpoints/corrupt/` with a
        warning and the previous one is tried.
        """
        directory = self.manager.directory
        partly_restored = False
        damaged = 0
        for path in _checkpoints_newest_first(directory):
            try:
                _read_all_tensors(path)
                partly_restored = True
                self.checkpoint.restore(path).assert_existing_objects_matched()
            except _UNREADABLE_CHECKPOINT as e:
                log.warning(
                    "checkpoint %s is corrupt or incomplete (%s: %s); moving it to %s/ and "
                    "trying the previous one",
                    path,
                    type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "",
                    CORRUPT_DIR,
                )
                _set_aside(directory, glob.glob(glob.escape(path) + ".*"))
                damaged += 1
                continue
            step = int(self.step.numpy())
            log.info("resumed from %s at step %d", path, step)
            return step
        if partly_restored:
            # A failed restore may have set some variables; an older checkpoint
            # would have overwritten them all, but there is none left.
            raise RuntimeError(
                f"no checkpoint in {directory} could be restored (see the warnings; they are "
                f"in {os.path.join(directory, CORRUPT_DIR)}); start in a new workdir"
            )
        if damaged:
            log.warning(
                "no checkpoint could be restored from %s (the damaged ones are in %s/): "
                "starting from step 0",
                directory,
                CORRUPT_DIR,
            )
        else:
            log.info("no checkpoint in %s: starting from step 0", directory)
        return 0

    def _make_loop_fn(self):
        model, optimizer = self.model, self.step_optimizer
        variables = model.trainable_variables
        label_smoothing = float(self.config.model.label_smoothing)
        clip_norm = float(self.config.optimizer.clip_norm)
        scale_loss = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

        def train_step(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            with tf.GradientTape() as tape:
                logits = model(batch, training=True)
                loss_sum, weight_sum = transformer.sequence_loss(
                    logits, batch["targets"], label_smoothing
                )
                loss = loss_sum / tf.maximum(weight_sum, 1.0)
                scaled = optimizer.scale_loss(loss) if scale_loss else loss
            grads = tape.gradient(scaled, variables)
            # With loss scaling the gradients stay scaled (the optimizer unscales
            # them); only the scalars of the norm and the clip are adjusted.
            scale = optimizer.dynamic_scale if scale_loss else 1.0
            grad_norm = tf.linalg.global_norm(grads) / scale
            # The norm is NaN or infinite exactly when a gradient is (or when their
            # squares overflow, which clipping would turn into NaN anyway).
            finite = tf.math.is_finite(grad_norm)
            if clip_norm > 0:
                grads, _ = tf.clip_by_global_norm(
                    grads, clip_norm * scale, use_norm=grad_norm * scale
                )
            if scale_loss:
                # The loss-scale optimizer skips a non-finite step itself and
                # lowers its scale; skipping it here would keep the scale too high.
                optimizer.apply_gradients(zip(grads, variables))
            else:
                # A non-finite step changes nothing: no weight, no optimizer
                # variable, no Shampoo statistic, not the optimizer's iterations.
                tf.cond(
                    finite,
                    lambda: run_then_true(lambda: optimizer.apply_gradients(zip(grads, variables))),
                    lambda: tf.constant(False),
                )
            skipped = 1 - tf.cast(finite, tf.int64)
            self.skipped_steps.assign_add(skipped)
            self.consecutive_skipped.assign((self.consecutive_skipped + 1) * skipped)
            kept = tf.cast(finite, tf.float32)
            tokens = tf.reduce_sum(tf.cast(batch["inputs"] > 0, tf.float32)) + weight_sum
            # Sums over the steps that were applied (a skipped step's loss may be NaN).
            return {
                "loss_sum": tf.where(finite, tf.cast(loss_sum, tf.float32), 0.0),
                "weight_sum": weight_sum * kept,
                "tokens": tokens,
                "grad_norm_sum": tf.where(finite, grad_norm, 0.0),
                "skipped": tf.cast(skipped, tf.float32),
            }

        step_fn = tf.function(train_step, jit_compile=bool(self.config.train.jit_compile))

        @tf.function
        def loop(iterator: Iterator, num_steps: tf.Tensor) -> dict[str, tf.Tensor]:
            totals = {
                name: tf.constant(0.0)
                for name in ("loss_sum", "weight_sum", "tokens", "grad_norm_sum", "skipped")
            }
            for _ in tf.range(num_steps):
                values = step_fn(next(iterator))
                totals = {name: totals[name] + tf.cast(values[name], tf.float32) for name in totals}
            return totals

        return loop

    # ------------------------------------------------------------ the loop

    def train_and_evaluate(self) -> TrainResult:
        """Trains to `train.num_steps`, evaluating and checkpointing on the way."""
        with self.preconditioning() as bridge:
            try:
                self.train(bridge)
            except KeyboardInterrupt:
                step = int(self.step.numpy())
                log.warning("interrupted at step %d: saving a checkpoint before exiting", step)
                self.manager.save(checkpoint_number=step)
                raise
        return self.final_evaluation()

    @contextlib.contextmanager
    def preconditioning(self) -> Iterator[ServicePreconditioning | None]:
        """The service connection of the async mode (None in the other modes).

        Starts the service as a child process unless `precond.address` names
        one, and stops the client and the child when the block ends.
        """
        if self.config.precond.mode != "async":
            yield None
            return
        with contextlib.ExitStack() as stack:
            yield self._connect_service(stack)

    def _connect_service(self, stack: contextlib.ExitStack) -> ServicePreconditioning:
        precond = self.config.precond
        token = service_token(self.config)
        tls = service_tls(self.config)
        address = precond.address
        if not address:
            flags = shlex.split(precond.service_flags)
            if precond.token_file:
                flags.append(f"--token_file={precond.token_file}")
            address = stack.enter_context(local_service(workers=precond.workers, extra_args=flags))
        run_id = run_id_for(self.config, self.workdir)
        run_name = run_digest(run_id)
        client = PreconditionerClient(
            address, run_id, token=token, tls=tls, pull_interval_s=precond.pull_interval_s
        )
        try:
            # The service may hold roots of this run_id from before a restart,
            # computed from steps after our checkpoint: start the run afresh.
            released = client.drop_run()
            if released:
                log.info("service released %d blocks of an earlier run %s", released, run_name)
        except Exception as e:  # noqa: BLE001 - the service may be down; training goes on.
            log.warning("could not reset run %s at %s (%s); continuing", run_name, address, e)
        client.start()
        stack.callback(client.close)
        log.info(
            "asynchronous preconditioning: service %s, run %s (sha256 prefix of its run_id)%s",
            address,
            run_name,
            f"; roots installed exactly {precond.delay_steps} steps after their statistics"
            if precond.delay_steps
            else "",
        )
        return ServicePreconditioning(
            self.optimizer,
            client,
            precond.update_steps,
            delay_steps=precond.delay_steps,
            delay_timeout_s=precond.delay_timeout_s,
        )

    def _next_loop_length(self, step: int, until: int) -> int:
        """Steps until the next event (push, summary, checkpoint, eval, `until`), capped."""
        train = self.config.train
        periods = [train.summary_every_steps, train.checkpoint_every_steps]
        if self.config.precond.mode == "async":
            periods.append(self.config.precond.update_steps)
        if train.eval_every_steps:
            periods.append(train.eval_every_steps)
        length = min(train.steps_per_loop, until - step)
        for period in periods:
            length = min(length, period - step % period)
        delay = self.config.precond.delay_steps if self.config.precond.mode == "async" else 0
        if delay:  # also end at the steps where delayed roots are installed
            update = self.config.precond.update_steps
            length = min(length, (delay - step) % update or update)
        return length

    def train(self, bridge: ServicePreconditioning | None, until_step: int | None = None) -> None:
        """Trains from the current step to `until_step` (default `train.num_steps`).

        Args:
            bridge: What `preconditioning()` yielded.
            until_step: Stop there (at most `train.num_steps`).
        """
        config, train = self.config, self.config.train
        step = int(self.step.numpy())
        until = min(until_step or train.num_steps, train.num_steps)
        if step >= until:
            log.info("already at step %d of %d: nothing to train", step, until)
            return
        log.info(
            "training %s (%s, precond.mode=%s) from step %d to %d; %d parameters",
            config.optimizer.name,
            self.optimizer.__class__.__name__,
            config.precond.mode,
            step,
            until,
            sum(int(np.prod(v.shape)) for v in self.model.trainable_variables),
        )
        if bridge is not None:
            bridge.after_steps()
        report = LoopMetrics()
        summary = LoopMetrics()
        last_report = time.monotonic()
        start_step = step
        train_seconds = 0.0
        while step < until:
            length = self._next_loop_length(step, until)
            values, seconds = self.run_steps(bridge, length)
            step += length
            train_seconds += seconds
            self.train_seconds += seconds
            report.add(values, length, seconds)
            summary.add(values, length, seconds)
            self._check_skipped(step, int(values["skipped"]))
            if values["weight_sum"] > 0:  # at least one step was applied
                loss = float(values["loss_sum"]) / float(values["weight_sum"])
                self.last_train_loss = loss
                if not math.isfinite(loss) or loss > train.max_loss:
                    raise FloatingPointError(
                        f"training loss is {loss} at step {step} (limit config.train.max_loss="
                        f"{train.max_loss}): {_WHAT_TO_TRY}"
                    )

            now = time.monotonic()
            if now - last_report >= train.log_every_s or step >= until:
                remaining = (train.num_steps - step) * (train_seconds / (step - start_step))
                self._log_progress(step, report, remaining, bridge)
                report = LoopMetrics()
                last_report = now
            if step % train.summary_every_steps == 0 or step >= train.num_steps:
                self._write_train_summaries(step, summary, bridge)
                summary = LoopMetrics()
            if step % train.checkpoint_every_steps == 0 or step >= train.num_steps:
                path = self.manager.save(checkpoint_number=step)
                log.info("step %d: saved %s", step, path)
            if train.eval_every_steps and step % train.eval_every_steps == 0:
                if step < train.num_steps:  # the final evaluation follows the loop
                    self._evaluate("dev", step)

    def _check_skipped(self, step: int, skipped: int) -> None:
        """Reports steps skipped for non-finite gradients; stops after too many in a row."""
        if not skipped:
            return
        in_a_row = int(self.consecutive_skipped.numpy())
        log.warning(
            "step %d: skipped %d step(s) with NaN or infinite gradients (%d in a row, %d in all)",
            step,
            skipped,
            in_a_row,
            int(self.skipped_steps.numpy()),
        )
        limit = self.config.train.max_consecutive_skipped_steps
        if in_a_row > limit:
            raise FloatingPointError(
                f"gradients were NaN or infinite in the last {in_a_row} steps, up to step "
                f"{step} (limit config.train.max_consecutive_skipped_steps={limit}): "
                f"{_WHAT_TO_TRY}"
            )

    def run_steps(
        self, bridge: ServicePreconditioning | None, num_steps: int
    ) -> tuple[dict[str, np.ndarray], float]:
        """Runs `num_steps` steps as one inner loop, then the host's service work.

        The service work (async mode) pushes the statistics when a push is due and
        installs roots that arrived. No summaries, checkpoints or evaluations:
        `train` does those; benchmarks call this to time steps alone.

        Args:
            bridge: What `preconditioning()` yielded.
            num_steps: Steps to run, >= 1.

        Returns:
            The loop's sums (loss_sum, weight_sum, tokens, grad_norm_sum over the
            applied steps; skipped: steps skipped for non-finite gradients) and the
            seconds the inner loop and the service work took.
        """
        began = time.perf_counter()
        values = self._loop_fn(self.iterator, tf.constant(num_steps, tf.int64))
        values = {name: value.numpy() for name, value in values.items()}
        self.step.assign_add(num_steps)
        installed = bridge.after_steps() if bridge is not None else 0
        if installed:
            log.debug("step %d: installed %d new preconditioners", int(self.step), installed)
        return values, time.perf_counter() - began

    # ------------------------------------------------------------ reporting

    def _staleness_text(self) -> str:
        if not isinstance(self.optimizer, Shampoo) or self.config.precond.mode == "off":
            return ""
        held = staleness(self.optimizer)
        if held.fraction_preconditioned == 0:
            return " | precond: none yet"
        return (
            f" | staleness {held.min:.0f}/{held.mean:.0f}/{held.max:.0f}"
            f" ({held.fraction_preconditioned:.0%} of blocks)"
        )

    def _log_progress(
        self,
        step: int,
        metrics: LoopMetrics,
        remaining_s: float,
        bridge: ServicePreconditioning | None = None,
    ) -> None:
        lr = float(self.optimizer.learning_rate.numpy())
        service = ""
        if bridge is not None:
            status = bridge.client.status()
            if not status.connected and status.last_error is not None:
                service = " | service unreachable"
        log.info(
            "step %d/%d | loss %.4f | %.0f tok/s | %.1f ms/step | lr %.2e | ETA %s%s",
            step,
            self.config.train.num_steps,
            metrics.loss,
            metrics.tokens_per_second,
            1000 * metrics.step_time,
            lr,
            _format_duration(remaining_s),
            self._staleness_text() + service,
        )

    def _write_train_summaries(
        self, step: int, metrics: LoopMetrics, bridge: ServicePreconditioning | None
    ) -> None:
        with self.summary_writer.as_default(step=step):
            tf.summary.scalar("train/loss", metrics.loss)
            tf.summary.scalar("train/learning_rate", float(self.optimizer.learning_rate.numpy()))
            tf.summary.scalar("train/grad_norm", metrics.grad_norm)
            tf.summary.scalar("train/tokens_per_second", metrics.tokens_per_second)
            tf.summary.scalar("train/step_time_ms", 1000 * metrics.step_time)
            tf.summary.scalar("train/skipped_steps", int(self.skipped_steps.numpy()))
            if isinstance(self.optimizer, Shampoo) and self.config.precond.mode != "off":
                held = staleness(self.optimizer)
                tf.summary.scalar("precond/fraction_preconditioned", held.fraction_preconditioned)
                if held.fraction_preconditioned > 0:
                    tf.summary.scalar("precond/staleness_min", held.min)
                    tf.summary.scalar("precond/staleness_mean", held.mean)
                    tf.summary.scalar("precond/staleness_max", held.max)
            if bridge is not None:
                roots = bridge.client.latest()
                if roots:
                    errors = np.array([block.error for block in roots.values()])
                    tf.summary.scalar("precond/root_error_mean", float(errors.mean()))
                    tf.summary.scalar("precond/root_error_max", float(errors.max()))
                status = bridge.client.status()
                if status.last_push_latency_s is not None:
                    tf.summary.scalar("precond/push_latency_ms", 1000 * status.last_push_latency_s)
                if status.last_pull_latency_s is not None:
                    tf.summary.scalar("precond/pull_latency_ms", 1000 * status.last_pull_latency_s)
                tf.summary.scalar("precond/service_restarts_seen", status.restarts_seen)
                tf.summary.scalar("precond/push_failures", status.push_failures)
                tf.summary.scalar("precond/connected", float(status.connected))
                if bridge.delay_steps:
                    tf.summary.scalar("precond/delay_wait_seconds", bridge.wait_seconds)
        self.summary_writer.flush()

    def _evaluate(self, split: str, step: int, max_bleu_examples: int | None = None):
        began = time.monotonic()
        result = self.evaluator.evaluate(split, max_bleu_examples=max_bleu_examples)
        with self.summary_writer.as_default(step=step):
            tf.summary.scalar(f"{split}/loss", result.loss)
            tf.summary.scalar(f"{split}/accuracy", result.accuracy)
            tf.summary.scalar(f"{split}/bleu", result.bleu)
            if result.examples:
                text = "\n\n".join(
                    f"    {src}\n    -> {hyp}\n    ref {ref}" for src, hyp, ref in result.examples
                )
                tf.summary.text(f"{split}/translations", text)
        self.summary_writer.flush()
        log.info(
            "step %d: %s loss %.4f | accuracy %.3f | BLEU %.2f on %d sentences (%.0f s)",
            step,
            split,
            result.loss,
            result.accuracy,
            result.bleu,
            result.bleu_sentences,
            time.monotonic() - began,
        )
        return result

    def final_evaluation(self) -> TrainResult:
        """Dev and test loss and BLEU (all test sentences); writes results.json."""
        step = int(self.step.numpy())
        dev = self._evaluate("dev", step)
        test = None
        if self.evaluator.has_split("test"):
            test = self._evaluate("test", step, max_bleu_examples=0)
        result = TrainResult(
            step=step,
            # None when this process trained no step (resumed at the last one).
            train_loss=self.last_train_loss if math.isfinite(self.last_train_loss) else None,
            dev_loss=dev.loss,
            dev_bleu=dev.bleu,
            test_loss=None if test is None else test.loss,
            test_bleu=None if test is None else test.bleu,
            train_seconds=self.train_seconds,
            bleu_signature=bleu.bleu_signature(),
        )
        with open(os.path.join(self.workdir, "results.json"), "w") as f:
            json.dump(dataclasses.asdict(result), f, indent=2)
        return result


_WHAT_TO_TRY = (
    "lower config.optimizer.learning_rate, lengthen config.optimizer.warmup_steps or set "
    "config.optimizer.clip_norm"
)


def _checkpoints_newest_first(directory: str) -> list[str]:
    """Checkpoint prefixes (`.../ckpt-N`) that have an index file, largest N first."""
    numbered = []
    for index in glob.glob(os.path.join(glob.escape(directory), "ckpt-*.index")):
        match = re.fullmatch(r"ckpt-(\d+)\.index", os.path.basename(index))
        if match:
            numbered.append((int(match.group(1)), index[: -len(".index")]))
    return [path for _, path in sorted(numbered, reverse=True)]


def _read_all_tensors(path: str) -> None:
    """Reads the tensors of a checkpoint, which verifies their checksums; raises if one fails."""
    reader = tf.train.load_checkpoint(path)
    for name, dtype in reader.get_variable_to_dtype_map().items():
        if dtype != tf.variant:  # the input iterator's state; read by the restore itself
            reader.get_tensor(name)


def _set_aside(directory: str, paths: list[str]) -> None:
    """Moves `paths` into `directory/corrupt/` (kept for inspection, out of the way)."""
    target = os.path.join(directory, CORRUPT_DIR)
    os.makedirs(target, exist_ok=True)
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            shutil.move(path, os.path.join(target, os.path.basename(path)))


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
    """Trains and evaluates as `config` says, in `workdir` (resuming from it if possible)."""
    return Trainer(config, workdir).train_and_evaluate()
