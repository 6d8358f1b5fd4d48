"""The service's configuration, and the figures it reports (`GetStatus`, rejections).

`ServiceConfig` is the one place its values are checked; the `python -m
precond_service` flags of the same names fill it. `RunStatus` and `ServiceStatus`
have the field names of their .proto messages.
"""

from __future__ import annotations

import dataclasses

from precond_service.common.limits import SERVICE_DEFAULTS
from precond_service.common.roots import METHODS, RIDGE_MODES


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """Everything the service can be configured with.

    Attributes:
        workers: Worker processes W; each computes one root at a time.
        method: Root solver, "schur_newton" (coupled Newton) or "eigh" (reference).
        ridge_epsilon: Ridge added to a statistic, relative to its largest eigenvalue
            (or absolute, see ridge_mode).
        ridge_mode: "relative" or "absolute_if_needed" (`roots.RIDGE_MODES`).
        failure_threshold: Largest solver error of a root that is published; a root
            above it, or with a non-finite error, is counted failed and dropped.
        max_iterations: Most Schur-Newton iterations per root.
        max_matrix_size: Largest matrix side n accepted; it also sets the gRPC
            send limit for roots (n * n * 8 bytes + 1 MiB). Statistics arrive in
            messages of at most 4 MiB + 64 KiB, a larger one in chunks.
        max_blocks: Most (run_id, key) pairs held over all runs; bounds memory.
        max_blocks_per_run: Most keys held for one run; a statistic for a new key
            beyond it is rejected, the run's existing keys still update.
        max_runs: Most runs held; a statistic for a new run beyond it is rejected.
        max_blocks_per_request: Most blocks in one PushStatistics call (all its
            messages) and most known_steps entries in one GetPreconditioners call;
            at least max_blocks_per_run, as a client pushes every key of its run at once.
        max_run_id_length: Most characters of a run_id.
        threads_per_worker: BLAS threads in each worker.
        job_timeout_s: A root taking longer is failed and its worker replaced; 0
            means no limit.
        max_streams: Most streaming RPCs (pushes and pulls) open at once; unary
            RPCs (health, GetStatus, DropRun) are never counted.
        max_streams_per_peer: Most streaming RPCs open at once on one connection.
        stream_idle_timeout_s: A stream whose next message does not arrive (push)
            or is not taken (pull) within this is closed with DEADLINE_EXCEEDED.
        stream_timeout_s: A stream open longer than this is closed with
            DEADLINE_EXCEEDED.
        run_ttl_s: A run with no push or pull for this long is dropped (as by
            DropRun), so that runs whose trainers are gone do not hold the caps.
        memory_budget_mb: Most MiB the service holds for clients (push messages
            being parsed and validated, statistics being reassembled, pending or being
            computed, each key's float64 root); a push beyond it is refused
            (`budget.ByteBudget`).
    """

    workers: int = 1
    method: str = "schur_newton"
    ridge_epsilon: float = 1e-6
    ridge_mode: str = "relative"
    failure_threshold: float = 0.1
    max_iterations: int = 100
    max_matrix_size: int = 4096
    # Two runs of the largest shipped config (wmt14_en_fr.py:big_shampoo, 21,512 keys),
    # with room to spare.
    max_blocks: int = SERVICE_DEFAULTS["max_blocks"]
    max_blocks_per_run: int = SERVICE_DEFAULTS["max_blocks_per_run"]
    max_runs: int = 256
    max_blocks_per_request: int = SERVICE_DEFAULTS["max_blocks_per_request"]
    # Trainers make "host-<32 hex digits>" run ids; a user-chosen one may be longer.
    max_run_id_length: int = 4096
    threads_per_worker: int = 1
    job_timeout_s: float = 0.0
    max_streams: int = 256
    # A trainer holds 2 at once (a push and a pull).
    max_streams_per_peer: int = 16
    stream_idle_timeout_s: float = 60.0
    stream_timeout_s: float = 600.0
    run_ttl_s: float = 3600.0
    memory_budget_mb: int = SERVICE_DEFAULTS["memory_budget_mb"]

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not self.ridge_epsilon > 0:
            raise ValueError(f"ridge_epsilon must be > 0, got {self.ridge_epsilon}")
        if self.ridge_mode not in RIDGE_MODES:
            raise ValueError(f"ridge_mode must be one of {RIDGE_MODES}, got {self.ridge_mode!r}")
        if not self.failure_threshold > 0:
            raise ValueError(f"failure_threshold must be > 0, got {self.failure_threshold}")
        if self.max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1, got {self.max_iterations}")
        if self.max_matrix_size < 1:
            raise ValueError(f"max_matrix_size must be >= 1, got {self.max_matrix_size}")
        if self.max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1, got {self.max_blocks}")
        for name in (
            "max_blocks_per_run",
            "max_runs",
            "max_run_id_length",
            "max_streams",
            "max_streams_per_peer",
            "memory_budget_mb",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} (--{name}) must be >= 1, got {getattr(self, name)}")
        if self.max_blocks_per_request < self.max_blocks_per_run:
            raise ValueError(
                "max_blocks_per_request (--max_blocks_per_request) must be >= "
                f"max_blocks_per_run={self.max_blocks_per_run}, as a client pushes every key of "
                f"its run in one call; got {self.max_blocks_per_request}"
            )
        if self.threads_per_worker < 1:
            raise ValueError(f"threads_per_worker must be >= 1, got {self.threads_per_worker}")
        if not self.job_timeout_s >= 0:
            raise ValueError(f"job_timeout_s must be >= 0 (0: no limit), got {self.job_timeout_s}")
        for name in ("stream_idle_timeout_s", "stream_timeout_s", "run_ttl_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} (--{name}) must be > 0, got {getattr(self, name)}")


@dataclasses.dataclass
class RunStatus:
    """Figures for one run; field names match the `RunStatus` message."""

    run_digest: str
    blocks_known: int = 0
    blocks_published: int = 0
    pending: int = 0
    received: int = 0
    accepted: int = 0
    rejected: int = 0
    coalesced: int = 0
    published: int = 0
    failed: int = 0
    latest_step: int = 0
    max_staleness_steps: int = 0
    last_push_unix_time: float = 0.0


@dataclasses.dataclass
class ServiceStatus:
    """Figures for the service; field names match the `ServiceStatus` message."""

    incarnation: str
    uptime_seconds: float
    workers: int
    workers_alive: int
    worker_restarts: int
    queue_depth: int
    in_flight: int
    blocks_known: int
    received: int
    accepted: int
    rejected: int
    coalesced: int
    published: int
    failed: int
    method: str
    max_matrix_size: int
    runs: list[RunStatus]
    worker_pids: list[int]
    mean_compute_seconds: float
    auth_rejected: int = 0
    streams_open: int = 0
    streams_refused: int = 0
    streams_timed_out: int = 0
    memory_held_bytes: int = 0
    memory_budget_bytes: int = 0
    memory_refused: int = 0
    compute_seconds_p50: float = 0.0
    compute_seconds_p95: float = 0.0


@dataclasses.dataclass(frozen=True)
class Rejection:
    """A block that was not accepted, and why."""

    key: str
    step: int
    reason: str


@dataclasses.dataclass
class Totals:
    """The service's running totals (see `ServiceStatus`)."""

    received: int = 0
    accepted: int = 0
    rejected: int = 0
    coalesced: int = 0
    published: int = 0
    failed: int = 0
    computed: int = 0
    compute_seconds: float = 0.0
