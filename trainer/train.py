# Over 400 lines: the Trainer is one class whose building, loop, actions and evaluation
# share its state; the parts that stand alone live in the modules it imports.
"""Training and evaluation: `train_and_evaluate(config, workdir)` and the `Trainer`.

The whole job behind `python -m trainer`:

1. `process_setup.setup_process(config)`: process-wide TensorFlow state (seeds, op determinism,
   mixed-precision policy), called once by `__main__` (and by benchmarks/tests);
2. `Trainer(config, workdir)` builds the data (a joint SentencePiece vocabulary,
   trained once and cached; a bucketed tf.data pipeline), the model and the
   optimizer, and restores the newest checkpoint (trainer/checkpoints.py; a
   config that would change the run in the workdir is refused first);
3. with `precond.mode="async"`, `Trainer.preconditioning()` connects to the
   preconditioner service (trainer/service_connection.py);
4. `Trainer.train` runs the controller (trainer/controller.py): inner loops of the
   compiled step (trainer/step_fn.py), and between them the actions: service
   work, checks, progress, summaries, checkpoints and evaluation
   (trainer/reporting.py writes what people and programs read).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time

import keras
import ml_collections
import numpy as np
import tensorflow as tf

from precond_service.common.events import Event, EventLog
from trainer import (
    checkpoints,
    distribution,
    evaluation,
    process_setup,
    service_connection,
    step_fn,
)
from trainer import config as config_lib
from trainer.controller import Action, Controller, LoopMetrics
from trainer.data import pipeline, sources
from trainer.data import tokenizer as tokenizer_lib
from trainer.model import bleu, transformer
from trainer.optimizer_config import make_optimizer
from trainer.optimizers.service_bridge import ServicePreconditioning
from trainer.optimizers.shampoo import Shampoo
from trainer.reporting import EVENTS_FILE, Reporter, TrainResult, write_results

log = logging.getLogger(__name__)

_WHAT_TO_TRY = (
    "lower config.optimizer.learning_rate, lengthen config.optimizer.warmup_steps or set "
    "config.optimizer.clip_norm"
)


def vocab_path_for(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Where the SentencePiece model lives: `data.vocab_path` or the workdir."""
    return config.data.vocab_path or os.path.join(workdir, "spm.model")


