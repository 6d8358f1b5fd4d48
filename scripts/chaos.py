"""Chaos test: a short training job whose service and trainer are killed at random moments.

    python scripts/chaos.py --steps=300 --seed=0 --out=/tmp/chaos.json

Runs `python -m trainer` (a small Transformer on the generated numbers task, async
Shampoo, a checkpoint every `--checkpoint_every` steps) against a `python -m
precond_service` process that this script starts itself (`--config.precond.address`).
At moments drawn from `--seed` it SIGKILLs the service and starts it again on the same
port after a random downtime, and SIGKILLs the trainer and starts it again with the
same command (it resumes from its newest checkpoint). A service kill waits until fresh
roots have come back after the previous one. Then it runs the same job undisturbed in
another workdir, and reports for both: steps completed, trainer kills with the steps
resumed from and trained again, service outages with the steps and seconds until fresh
roots were installed again, service restarts (made, and noticed by the client),
staleness peaks (from the trainer's progress lines in `workdir/train.log`), final train
and dev loss (`workdir/results.json`) and wall time. The report goes to stdout and, as
JSON, to `--out`.

Exit status 0 when the chaotic run finished and its dev loss is at most
`(1 + --tolerance)` times the undisturbed run's; 1 otherwise (the report says why).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Runs from a checkout without installation too.
sys.path.insert(0, str(REPO_ROOT))

from precond_service.client import wait_for_serving  # noqa: E402
from trainer.service_process import wait_for_port  # noqa: E402

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

# "step 120/300 | loss 0.9519 | ... | staleness 10/10/10 (100% of blocks)" or
# "... | precond: none yet", as trainer/train.py logs them.
PROGRESS = re.compile(
    r"trainer\.train: step (?P<step>\d+)/(?P<total>\d+) \| loss (?P<loss>\S+) .*?"
    r"(?:staleness (?P<min>\S+)/(?P<mean>\S+)/(?P<max>\S+)|precond: none yet)"
)
RESUMED = re.compile(r"resumed from \S+ at step (?P<step>\d+)")
CLIENT_SAW_RESTART = re.compile(r"service at \S+ restarted \(incarnation")

# Seconds a trainer may go without a progress line before the run counts as stalled
# (start-up, tracing and the final evaluation take well under a minute).
STALL_S = 180.0


def log(message: str) -> None:
    """One progress line on stdout, with the time."""
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", flush=True)


def subprocess_env() -> dict[str, str]:
    """The environment of the children: the repository importable, TensorFlow quieter."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "TF_CPP_MIN_LOG_LEVEL": "2"}


class Service:
    """`python -m precond_service` on a loopback port that stays the same across restarts.

    Args:
        log_path: Its stdout and stderr, appended across restarts.
        workers: Worker processes.
    """

    def __init__(self, log_path: Path, workers: int) -> None:
        self.log_path = log_path
        self.workers = workers
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> None:
        """Starts it (on a free port the first time, then on the same one) and waits for SERVING.

        Raises:
            RuntimeError: It did not report SERVING within `timeout_s`.
        """
        with tempfile.TemporaryDirectory() as tmp:
            port_file = Path(tmp, "port")
            port_flags = (
                [f"--port={self.port}"] if self.port else ["--port=0", f"--port_file={port_file}"]
            )
            with open(self.log_path, "ab") as out:
                self.process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "precond_service",
                        *port_flags,
                        f"--workers={self.workers}",
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=REPO_ROOT,
                    env=subprocess_env(),
                )
            try:
                if self.port is None:
                    self.port = wait_for_port(
                        self.process, str(port_file), timeout_s, str(self.log_path)
                    )
                if not wait_for_serving(self.address, timeout_s):
                    raise RuntimeError(
                        f"precond_service did not report SERVING within {timeout_s:.0f} s "
                        f"(exit status {self.process.poll()}); see {self.log_path}"
                    )
            except RuntimeError:
                self.kill()
                raise
        self.starts += 1

    def kill(self) -> None:
        """SIGKILLs it (its idle workers exit when they see it gone)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        """Stops it gracefully (SIGTERM), or kills it after 30 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()


