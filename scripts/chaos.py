# Over 400 lines for a reason: one chaos job, its kill schedule and its checks, top to bottom.
"""Chaos test: a short training job whose service and trainer are killed at random moments.

    python -m scripts.chaos --steps=300 --seed=0 --out=/tmp/chaos.json

Runs `python -m trainer` (a small Transformer on the numbers task, async Shampoo) against
a `python -m precond_service` it starts itself. At moments drawn from `--seed` it SIGKILLs
the service (started again on the same port after a random downtime, once fresh roots
came back after the previous kill) and the trainer (started again with the same command:
it resumes from its newest checkpoint). Then it runs the same job undisturbed. What both
runs did is read from the events the trainer writes to `workdir/events.jsonl` and
reported by `chaos_report.py` (see scripts/README.md), to stdout and as JSON to `--out`
(default benchmarks/chaos.json), with the verdict's criteria as targets.

Exit status 0 when both runs finished and the chaotic run's dev loss is at most
`(1 + --tolerance)` times the undisturbed run's; 1 otherwise (the report says why).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from precond_service.client.process import ServiceProcess, start_service
from scripts import harness
from scripts.chaos_report import (
    JobReport,
    ServiceOutage,
    TrainerEvents,
    TrainerKill,
    both_runs_report,
    describe_progress,
    job_report,
    print_report,
)

SOURCES = (*harness.PRODUCT, "scripts/chaos.py", "scripts/chaos_report.py")

# configs/quickstart.py made smaller: 300 steps train in well under a minute on 2 cores.
TRAINER_OVERRIDES = {
    "train.steps_per_loop": 10,
    "train.summary_every_steps": 10,
    "train.eval_every_steps": 0,
    "train.log_every_s": 0.0,
    "data.numbers_train_size": 5000,
    "data.numbers_eval_size": 100,
    "data.vocab_train_sentences": 10_000,
    "data.tokens_per_batch": 1024,
    "data.eval_bleu_examples": 20,
    "model.num_layers": 1,
    "model.d_model": 64,
    "model.num_heads": 2,
    "model.d_ff": 128,
    "precond.update_steps": 10,
    "precond.pull_interval_s": 0.2,
}

# Command-line settings that the JSON report repeats.
SETTINGS_REPORTED = ("seed", "steps", "checkpoint_every", "tolerance")

# Seconds a trainer may go without a progress event before the run counts as stalled
# (start-up, tracing and the final evaluation take well under a minute).
STALL_S = 180.0


def log(message: str) -> None:
    """One progress line on stdout, with the time."""
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", flush=True)


def subprocess_env() -> dict[str, str]:
    """The environment of the trainer (started from the repository root): TensorFlow quieter."""
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


@dataclasses.dataclass
class Chaos:
    """When to kill what: steps (of the trainer's progress events) and random delays.

    Attributes:
        trainer_kills: Steps at or after which the trainer is killed, ascending.
        service_kills: Steps at or after which the service is killed, ascending.
        downtimes_s: Seconds the service stays down after each kill.
        rng: Draws the extra delay of each trainer kill after its step is reached.
    """

    trainer_kills: list[int]
    service_kills: list[int]
    downtimes_s: list[float]
    rng: random.Random

    @classmethod
    def draw(cls, args: argparse.Namespace) -> Chaos:
        """A schedule from `--seed`: trainer kills anywhere, service kills in the first 2/3."""
        rng = random.Random(args.seed)
        low = max(1, args.steps // 10)
        trainer = sorted(rng.randint(low, args.steps) for _ in range(args.trainer_kills))
        service = sorted(rng.randint(low, args.steps * 2 // 3) for _ in range(args.service_kills))
        downtimes = [round(rng.uniform(args.min_down_s, args.max_down_s), 2) for _ in service]
        return cls(trainer, service, downtimes, rng)


def trainer_command(args: argparse.Namespace, workdir: Path, address: str, vocab: Path) -> list:
    """The `python -m trainer` command of a run (the same for every incarnation)."""
    overrides = {
        **TRAINER_OVERRIDES,
        "train.num_steps": args.steps,
        "train.checkpoint_every_steps": args.checkpoint_every,
        "precond.address": address,
        "data.vocab_path": str(vocab),
    }
    return [
        sys.executable,
        "-m",
        "trainer",
        f"--config={args.config}",
        f"--workdir={workdir}",
        *(f"--config.{name}={value}" for name, value in overrides.items()),
        *args.trainer_flag,
    ]


class Job:
    """One training run to its end, with its service, killing both as `chaos` says.

    Args:
        label: Names the run in output and its directory under `root`.
        root: Directory of all runs (the shared vocabulary lives there).
        args: The command line.
        chaos: The kill schedule; None for an undisturbed run.
    """

    def __init__(
        self, label: str, root: Path, args: argparse.Namespace, chaos: Chaos | None
    ) -> None:
        self.label = label
        self.args = args
        self.chaos = chaos
        self.directory = root / label
        self.workdir = self.directory / "work"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.command_vocab = root / "spm.model"
        self.service: ServiceProcess | None = None  # on the same port after each restart
        self.service_starts = 0
        self.events = TrainerEvents(self.workdir / "events.jsonl")
        self.trainer: subprocess.Popen | None = None
        self.progress_at_start = 0  # progress events before this incarnation
        self.trainer_kills_due = list(chaos.trainer_kills) if chaos else []
        self.service_kills_due = list(zip(chaos.service_kills, chaos.downtimes_s)) if chaos else []
        self.trainer_kills: list[TrainerKill] = []
        self.outages: list[ServiceOutage] = []
        self.kill_trainer_at: float | None = None
        self.service_back_at: float | None = None
        self.service_restarted_at = (0.0, 0)  # time, progress events then
        self.service_exits_not_by_chaos = 0
        # A root this old or fresher counts as fresh: two push periods.
        self.fresh_limit = 2 * TRAINER_OVERRIDES["precond.update_steps"]

    def say(self, message: str) -> None:
        log(f"{self.label}: {message}")

    def run(self) -> JobReport:
        """Runs the job; returns its report (also when it failed)."""
        began = time.monotonic()
        failure = None
        self.say(f"starting the service and the trainer in {self.workdir}")
        try:
            self._start_service()
            self._start_trainer()
            failure = self._loop(began)
        finally:
            if self.trainer is not None and self.trainer.poll() is None:
                self.trainer.kill()
                self.trainer.wait()
            if self.service is not None:
                self.service.stop(timeout_s=30)
        self.events.read()
        return self._report(failure, time.monotonic() - began)

    def _start_service(self) -> None:
        """Starts the service (on a free port, then on the same one) and waits for SERVING.

        Raises:
            RuntimeError: It did not report SERVING within a minute.
        """
        self.service = start_service(
            [f"--workers={self.args.workers}"],
            port=0 if self.service is None else self.service.port,
            log_path=self.directory / "service.log",
        )
        self.service_starts += 1

    def _start_trainer(self) -> None:
        command = trainer_command(self.args, self.workdir, self.service.address, self.command_vocab)
        self.progress_at_start = len(self.events.progress)
        with open(self.directory / "trainer.out", "ab") as out:
            self.trainer = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=harness.REPO_ROOT,
                env=subprocess_env(),
            )

    def _loop(self, began: float) -> str | None:
        """Watches and disturbs the run until the trainer exits; returns why it failed."""
        last_line_at, last_printed, printed_lines, seen_lines = began, 0.0, 0, 0
        while True:
            now = time.monotonic()
            self.events.read()
            lines = len(self.events.progress)
            if lines != seen_lines:
                last_line_at, seen_lines = now, lines
            if lines > printed_lines and now - last_printed >= self.args.report_every_s:
                self.say(describe_progress(self.events.progress[-1]))
                last_printed, printed_lines = now, lines
            self._note_fresh_roots(now)

            status = self.trainer.poll()
            if status is not None:
                if status:
                    return (
                        f"the trainer exited with status {status}; see {self.directory}/trainer.out"
                    )
                return None
            if now - began > self.args.timeout_s:
                return f"not finished within --timeout_s={self.args.timeout_s:.0f}"
            if now - last_line_at > STALL_S:
                return f"no progress event for {STALL_S:.0f} s (at step {self.events.step})"
            if self._maybe_kill_trainer(now):
                last_line_at = now
            self._maybe_kill_service(now)
            self._maybe_restart_service(now)
            time.sleep(0.1)

    def _maybe_kill_trainer(self, now: float) -> bool:
        """Kills and restarts the trainer when its next kill is due; returns whether it did.

        A kill is armed once this incarnation has written a progress event at or after
        the kill's step, and fires a random 0-1.5 s later: inside an inner loop, a
        checkpoint, or the final evaluation.
        """
        trained = len(self.events.progress) > self.progress_at_start
        if not (
            self.trainer_kills_due and trained and self.events.step >= self.trainer_kills_due[0]
        ):
            return False
        if self.kill_trainer_at is None:
            self.kill_trainer_at = now + self.chaos.rng.uniform(0.0, 1.5)
        if now < self.kill_trainer_at:
            return False
        self.trainer_kills_due.pop(0)
        self.kill_trainer_at = None
        self.trainer.kill()
        self.trainer.wait()
        self.events.read()
        self.trainer_kills.append(TrainerKill(self.events.step))
        self.say(f"SIGKILLed the trainer after step {self.events.step}; starting it again")
        self._start_trainer()
        return True

    def _maybe_kill_service(self, now: float) -> None:
        """Kills the service when its next kill is due and the last outage is over."""
        if not self.service_kills_due or self.service_back_at is not None:
            return
        if self.outages and self.outages[-1].fresh_again_at_step is None:
            return  # the roots have not recovered from the last outage yet
        step, down_s = self.service_kills_due[0]
        if self.events.step < step:
            return
        self.service_kills_due.pop(0)
        self.service.kill()  # its idle workers exit when they see it gone
        self.service_back_at = now + down_s
        self.outages.append(ServiceOutage(self.events.step, down_s))
        self.say(f"SIGKILLed the service after step {self.events.step}; down for {down_s:.1f} s")

    def _maybe_restart_service(self, now: float) -> None:
        status = self.service.poll()
        if self.service_back_at is None and status is not None:
            self.service_exits_not_by_chaos += 1
            self.say(f"the service exited by itself (status {status})")
            self.service_back_at = now + 1.0
        if self.service_back_at is None or now < self.service_back_at:
            return
        try:
            self._start_service()
        except RuntimeError as e:
            self.say(f"{e}; trying again in 1 s")
            self.service_back_at = time.monotonic() + 1.0
            return
        self.service_back_at = None
        self.service_restarted_at = (time.monotonic(), len(self.events.progress))
        if self.outages and self.outages[-1].restarted_at_step is None:
            self.outages[-1].restarted_at_step = self.events.step
        self.say(f"started the service again on {self.service.address}")

    def _note_fresh_roots(self, now: float) -> None:
        """Records the first fresh root after the last service restart."""
        if not self.outages or self.outages[-1].fresh_again_at_step is not None:
            return
        outage = self.outages[-1]
        if outage.restarted_at_step is None:
            return
        restarted_s, lines_then = self.service_restarted_at
        for progress in self.events.progress[lines_then:]:
            freshest = progress.get("staleness_min")
            if freshest is not None and freshest <= self.fresh_limit:
                outage.fresh_again_at_step = progress["step"]
                outage.fresh_again_after_s = round(now - restarted_s, 1)
                self.say(
                    f"fresh roots again at step {progress['step']}, "
                    f"{outage.fresh_again_after_s:.1f} s after the service restart"
                )
                return

    def _report(self, failure: str | None, wall_s: float) -> JobReport:
        report = job_report(
            self.events,
            steps=self.args.steps,
            failure=failure,
            wall_s=wall_s,
            trainer_kills=self.trainer_kills,
            outages=self.outages,
            service_restarts=self.service_starts - 1,
            service_exits_not_by_chaos=self.service_exits_not_by_chaos,
        )
        self.say(
            f"{'finished' if report.finished else 'FAILED: ' + str(report.failure)} "
            f"in {report.wall_s} s"
        )
        return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps of each run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    parser.add_argument("--out", default="benchmarks/chaos.json", help="write the JSON report here")
    parser.add_argument("--workdir", help="directory of both runs (default: a new temporary one)")
    parser.add_argument("--config", default="configs/quickstart.py", help="trainer config file")
    parser.add_argument(
        "--trainer_flag",
        action="append",
        default=[],
        help="further trainer flag, e.g. --trainer_flag=--config.seed=1 (repeatable)",
    )
    parser.add_argument("--checkpoint_every", type=int, default=20, help="steps per checkpoint")
    parser.add_argument("--trainer_kills", type=int, default=2, help="SIGKILLs of the trainer")
    parser.add_argument("--service_kills", type=int, default=2, help="SIGKILLs of the service")
    parser.add_argument("--min_down_s", type=float, default=0.5, help="shortest service downtime")
    parser.add_argument("--max_down_s", type=float, default=3.0, help="longest service downtime")
    parser.add_argument("--workers", type=int, default=1, help="service worker processes")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.1,
        help="largest relative excess of the chaotic run's dev loss over the undisturbed one's",
    )
    parser.add_argument("--timeout_s", type=float, default=1800, help="longest run, each")
    parser.add_argument("--report_every_s", type=float, default=5.0, help="progress line period")
    args = parser.parse_args(argv)
    if args.steps < 10:
        parser.error(f"--steps must be >= 10, got {args.steps}")
    if args.checkpoint_every < 1:
        parser.error(f"--checkpoint_every must be >= 1, got {args.checkpoint_every}")
    if not 0 < args.min_down_s <= args.max_down_s:
        parser.error(
            f"need 0 < --min_down_s <= --max_down_s, got {args.min_down_s} and {args.max_down_s}"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="chaos_")).resolve()
    chaos = Chaos.draw(args)
    log(
        f"seed {args.seed}: trainer kills at steps {chaos.trainer_kills}, service kills at "
        f"steps {chaos.service_kills} (down {[round(d, 1) for d in chaos.downtimes_s]} s); "
        f"runs in {root}"
    )
    # Stop on Ctrl-C or SIGTERM with the children stopped (Job.run's `finally`).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    chaotic = Job("chaotic", root, args, chaos).run()
    undisturbed = Job("undisturbed", root, args, None).run()
    settings = {name: getattr(args, name) for name in SETTINGS_REPORTED}
    report = both_runs_report(chaotic, undisturbed, settings, args.tolerance)
    verdicts = targets(chaotic, undisturbed, args.tolerance)
    harness.write(
        args.out,
        benchmark="chaos",
        sources=SOURCES,
        results=report,
        targets=verdicts,
        # No pinning: each run's trainer and service share every core.
        split={"service_workers": args.workers, "pinning": None},
    )
    print_report(report)
    for name, row in verdicts.items():
        print(f"target {name}: {row}")
    log(f"report written to {args.out}")
    return 0 if report["passed"] else 1


def targets(
    chaotic: JobReport, undisturbed: JobReport, tolerance: float
) -> dict[str, dict[str, Any]]:
    """The criteria of `chaos_report.verdict` as targets.

    Both runs finished, and the chaotic run's final dev loss is at most `tolerance` above
    the undisturbed run's, relative (None, not met, where either run has none).
    """
    excess = None
    if chaotic.dev_loss is not None and undisturbed.dev_loss:
        excess = chaotic.dev_loss / undisturbed.dev_loss - 1
    return {
        "chaotic run finished": harness.target(int(chaotic.finished), ">= 1"),
        "undisturbed run finished": harness.target(int(undisturbed.finished), ">= 1"),
        "chaotic run's final dev loss over the undisturbed run's, relative": harness.target(
            excess, f"<= {tolerance:g}"
        ),
    }


if __name__ == "__main__":
    sys.exit(main())
