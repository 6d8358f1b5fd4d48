"""What a chaos run did, from the trainer's event log: figures, the verdict and the table.

`scripts/chaos.py` kills and restarts the processes of a job; this module reads what
the trainer wrote to `WORKDIR/events.jsonl` (`precond_service.common.events`) and turns it,
with chaos's own record of its kills, into a `JobReport`, decides pass or fail
(`verdict`), and prints both runs side by side (`print_report`).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from typing import Any

from precond_service.common.events import Event, read_events


@dataclasses.dataclass
class TrainerKill:
    """A SIGKILL of the trainer, and where its next incarnation resumed."""

    killed_after_step: int
    resumed_from_step: int | None = None


@dataclasses.dataclass
class ServiceOutage:
    """A SIGKILL of the service, its restart, and the first fresh root after it.

    `fresh_again_at_step` is the step of the first progress event after the restart
    whose freshest root is at most two push periods old; None if none came.
    """

    killed_after_step: int
    down_s: float
    restarted_at_step: int | None = None
    fresh_again_at_step: int | None = None
    fresh_again_after_s: float | None = None


@dataclasses.dataclass
class JobReport:
    """What one run did (see chaos.py's docstring)."""

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
    progress_without_roots: int


class TrainerEvents:
    """The events of `WORKDIR/events.jsonl`, which every incarnation of the trainer appends to.

    Args:
        path: The event log.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []

    def read(self) -> None:
        """Reads the log again (it is small: one progress event per inner loop)."""
        self.events = read_events(self.path)

    def of(self, event: Event) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == event]

    @property
    def progress(self) -> list[dict[str, Any]]:
        """PROGRESS events: step, loss, step_ms, staleness_min/mean/max (None: no roots)."""
        return self.of(Event.PROGRESS)

    @property
    def step(self) -> int:
        """The step of the newest progress event (0 before any)."""
        progress = self.progress
        return progress[-1]["step"] if progress else 0

    def resumes(self) -> list[tuple[int, int]]:
        """(last progress step before it, step resumed from) of each RESUMED event."""
        found, last_step = [], 0
        for event in self.events:
            if event["event"] == Event.PROGRESS:
                last_step = event["step"]
            elif event["event"] == Event.RESUMED:
                found.append((last_step, event["step"]))
        return found

    def finished_step(self) -> int | None:
        finished = self.of(Event.FINISHED)
        return finished[-1]["step"] if finished else None

    def final_dev(self) -> dict[str, Any]:
        """The last dev EVALUATED event ({} if none): step, loss, bleu."""
        dev = [e for e in self.of(Event.EVALUATED) if e.get("split") == "dev"]
        return dev[-1] if dev else {}


def describe_progress(event: dict[str, Any]) -> str:
    """One line for a progress event, like the trainer's own."""
    line = f"step {event['step']} | loss {_number(event.get('loss'))}"
    if event.get("staleness_max") is None:
        return line + " | precond: none yet"
    ages = (event["staleness_min"], event["staleness_mean"], event["staleness_max"])
    return line + " | staleness min/mean/max " + "/".join(_number(age) for age in ages)


def _number(value: float | None) -> str:
    return "nan" if value is None else f"{value:.4g}"


def job_report(
    events: TrainerEvents,
    *,
    steps: int,
    failure: str | None,
    wall_s: float,
    trainer_kills: list[TrainerKill],
    outages: list[ServiceOutage],
    service_restarts: int,
    service_exits_not_by_chaos: int,
) -> JobReport:
    """The report of one run from its events and chaos's record of what it did to it."""
    events.read()
    finished_step = events.finished_step()
    finished = failure is None and finished_step == steps
    if failure is None and not finished:
        failure = f"no FINISHED event at step {steps} in {events.path}"
    resumes = events.resumes()
    for kill, (_, resumed) in zip(trainer_kills, resumes):
        kill.resumed_from_step = resumed
    progress = events.progress
    held = [p for p in progress if p.get("staleness_max") is not None]
    dev = events.final_dev()
    return JobReport(
        workdir=os.path.dirname(os.fspath(events.path)),
        finished=finished,
        failure=failure,
        step=finished_step,
        train_loss=progress[-1].get("loss") if progress else None,
        dev_loss=dev.get("loss"),
        dev_bleu=dev.get("bleu"),
        wall_s=round(wall_s, 1),
        trainer_kills=trainer_kills,
        steps_trained_again=sum(max(0, last - resumed) for last, resumed in resumes),
        service_outages=outages,
        service_restarts=service_restarts,
        service_exits_not_by_chaos=service_exits_not_by_chaos,
        restarts_seen_by_client=len(events.of(Event.SERVICE_RESTART_SEEN)),
        staleness_max_peak=max((p["staleness_max"] for p in held), default=None),
        staleness_mean_peak=max((p["staleness_mean"] for p in held), default=None),
        staleness_max_median=(
            statistics.median(p["staleness_max"] for p in held) if held else None
        ),
        progress_without_roots=len(progress) - len(held),
    )


def verdict(
    chaotic: JobReport, undisturbed: JobReport, tolerance: float
) -> tuple[list[str], list[str]]:
    """Why the chaotic run fails (empty if it passes), and what else looks wrong."""
    problems, warnings = [], []
    for label, run in (("chaotic", chaotic), ("undisturbed", undisturbed)):
        if not run.finished:
            problems.append(f"the {label} run did not finish: {run.failure}")
        elif run.dev_loss is None:
            problems.append(f"the {label} run has no dev EVALUATED event")
    if not problems:
        limit = undisturbed.dev_loss * (1 + tolerance)
        if not chaotic.dev_loss <= limit:
            problems.append(
                f"chaotic dev loss {chaotic.dev_loss:.4f} exceeds the undisturbed "
                f"{undisturbed.dev_loss:.4f} by more than --tolerance={tolerance} "
                f"(limit {limit:.4f})"
            )
    if chaotic.finished and chaotic.train_loss is None:
        warnings.append("the chaotic run's last progress event has no finite loss")
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


def both_runs_report(
    chaotic: JobReport, undisturbed: JobReport, settings: dict[str, Any], tolerance: float
) -> dict[str, Any]:
    """The JSON report: `settings`, the verdict, and both runs."""
    problems, warnings = verdict(chaotic, undisturbed, tolerance)
    return {
        **settings,
        "passed": not problems,
        "problems": problems,
        "warnings": warnings,
        "chaotic": dataclasses.asdict(chaotic),
        "undisturbed": dataclasses.asdict(undisturbed),
    }


def print_report(report: dict) -> None:
    """The report as a table of the two runs, then the verdict."""
    runs = [report["chaotic"], report["undisturbed"]]

    def each(field: str) -> list:
        return [run[field] for run in runs]

    def kills(field: str) -> list:
        return [[kill[field] for kill in run["trainer_kills"]] for run in runs]

    def outages(field: str) -> list:
        return [[outage[field] for outage in run["service_outages"]] for run in runs]

    rows = [
        ("finished", each("finished")),
        ("step", each("step")),
        ("dev loss", each("dev_loss")),
        ("train loss (last loop)", each("train_loss")),
        ("dev BLEU", each("dev_bleu")),
        ("wall time (s)", each("wall_s")),
        ("trainer killed after step", kills("killed_after_step")),
        ("trainer resumed from step", kills("resumed_from_step")),
        ("steps trained again", each("steps_trained_again")),
        ("service killed after step", outages("killed_after_step")),
        ("service down (s)", outages("down_s")),
        ("service back at step", outages("restarted_at_step")),
        ("fresh roots at step", outages("fresh_again_at_step")),
        ("fresh roots after (s)", outages("fresh_again_after_s")),
        ("service restarts", each("service_restarts")),
        ("restarts seen by client", each("restarts_seen_by_client")),
        ("service exits not chaos's", each("service_exits_not_by_chaos")),
        ("staleness max: peak", each("staleness_max_peak")),
        ("staleness max: median", each("staleness_max_median")),
        ("staleness mean: peak", each("staleness_mean_peak")),
        ("progress without roots", each("progress_without_roots")),
    ]
    print(f"\n{'':27}{'chaotic':>26}{'undisturbed':>26}")
    for name, values in rows:
        cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in values]
        print(f"{name:27}{cells[0]:>26}{cells[1]:>26}")
    for warning in report["warnings"]:
        print(f"warning: {warning}")
    print("\nPASS" if report["passed"] else "\nFAIL: " + "; ".join(report["problems"]))
