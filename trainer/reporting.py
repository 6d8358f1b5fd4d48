"""What a run tells people and programs: progress lines, TensorBoard scalars, events.

People read the log and TensorBoard; programs (scripts, tests) read
`WORKDIR/events.jsonl` (`precond_service.common.events`), whose kinds and fields do
not change when the log's wording does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time

import keras
import ml_collections
import numpy as np
import tensorflow as tf

from precond_service.common.events import Event, EventLog
from trainer.controller import LoopMetrics
from trainer.evaluation import EvalResult
from trainer.optimizers import Shampoo
from trainer.optimizers.service_bridge import (
    ServicePreconditioning,
    Staleness,
    block_ages,
    staleness,
)
from trainer.service_figures import ServiceStatusPoller, service_scalars

# The trainer's log lines keep the logger name they always had: scripts and
# tests still filter the console by it.
log = logging.getLogger("trainer.train")

EVENTS_FILE = "events.jsonl"


def write_scalars(
    writer: tf.summary.SummaryWriter,
    step: int,
    scalars: dict[str, float | None],
    histograms: dict[str, np.ndarray] | None = None,
) -> None:
    """Writes `scalars` (None values left out) and `histograms` at `step`, and flushes."""
    with writer.as_default(step=step):
        for name, value in scalars.items():
            if value is not None:
                tf.summary.scalar(name, value)
        for name, values in (histograms or {}).items():
            if len(values):
                tf.summary.histogram(name, values)
    writer.flush()


def format_duration(seconds: float) -> str:
    """`M:SS` or `H:MM:SS`; "?" when not finite."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Reporter:
    """Reports a run's progress, summaries, evaluations and events.

    Args:
        config: The run's config.
        optimizer: The run's optimizer (staleness is reported for Shampoo).
        writer: TensorBoard summary writer.
        events: The run's event log.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        optimizer: keras.optimizers.Optimizer,
        writer: tf.summary.SummaryWriter,
        events: EventLog,
    ):
        self.config = config
        self.optimizer = optimizer
        self.writer = writer
        self.events = events
        # GetStatus of the service(s), fetched on a thread at the summary cadence.
        self._status_poller: ServiceStatusPoller | None = None

    def staleness(self) -> Staleness | None:
        """Age of the roots held; None when the run has no preconditioning."""
        if not isinstance(self.optimizer, Shampoo) or self.config.precond.mode == "off":
            return None
        return staleness(self.optimizer)

    def progress(
        self,
        step: int,
        metrics: LoopMetrics,
        bridge: ServicePreconditioning | None,
    ) -> None:
        """One progress line in the log (the ETA at the recent speed) and a PROGRESS event."""
        remaining_s = (self.config.train.num_steps - step) * metrics.step_time
        held = self.staleness()
        precond = ""
        if held is not None and held.fraction_preconditioned == 0:
            precond = " | precond: none yet"
        elif held is not None:
            precond = (
                f" | staleness min/mean/max {held.min:.0f}/{held.mean:.0f}/{held.max:.0f}"
                f" ({held.fraction_preconditioned:.0%} of blocks)"
            )
        if bridge is not None:
            status = bridge.client.status()
            if not status.connected and status.last_error is not None:
                precond += " | service unreachable"
        log.info(
            "step %d/%d | loss %.4f | %.0f tok/s | %.1f ms/step | lr %.2e | ETA %s%s",
            step,
            self.config.train.num_steps,
            metrics.loss,
            metrics.tokens_per_second,
            1000 * metrics.step_time,
            float(self.optimizer.learning_rate.numpy()),
            format_duration(remaining_s),
            precond,
        )
        nan = float("nan")
        self.events.write(
            Event.PROGRESS,
            step=step,
            loss=metrics.loss if metrics.weight_sum > 0 else None,
            step_ms=1000 * metrics.step_time,
            staleness_min=held.min if held else nan,
            staleness_mean=held.mean if held else nan,
            staleness_max=held.max if held else nan,
        )

    def train_summaries(
        self,
        step: int,
        metrics: LoopMetrics,
        total_skipped: int,
        bridge: ServicePreconditioning | None,
    ) -> None:
        """TensorBoard scalars of training, the preconditioners and the service.

        Also, for Shampoo: histograms over blocks of the roots' staleness and (from
        the service) their solver error, and per variable the cosine between
        Shampoo's direction and the graft's update (`precond/direction_cosine/...`).
        """
        scalars: dict[str, float | None] = {
            "train/loss": metrics.loss,
            "train/learning_rate": float(self.optimizer.learning_rate.numpy()),
            "train/grad_norm": metrics.grad_norm,
            "train/tokens_per_second": metrics.tokens_per_second,
            "train/step_time_ms": 1000 * metrics.step_time,
            "train/skipped_steps": total_skipped,
        }
        histograms: dict[str, np.ndarray] = {}
        held = self.staleness()
        if held is not None:
            some = held.fraction_preconditioned > 0
            scalars["precond/fraction_preconditioned"] = held.fraction_preconditioned
            scalars["precond/staleness_min"] = held.min if some else None
            scalars["precond/staleness_mean"] = held.mean if some else None
            scalars["precond/staleness_max"] = held.max if some else None
            histograms["precond/staleness"] = block_ages(self.optimizer)
            for path, cosine in self.optimizer.direction_cosines().items():
                if math.isfinite(cosine):
                    scalars[f"precond/direction_cosine/{path}"] = cosine
        if bridge is not None:
            scalars.update(_service_scalars(bridge))
            scalars.update(self._service_figures(bridge))
            errors = [block.error for block in bridge.client.latest().values()]
            histograms["precond/root_error"] = np.array(errors, dtype=np.float64)
        write_scalars(self.writer, step, scalars, histograms)

    def _service_figures(self, bridge: ServicePreconditioning) -> dict[str, float | None]:
        """The service's own figures as last fetched (none before the first fetch returns)."""
        if self._status_poller is None:
            self._status_poller = ServiceStatusPoller(bridge.client)
        statuses = self._status_poller.latest()
        return service_scalars(statuses) if statuses else {}

    def skipped(self, step: int, count: int, in_a_row: int, total: int) -> None:
        """Steps skipped for non-finite gradients: a warning and a SKIPPED_STEPS event."""
        log.warning(
            "step %d: skipped %d step(s) with NaN or infinite gradients (%d in a row, %d in all)",
            step,
            count,
            in_a_row,
            total,
        )
        self.events.write(
            Event.SKIPPED_STEPS, step=step, count=count, in_a_row=in_a_row, total=total
        )

    def evaluated(self, split: str, step: int, result: EvalResult, began: float) -> None:
        """An evaluation's scalars, translations, log line and EVALUATED event."""
        write_scalars(
            self.writer,
            step,
            {
                f"{split}/loss": result.loss,
                f"{split}/accuracy": result.accuracy,
                f"{split}/bleu": result.bleu,
            },
        )
        if result.examples:
            text = "\n\n".join(
                f"    {src}\n    -> {hyp}\n    ref {ref}" for src, hyp, ref in result.examples
            )
            with self.writer.as_default(step=step):
                tf.summary.text(f"{split}/translations", text)
            self.writer.flush()
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
        self.events.write(
            Event.EVALUATED, step=step, split=split, loss=result.loss, bleu=result.bleu
        )