@dataclasses.dataclass
class Chaos:
    """When to kill what: steps (of the trainer's progress lines) and random delays.

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


@dataclasses.dataclass
class TrainerKill:
    """A SIGKILL of the trainer, and where its next incarnation resumed."""

    killed_after_step: int
    resumed_from_step: int | None = None


@dataclasses.dataclass
class ServiceOutage:
    """A SIGKILL of the service, its restart, and the first fresh root after it.

    `fresh_again_at_step` is the step of the first progress line after the restart
    whose freshest root is at most two push periods old; None if none came.
    """

    killed_after_step: int
    down_s: float
    restarted_at_step: int | None = None
    fresh_again_at_step: int | None = None
    fresh_again_after_s: float | None = None


@dataclasses.dataclass
class JobReport:
    """What one run did (see the module docstring)."""

    workdir: str
    finished: bool
    failure: str | None
    step: int | None
    train_loss: float | None
    dev_loss: float | None
    dev_bleu: float | None
    wall_s: float
    trainer_kills: list[TrainerKill]
    steps_trained_again: int
    service_outages: list[ServiceOutage]
    service_restarts: int
    service_exits_not_by_chaos: int
    restarts_seen_by_client: int
    staleness_max_peak: float | None
    staleness_mean_peak: float | None
    staleness_max_median: float | None
    progress_lines_without_roots: int


@dataclasses.dataclass(frozen=True)
class Progress:
    """One progress line: the step and the staleness min/mean/max (None: no roots yet)."""

    step: int
    staleness: tuple[float, float, float] | None
    text: str


class TrainLog:
    """Follows `workdir/train.log`, which every incarnation of the trainer appends to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self.progress: list[Progress] = []
        self.resumed_from: list[int] = []
        self.last_step_before_resume: list[int] = []
        self.restarts_seen = 0

    @property
    def step(self) -> int:
        """The step of the newest progress line (0 before any)."""
        return self.progress[-1].step if self.progress else 0

    def read(self) -> None:
        """Parses the lines written since the last call."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = self._partial + f.read()
                self._offset = f.tell()
        except FileNotFoundError:
            return
        *lines, self._partial = data.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace")
            if match := PROGRESS.search(line):
                held = (
                    None
                    if match["max"] is None
                    else (float(match["min"]), float(match["mean"]), float(match["max"]))
                )
                text = line.split("trainer.train: ", 1)[-1]
                self.progress.append(Progress(int(match["step"]), held, text))
            elif match := RESUMED.search(line):
                self.resumed_from.append(int(match["step"]))
                self.last_step_before_resume.append(self.step)
            elif CLIENT_SAW_RESTART.search(line):
                self.restarts_seen += 1


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
        self.service = Service(self.directory / "service.log", args.workers)
        self.log = TrainLog(self.workdir / "train.log")
        self.trainer: subprocess.Popen | None = None
        self.trainer_lines_at_start = 0  # progress lines before this incarnation
        self.trainer_kills_due = list(chaos.trainer_kills) if chaos else []
        self.service_kills_due = list(zip(chaos.service_kills, chaos.downtimes_s)) if chaos else []
        self.trainer_kills: list[TrainerKill] = []
        self.outages: list[ServiceOutage] = []
        self.kill_trainer_at: float | None = None
        self.service_back_at: float | None = None
        self.service_restarted_at = (0.0, 0)  # time, progress lines then
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
            self.service.start()
            self._start_trainer()
            failure = self._loop(began)
        finally:
            if self.trainer is not None and self.trainer.poll() is None:
                self.trainer.kill()
                self.trainer.wait()
            self.service.stop()
        self.log.read()
        return self._report(failure, time.monotonic() - began)

    def _start_trainer(self) -> None:
        command = trainer_command(self.args, self.workdir, self.service.address, self.command_vocab)
        self.trainer_lines_at_start = len(self.log.progress)
        with open(self.directory / "trainer.out", "ab") as out:
            self.trainer = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO_ROOT,
                env=subprocess_env(),
            )

    def _loop(self, began: float) -> str | None:
        """Watches and disturbs the run until the trainer exits; returns why it failed."""
        last_line_at, last_printed, printed_lines, seen_lines = began, 0.0, 0, 0
        while True:
            now = time.monotonic()
            self.log.read()
            lines = len(self.log.progress)
            if lines != seen_lines:
                last_line_at, seen_lines = now, lines
            if lines > printed_lines and now - last_printed >= self.args.report_every_s:
                self.say(self.log.progress[-1].text)
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
                return f"no progress line for {STALL_S:.0f} s (at step {self.log.step})"
            if self._maybe_kill_trainer(now):
                last_line_at = now
            self._maybe_kill_service(now)
            self._maybe_restart_service(now)
            time.sleep(0.1)

    def _maybe_kill_trainer(self, now: float) -> bool:
        """Kills and restarts the trainer when its next kill is due; returns whether it did.

        A kill is armed once this incarnation has logged a progress line at or after
        the kill's step, and fires a random 0-1.5 s later: inside an inner loop, a
        checkpoint, or the final evaluation.
        """
        trained = len(self.log.progress) > self.trainer_lines_at_start
        if not (self.trainer_kills_due and trained and self.log.step >= self.trainer_kills_due[0]):
            return False
        if self.kill_trainer_at is None:
            self.kill_trainer_at = now + self.chaos.rng.uniform(0.0, 1.5)
        if now < self.kill_trainer_at:
            return False
        self.trainer_kills_due.pop(0)
        self.kill_trainer_at = None
        self.trainer.kill()
        self.trainer.wait()
        self.log.read()
        self.trainer_kills.append(TrainerKill(self.log.step))
        self.say(f"SIGKILLed the trainer after step {self.log.step}; starting it again")
        self._start_trainer()
        return True

    def _maybe_kill_service(self, now: float) -> None:
        """Kills the service when its next kill is due and the last outage is over."""
        if not self.service_kills_due or self.service_back_at is not None:
            return
        if self.outages and self.outages[-1].fresh_again_at_step is None:
            return  # the roots have not recovered from the last outage yet
        step, down_s = self.service_kills_due[0]
        if self.log.step < step:
            return
        self.service_kills_due.pop(0)
        self.service.kill()
        self.service_back_at = now + down_s
        self.outages.append(ServiceOutage(self.log.step, down_s))
        self.say(f"SIGKILLed the service after step {self.log.step}; down for {down_s:.1f} s")

    def _maybe_restart_service(self, now: float) -> None:
        if self.service_back_at is None and self.service.process.poll() is not None:
            self.service_exits_not_by_chaos += 1
            self.say(f"the service exited by itself (status {self.service.process.returncode})")
            self.service_back_at = now + 1.0
        if self.service_back_at is None or now < self.service_back_at:
            return
        try:
            self.service.start()
        except RuntimeError as e:
            self.say(f"{e}; trying again in 1 s")
            self.service_back_at = time.monotonic() + 1.0
            return
        self.service_back_at = None
        self.service_restarted_at = (time.monotonic(), len(self.log.progress))
        if self.outages and self.outages[-1].restarted_at_step is None:
            self.outages[-1].restarted_at_step = self.log.step
        self.say(f"started the service again on {self.service.address}")

    def _note_fresh_roots(self, now: float) -> None:
        """Records the first fresh root after the last service restart."""
        if not self.outages or self.outages[-1].fresh_again_at_step is not None:
            return
        outage = self.outages[-1]
        if outage.restarted_at_step is None:
            return
        restarted_s, lines_then = self.service_restarted_at
        for progress in self.log.progress[lines_then:]:
            if progress.staleness is not None and progress.staleness[0] <= self.fresh_limit:
                outage.fresh_again_at_step = progress.step
                outage.fresh_again_after_s = round(now - restarted_s, 1)
                self.say(
                    f"fresh roots again at step {progress.step}, "
                    f"{outage.fresh_again_after_s:.1f} s after the service restart"
                )
                return

    def _report(self, failure: str | None, wall_s: float) -> JobReport:
        results = _read_results(self.workdir)
        finished = (
            failure is None and results is not None and results.get("step") == self.args.steps
        )
        if failure is None and not finished:
            failure = f"no results.json at step {self.args.steps} in {self.workdir}"
        for kill, resumed in zip(self.trainer_kills, self.log.resumed_from):
            kill.resumed_from_step = resumed
        held = [p.staleness for p in self.log.progress if p.staleness is not None]
        results = results or {}
        report = JobReport(
            workdir=str(self.workdir),
            finished=finished,
            failure=failure,
            step=results.get("step"),
            train_loss=_finite_or_none(results.get("train_loss")),
            dev_loss=results.get("dev_loss"),
            dev_bleu=results.get("dev_bleu"),
            wall_s=round(wall_s, 1),
            trainer_kills=self.trainer_kills,
            steps_trained_again=sum(
                max(0, last - resumed)
                for last, resumed in zip(self.log.last_step_before_resume, self.log.resumed_from)
            ),
            service_outages=self.outages,
            service_restarts=self.service.starts - 1,
            service_exits_not_by_chaos=self.service_exits_not_by_chaos,
            restarts_seen_by_client=self.log.restarts_seen,
            staleness_max_peak=max((s[2] for s in held), default=None),
            staleness_mean_peak=max((s[1] for s in held), default=None),
            staleness_max_median=_median([s[2] for s in held]),
            progress_lines_without_roots=sum(p.staleness is None for p in self.log.progress),
        )
        self.say(f"{'finished' if finished else 'FAILED: ' + str(failure)} in {report.wall_s} s")
        return report


def _read_results(workdir: Path) -> dict | None:
    try:
        return json.loads((workdir / "results.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


def _finite_or_none(value: float | None) -> float | None:
    """`value`, or None for NaN or infinity (which JSON cannot hold)."""
    return value if value is not None and math.isfinite(value) else None


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def verdict(
    chaotic: JobReport, undisturbed: JobReport, tolerance: float
) -> tuple[list[str], list[str]]:
    """Why the chaotic run fails (empty if it passes), and what else looks wrong."""
    problems, warnings = [], []
    if not chaotic.finished:
        problems.append(f"the chaotic run did not finish: {chaotic.failure}")
    if not undisturbed.finished:
        problems.append(f"the undisturbed run did not finish: {undisturbed.failure}")
    if chaotic.finished and undisturbed.finished:
        limit = undisturbed.dev_loss * (1 + tolerance)
        if not (chaotic.dev_loss is not None and chaotic.dev_loss <= limit):
            problems.append(
                f"chaotic dev loss {chaotic.dev_loss:.4f} exceeds the undisturbed "
                f"{undisturbed.dev_loss:.4f} by more than --tolerance={tolerance} "
                f"(limit {limit:.4f})"
            )
        if chaotic.train_loss is None:
            warnings.append(
                "the chaotic run's results.json has no finite train_loss (the trainer was "
                "killed after its last step and the resumed one trained no step)"
            )
    for outage in chaotic.service_outages:
        if outage.restarted_at_step is not None and outage.fresh_again_at_step is None:
            warnings.append(
                f"no fresh root came after the service restart at step "
                f"{outage.restarted_at_step} (the run ended at step {chaotic.step})"
            )
    for label, run in (("chaotic", chaotic), ("undisturbed", undisturbed)):
        if run.service_exits_not_by_chaos:
            warnings.append(
                f"the {label} run's service exited by itself {run.service_exits_not_by_chaos} "
                "time(s)"
            )
    return problems, warnings


def print_report(report: dict) -> None:
    """The report as a table of the two runs, then the verdict."""
    runs = [report["chaotic"], report["undisturbed"]]

    def outages(run: dict, field: str) -> list:
        return [outage[field] for outage in run["service_outages"]]

    rows = [
        ("finished", [run["finished"] for run in runs]),
        ("step", [run["step"] for run in runs]),
        ("dev loss", [run["dev_loss"] for run in runs]),
        ("train loss (last loop)", [run["train_loss"] for run in runs]),
        ("dev BLEU", [run["dev_bleu"] for run in runs]),
        ("wall time (s)", [run["wall_s"] for run in runs]),
        (
            "trainer killed after step",
            [[k["killed_after_step"] for k in r["trainer_kills"]] for r in runs],
        ),
        (
            "trainer resumed from step",
            [[k["resumed_from_step"] for k in r["trainer_kills"]] for r in runs],
        ),
        ("steps trained again", [run["steps_trained_again"] for run in runs]),
        ("service killed after step", [outages(run, "killed_after_step") for run in runs]),
        ("service down (s)", [outages(run, "down_s") for run in runs]),
        ("service back at step", [outages(run, "restarted_at_step") for run in runs]),
        ("fresh roots at step", [outages(run, "fresh_again_at_step") for run in runs]),
        ("fresh roots after (s)", [outages(run, "fresh_again_after_s") for run in runs]),
        ("service restarts", [run["service_restarts"] for run in runs]),
        ("restarts seen by client", [run["restarts_seen_by_client"] for run in runs]),
        ("service exits not chaos's", [run["service_exits_not_by_chaos"] for run in runs]),
        ("staleness max: peak", [run["staleness_max_peak"] for run in runs]),
        ("staleness max: median", [run["staleness_max_median"] for run in runs]),
        ("staleness mean: peak", [run["staleness_mean_peak"] for run in runs]),
        ("lines without roots", [run["progress_lines_without_roots"] for run in runs]),
    ]
    print(f"\n{'':27}{'chaotic':>26}{'undisturbed':>26}")
    for name, values in rows:
        cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in values]
        print(f"{name:27}{cells[0]:>26}{cells[1]:>26}")
    for warning in report["warnings"]:
        print(f"warning: {warning}")
    print("\nPASS" if report["passed"] else "\nFAIL: " + "; ".join(report["problems"]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps of each run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    parser.add_argument("--out", required=True, help="write the JSON report here")
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
    problems, warnings = verdict(chaotic, undisturbed, args.tolerance)
    passed = not problems
    report = {
        "seed": args.seed,
        "steps": args.steps,
        "checkpoint_every": args.checkpoint_every,
        "tolerance": args.tolerance,
        "passed": passed,
        "problems": problems,
        "warnings": warnings,
        "chaotic": dataclasses.asdict(chaotic),
        "undisturbed": dataclasses.asdict(undisturbed),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    log(f"report written to {args.out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