class Trainer:
    """Builds data, model, optimizer and checkpoint from a config, and trains.

    Call `process_setup.setup_process(config)` first. Nothing in the workdir is written or
    moved before the config is checked against the run already there
    (`checkpoints.check_resume`); `config.json` is written once the restore
    succeeded.

    Args:
        config: A full config (see trainer/config.py); validated here.
        workdir: Checkpoints, summaries, events, vocabulary and the final config go here.

    Raises:
        ValueError: A config value is invalid, the process was not set up for it,
            or the config cannot resume the run in the workdir
            (`checkpoints.ResumeRefusedError`).
        RuntimeError: A checkpoint does not fit the model and optimizer built.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        config_lib.validate(config)
        process_setup.check_process_setup(config)
        # Under "multi_worker" a worker other than the chief keeps its own files in
        # a subdirectory; the vocabulary is the chief's.
        self.role = distribution.worker_role(config)
        self.vocab_path = vocab_path_for(config, workdir)
        workdir = self.role.workdir(workdir)
        checkpoints.check_resume(config, workdir)
        self.config = config
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.events = EventLog(os.path.join(workdir, EVENTS_FILE))
        self.strategy = distribution.make_strategy(config)
        self._build_data()
        with self.strategy.scope():
            self._build_model_and_optimizer()
            self._build_checkpoint()
        self.restored_step = self._restore()
        if self.role.count > 1:
            distribution.check_same_step(self.strategy, self.role, self.restored_step)
        checkpoints.write_config(config, workdir)
        self.root_broadcast = (
            distribution.RootBroadcast(self.strategy, self.optimizer.root_variables())
            if self.role.count > 1
            and isinstance(self.optimizer, Shampoo)
            and config.precond.mode == "async"
            else None
        )
        train_step = step_fn.make_train_step(
            self.model,
            self.step_optimizer,
            step_fn.SkipCounters(self.skipped_steps, self.consecutive_skipped),
            label_smoothing=float(config.model.label_smoothing),
            clip_norm=float(config.optimizer.clip_norm),
        )
        self._loop_fn = step_fn.make_inner_loop(
            train_step,
            bool(config.train.jit_compile),
            int(config.train.accumulate_steps),
            self.strategy,
        )
        self.evaluator = evaluation.Evaluator(self.model, self.tokenizer, config)
        self.summary_writer = (
            tf.summary.create_file_writer(os.path.join(workdir, "summaries"))
            if self.role.is_chief
            else tf.summary.create_noop_writer()
        )
        self.reporter = Reporter(config, self.optimizer, self.summary_writer, self.events)
        self.last_train_loss = float("nan")
        self.train_seconds = 0.0
        # Per inner loop of this process: its milliseconds per step (the service's
        # push and install work included).
        self.loop_step_ms: list[float] = []
        self._restarts_seen = 0

    # ------------------------------------------------------------ building

    def _build_data(self) -> None:
        config = self.config
        train_pairs = sources.load_pairs(config.data, "train", seed=config.seed)
        if not self.role.is_chief:
            distribution.wait_for_chief_file(self.vocab_path, "the chief's SentencePiece model")
        self.tokenizer = tokenizer_lib.load_or_train(
            self.vocab_path,
            train_pairs,
            vocab_size=config.data.vocab_size,
            max_sentences=config.data.vocab_train_sentences,
            seed=config.seed,
        )
        # One pipeline (its iterator is checkpointed) of batches of a replica's share
        # of the token budget; each update gives each replica the next ones.
        replicas = self.strategy.num_replicas_in_sync
        train_ds = pipeline.train_dataset(
            train_pairs,
            self.tokenizer,
            max_length=config.data.max_length,
            tokens_per_batch=distribution.replica_batch_tokens(config, replicas),
            shuffle_buffer=config.data.shuffle_buffer,
            seed=config.seed,
        )
        if self.role.count > 1:  # Worker w reads batches w, w + W, w + 2W, ...
            train_ds = train_ds.shard(self.role.count, self.role.index)
        self.iterator = iter(train_ds)

    def _build_model_and_optimizer(self) -> None:
        config = self.config
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

    def _build_checkpoint(self) -> None:
        # Batches trained on. The optimizer's own `iterations` lags behind it when
        # a step with non-finite gradients is skipped.
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        # Updated inside the step, the same on every replica: the first one writes.
        first = tf.VariableAggregation.ONLY_FIRST_REPLICA
        self.skipped_steps = tf.Variable(
            0, dtype=tf.int64, trainable=False, name="skipped", aggregation=first
        )
        self.consecutive_skipped = tf.Variable(
            0, dtype=tf.int64, trainable=False, name="consecutive_skipped", aggregation=first
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
        # with a warning by the manager; the restore finds checkpoints by their files.
        self.manager = tf.train.CheckpointManager(
            self.checkpoint,
            os.path.join(self.workdir, checkpoints.CHECKPOINT_DIR),
            max_to_keep=self.config.train.keep_checkpoints,
        )

    def _restore(self) -> int:
        """Restores the newest undamaged checkpoint; returns its step (0 if none)."""
        path = checkpoints.restore_newest(self.checkpoint, self.manager.directory)
        step = int(self.step.numpy())
        if path is not None:
            log.info("resumed from %s at step %d", path, step)
            self.events.write(Event.RESUMED, step=step, checkpoint=path)
        self.events.write(Event.STARTED, step=step, resumed=path is not None)
        return step

    # ------------------------------------------------------------ the loop

    def train_and_evaluate(self) -> TrainResult | None:
        """Trains to `train.num_steps`, evaluating and checkpointing on the way.

        Returns:
            The final evaluation; None on a multi-worker job's other workers,
            which train and checkpoint but do not evaluate.
        """
        with self.preconditioning() as bridge:
            try:
                self.train(bridge)
            except KeyboardInterrupt:
                step = int(self.step.numpy())
                path = self._save_checkpoint(step, quiet=True)
                log.warning(
                    "interrupted at step %d: saved %s; the same command resumes", step, path
                )
                self.events.write(Event.INTERRUPTED, step=step)
                raise
        if not self.role.is_chief:
            self.events.write(Event.FINISHED, step=int(self.step.numpy()))
            return None
        result = self.final_evaluation()
        self.events.write(Event.FINISHED, step=result.step)
        return result

    def step_ms_median(self) -> float | None:
        """Median over this process's inner loops, after the first (tracing), of ms per step.

        None when no step was trained; the first loop's when it is the only one.
        """
        loops = self.loop_step_ms[1:] or self.loop_step_ms
        return float(np.median(loops)) if loops else None

    def preconditioning(self) -> contextlib.AbstractContextManager[ServicePreconditioning | None]:
        """The service connection of the async mode (None in the other modes).

        Under "multi_worker" only the chief connects (None elsewhere); the others
        take its roots from `root_broadcast`.
        """
        if not self.role.is_chief:
            return contextlib.nullcontext(None)
        return service_connection.preconditioning(
            self.config, self.workdir, self.optimizer, self.events
        )

    def train(self, bridge: ServicePreconditioning | None, until_step: int | None = None) -> None:
        """Trains from the current step to `until_step` (default `train.num_steps`).

        Args:
            bridge: What `preconditioning()` yielded.
            until_step: Stop there (at most `train.num_steps`).
        """
        config = self.config
        step = int(self.step.numpy())
        until = min(until_step or config.train.num_steps, config.train.num_steps)
        if step >= until:
            log.info("already at step %d of %d: nothing to train", step, until)
            return
        log.info(
            "training %s (%s%s, precond.mode=%s) from step %d to %d; %d parameters",
            config.optimizer.name,
            self.optimizer.__class__.__name__,
            f", preconditioner={self.optimizer.preconditioner}"
            if isinstance(self.optimizer, Shampoo)
            else "",
            config.precond.mode,
            step,
            until,
            sum(int(np.prod(v.shape)) for v in self.model.trainable_variables),
        )
        if bridge is not None or self.root_broadcast is not None:
            self.service_work(bridge, step)  # a resumed run pushes at once
        self.controller(bridge).run(until)

    def run_steps(
        self, bridge: ServicePreconditioning | None, num_steps: int
    ) -> tuple[dict[str, np.ndarray], float]:
        """Runs `num_steps` steps as one inner loop, then the host's service work.

        No summaries, checkpoints or evaluations (`train` runs those too);
        benchmarks call this to time steps alone.

        Args:
            bridge: What `preconditioning()` yielded.
            num_steps: Steps to run, >= 1.

        Returns:
            The loop's sums (`step_fn.LOOP_SUMS`: loss_sum, weight_sum, tokens,
            grad_norm_sum over the applied steps; skipped: steps skipped for
            non-finite gradients) and the seconds the inner loop and the service
            work took.
        """
        return self.controller(bridge).run_inner_loop(num_steps)

    def controller(self, bridge: ServicePreconditioning | None) -> Controller:
        """The controller of this trainer's inner loops and actions (see `_actions`)."""
        train = self.config.train
        return Controller(
            self._inner_loop,
            lambda: int(self.step.numpy()),
            self._actions(bridge),
            steps_per_loop=train.steps_per_loop,
            last_step=train.num_steps,
        )

    def _inner_loop(self, num_steps: int) -> dict[str, np.ndarray]:
        values = self._loop_fn(self.iterator, tf.constant(num_steps, tf.int64))
        self.step.assign_add(num_steps)
        return {name: value.numpy() for name, value in values.items()}

    def _actions(self, bridge: ServicePreconditioning | None) -> list[Action]:
        """Host work between inner loops, in the order it runs."""
        train = self.config.train
        actions = []
        if self.root_broadcast is not None:
            # Every worker ends its loops at the same steps (a schedule of the step
            # alone), where the chief installs what the service sent and everyone
            # takes it: at the pushes' multiples of update_steps, and in the
            # repeatable mode also at each push + delay_steps.
            precond = self.config.precond
            actions.append(
                Action(
                    "service",
                    lambda step, _: self.service_work(bridge, step),
                    every_steps=math.gcd(precond.update_steps, precond.delay_steps),
                    part_of_step=True,
                )
            )
        elif bridge is not None:
            actions.append(
                Action(
                    "service",
                    lambda step, _: self.service_work(bridge, step),
                    part_of_step=True,
                    steps_until_due=bridge.steps_until_due,
                )
            )
        actions += [
            Action("checks", self._check_loop, every_seconds=0.0),
            Action(
                "progress",
                lambda step, metrics: self.reporter.progress(step, metrics, bridge),
                every_seconds=train.log_every_s,
                at_loop_end=True,
            ),
            Action(
                "summaries",
                lambda step, metrics: self.reporter.train_summaries(
                    step, metrics, int(self.skipped_steps.numpy()), bridge
                ),
                every_steps=train.summary_every_steps,
                at_last_step=True,
            ),
            Action(
                "checkpoint",
                lambda step, _: self._save_checkpoint(step),
                every_steps=train.checkpoint_every_steps,
                at_last_step=True,
            ),
        ]
        if train.eval_every_steps:  # (on every worker: it ends loops; the chief evaluates)
            actions.append(
                Action("evaluation", self._periodic_evaluation, every_steps=train.eval_every_steps)
            )
        return actions

    def service_work(self, bridge: ServicePreconditioning | None, step: int) -> None:
        """Pushes statistics when due and installs roots that arrived (`bridge.after_steps`).

        Under "multi_worker" every worker calls it at the same step; the chief's
        roots then reach the others (`root_broadcast`), who have no bridge.
        """
        installed = bridge.after_steps() if bridge is not None else 0
        if self.root_broadcast is not None:
            installed = self.root_broadcast(installed)
        if installed:
            log.debug("step %d: installed %d new preconditioners", step, installed)
            self.events.write(Event.ROOTS_INSTALLED, step=step, count=installed)
        if bridge is None:
            return
        restarts = bridge.client.status().restarts_seen
        if restarts > self._restarts_seen:
            self._restarts_seen = restarts
            self.events.write(Event.SERVICE_RESTART_SEEN, step=step, restarts_seen=restarts)

    def _check_loop(self, step: int, metrics: LoopMetrics) -> None:
        """Counts time and loss; stops on a diverging loss or too many skipped steps."""
        self.train_seconds += metrics.seconds
        if metrics.steps:
            self.loop_step_ms.append(1000 * metrics.seconds / metrics.steps)
        if metrics.skipped:
            self._report_skipped(step, metrics.skipped)
        if metrics.weight_sum > 0:  # at least one step was applied
            loss = metrics.loss
            self.last_train_loss = loss
            if not math.isfinite(loss) or loss > self.config.train.max_loss:
                raise FloatingPointError(
                    f"training loss is {loss} at step {step} (limit config.train.max_loss="
                    f"{self.config.train.max_loss}): {_WHAT_TO_TRY}"
                )

    def _report_skipped(self, step: int, skipped: int) -> None:
        in_a_row = int(self.consecutive_skipped.numpy())
        self.reporter.skipped(step, skipped, in_a_row, int(self.skipped_steps.numpy()))
        limit = self.config.train.max_consecutive_skipped_steps
        if in_a_row > limit:
            raise FloatingPointError(
                f"gradients were NaN or infinite in the last {in_a_row} steps, up to step "
                f"{step} (limit config.train.max_consecutive_skipped_steps={limit}): "
                f"{_WHAT_TO_TRY}"
            )

    def _save_checkpoint(self, step: int, quiet: bool = False) -> str:
        path = checkpoints.save(self.manager, step)
        if not quiet:
            log.info("step %d: saved %s", step, path)
        self.events.write(Event.CHECKPOINT_SAVED, step=step, path=path)
        return path

    def _periodic_evaluation(self, step: int, _: LoopMetrics) -> None:
        # The final evaluation follows the loop.
        if step < self.config.train.num_steps and self.role.is_chief:
            self._evaluate("dev", step)

    # ------------------------------------------------------------ evaluation

    def _evaluate(
        self, split: str, step: int, max_bleu_examples: int | None = None
    ) -> evaluation.EvalResult:
        began = time.monotonic()
        result = self.evaluator.evaluate(split, max_bleu_examples=max_bleu_examples)
        self.reporter.evaluated(split, step, result, began)
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
            step_ms_median=self.step_ms_median(),
            bleu_signature=bleu.bleu_signature(),
        )
        write_results(self.workdir, result)
        return result


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainResult | None:
    """Trains and evaluates as `config` says, in `workdir` (resuming from it if possible).

    The process must be set up for `config` first (`process_setup.setup_process`).
    Returns None on a multi-worker job's workers other than the chief.
    """
    return Trainer(config, workdir).train_and_evaluate()