def _service_scalars(bridge: ServicePreconditioning) -> dict[str, float | None]:
    status = bridge.client.status()
    roots = bridge.client.latest()
    errors = np.array([block.error for block in roots.values()]) if roots else None

    def ms(seconds: float | None) -> float | None:
        return None if seconds is None else 1000 * seconds

    return {
        "precond/root_error_mean": None if errors is None else float(errors.mean()),
        "precond/root_error_max": None if errors is None else float(errors.max()),
        "precond/push_latency_ms": ms(status.last_push_latency_s),
        "precond/pull_latency_ms": ms(status.last_pull_latency_s),
        "precond/service_restarts_seen": status.restarts_seen,
        "precond/push_failures": status.push_failures,
        "precond/connected": float(status.connected),
        "precond/delay_wait_seconds": bridge.wait_seconds if bridge.delay_steps else None,
        # Roots the service reported it could not compute (the block keeps its root).
        "precond/root_failures_seen": status.root_failures_seen,
    }


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
    step_ms_median: float | None
    bleu_signature: str


def write_results(workdir: str, result: TrainResult) -> str:
    """Writes `result` to `workdir/results.json`; returns the path."""
    path = os.path.join(workdir, "results.json")
    with open(path, "w") as f:
        json.dump(dataclasses.asdict(result), f, indent=2)
    return path
