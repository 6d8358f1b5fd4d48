"""The async mode's connection to the preconditioner service, with its secrets.

`preconditioning(config, workdir, optimizer)` starts the service as a child
process unless `precond.address` names one, connects a client under the run's
id, resets what the service holds of an earlier process of this run, and
yields the `ServicePreconditioning` bridge the training loop drives. When the
block ends without an exception, a shared service (`precond.address`) is asked
to release the run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import shlex
import time
from collections.abc import Iterator, Sequence

import grpc
import ml_collections

from precond_service.client import (
    Client,
    PreconditionerClient,
    ShardedClient,
    local_service,
    parse_addresses,
)
from precond_service.client.core import permanent_error
from precond_service.common.auth import TlsConfig, read_token, run_digest
from precond_service.common.events import EventLog
from precond_service.common.limits import SERVICE_DEFAULTS
from trainer.config import service_limit_flags
from trainer.optimizers import Shampoo
from trainer.optimizers.service_bridge import ServicePreconditioning

log = logging.getLogger(__name__)

RUN_ID_FILE = "run_id"
# The address of the run's service ("HOST:PORT"), for `python -m precond_service.status`.
SERVICE_ADDRESS_FILE = "service_address"
# Attempts at resetting the run at the service at start, and the first wait
# between them (doubled after each failure): 7.5 s of waits in all, so that a
# trainer restarted while its service restarts too (scripts/chaos.py) gets through.
DROP_ATTEMPTS = 5
DROP_BACKOFF_S = 0.5
# Longest wait for one reset: a service that cannot be reached stops the trainer
# after about DROP_ATTEMPTS * (this + backoff) seconds (`ServiceUnreachableError`).
DROP_TIMEOUT_S = 3.0

_MIB = 1 << 20

# Budget beyond a run's statistics and roots: its push stream's message (2 x 4 MiB),
# and room for a second client of the same run (a restarted trainer) meanwhile.
_MESSAGE_ROOM_MB = 64


class ServiceUnreachableError(ConnectionError):
    """No service answered at the run's address at start, after `DROP_ATTEMPTS` tries."""


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


def write_service_address(workdir: str, address: str) -> str:
    """Writes the run's service address to `workdir/service_address`; returns the path."""
    path = os.path.join(workdir, SERVICE_ADDRESS_FILE)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(address + "\n")
    os.replace(tmp, path)
    return path


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


@contextlib.contextmanager
def preconditioning(
    config: ml_collections.ConfigDict,
    workdir: str,
    optimizer: Shampoo,
    events: EventLog | None = None,
) -> Iterator[ServicePreconditioning | None]:
    """The service connection of the async mode (None in the other modes).

    Starts the service as a child process (`precond.shards` of them) unless
    `precond.address` names one (or several: shards), and stops the client and
    the children when the block ends.

    Args:
        config: The run's config.
        workdir: The run's workdir (where its run id is kept).
        optimizer: The run's built Shampoo optimizer (restored, if resuming).
        events: The run's event log, for the service child's supervisor
            (CHILD_STARTED, CHILD_RESTARTED).
    """
    if config.precond.mode != "async":
        yield None
        return
    precond = config.precond
    with contextlib.ExitStack() as stack:
        client = connect(
            stack,
            config,
            workdir,
            int(optimizer.iterations.numpy()),
            events,
            optimizer.statistic_sides(),
        )
        finished: list[bool] = []
        if precond.address:  # A shared service: free what it holds for us at a clean exit.
            stack.callback(lambda: finished and drop_finished_run(client))
        client.start()
        stack.callback(client.close)  # Runs before the drop: nothing is pushed after it.
        log.info(
            "asynchronous preconditioning: service %s (also in %s), run %s (sha256 prefix of "
            "its run_id)%s",
            client.address,
            os.path.join(workdir, SERVICE_ADDRESS_FILE),
            run_digest(client.run_id),
            f"; roots installed exactly {precond.delay_steps} steps after their statistics"
            if precond.delay_steps
            else "",
        )
        yield stack.enter_context(
            ServicePreconditioning(
                optimizer,
                client,
                precond.update_steps,
                delay_steps=precond.delay_steps,
                delay_timeout_s=precond.delay_timeout_s,
                cadence=precond.cadence,
            )
        )
        finished.append(True)  # Not reached when the block raised.


def connect(
    stack: contextlib.ExitStack,
    config: ml_collections.ConfigDict,
    workdir: str,
    step: int,
    events: EventLog | None,
    sides: Sequence[int] = (),
) -> Client:
    """The run's client (not started), its service children started under `stack` if any.

    The service forgets what it held of an earlier process of this run first
    (`drop_earlier_roots`, `step` being the optimizer's update count now). A service
    child is sized for statistics of `sides` (`Shampoo.statistic_sides`).
    """
    precond = config.precond
    token, tls = service_token(config), service_tls(config)
    addresses = (
        parse_addresses(precond.address)
        if precond.address
        else start_local_shards(stack, precond, events, sides)
    )
    address = ",".join(addresses)
    write_service_address(workdir, address)
    run_id = run_id_for(config, workdir)
    options = dict(token=token, tls=tls, pull_interval_s=precond.pull_interval_s)
    if precond.service.max_matrix_size is not None:
        options["max_matrix_size"] = precond.service.max_matrix_size
    client = (
        PreconditionerClient(address, run_id, **options)
        if len(addresses) == 1
        else ShardedClient(addresses, run_id, **options)
    )
    drop_earlier_roots(client, step)
    return client


def sized_service_flags(sides: Sequence[int], given: Sequence[str]) -> list[str]:
    """The limits a service child needs for a run whose statistics have these sides.

    The byte budget holds each key's float32 statistic (one queued) and float64 root
    (12 n^2 bytes), with a quarter more for statistics being computed and
    `_MESSAGE_ROOM_MB` for push messages; the block limits hold every key. A limit is
    raised above the service's default only, and never where `given` sets it
    (`precond.service.*` or `precond.service_flags`).

    Args:
        sides: `Shampoo.statistic_sides()` of the run.
        given: The flags the config already passes.

    Returns:
        Further `python -m precond_service` flags.
    """
    held = sum(12 * n * n for n in sides)
    needed = {
        "memory_budget_mb": math.ceil(held * 1.25 / _MIB) + _MESSAGE_ROOM_MB,
        "max_blocks_per_run": len(sides),
        "max_blocks_per_request": len(sides),
        "max_blocks": len(sides),
    }
    named = {flag.split("=", 1)[0].lstrip("-") for flag in given}
    return [
        f"--{name}={value}"
        for name, value in needed.items()
        if name not in named and value > SERVICE_DEFAULTS[name]
    ]


def start_local_shards(
    stack: contextlib.ExitStack,
    precond: ml_collections.ConfigDict,
    events: EventLog | None,
    sides: Sequence[int] = (),
) -> list[str]:
    """Starts `precond.shards` supervised service children (stopped with `stack`); addresses.

    Each child's limits are sized for the run (`sized_service_flags` of `sides`).
    """
    flags = service_limit_flags(precond) + shlex.split(precond.service_flags)
    flags += sized_service_flags(sides, flags)
    if precond.token_file:
        flags.append(f"--token_file={precond.token_file}")
    return [
        stack.enter_context(
            local_service(
                workers=precond.workers, extra_args=flags, cpus=precond.host_cpus, events=events
            )
        )
        for _ in range(precond.shards)
    ]


def drop_finished_run(client: Client) -> bool:
    """Asks a shared service to release a run that ended cleanly; returns whether it did.

    One try, bounded by `DROP_TIMEOUT_S`: a service that cannot be reached forgets
    the run by itself after its `--run_ttl_s`.
    """
    try:
        released = client.drop_run(timeout_s=DROP_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - the run is over: report, never raise
        log.warning(
            "could not release run %s at %s at exit (%s); the service drops it after its "
            "--run_ttl_s",
            run_digest(client.run_id),
            client.address,
            e,
        )
        return False
    log.info("released run %s at the service: %d blocks", run_digest(client.run_id), released)
    return True


def drop_earlier_roots(
    client: Client,
    step: int,
    attempts: int = DROP_ATTEMPTS,
    backoff_s: float = DROP_BACKOFF_S,
) -> None:
    """Asks the service to forget this run, retrying; the trainer's first contact with it.

    The service may hold roots of this run id from an earlier process, computed
    from statistics of steps after the checkpoint this process resumed from.

    Args:
        client: The run's client (not started yet).
        step: The optimizer's update count now, named in the log.
        attempts: Tries in all.
        backoff_s: Wait after the first failure, doubled after each further one.

    Raises:
        PermanentServiceError: The service refused this client (token, certificate,
            run id); not retried.
        ServiceUnreachableError: Every attempt failed otherwise (nothing listens
            at the address, or it does not answer).
    """
    run_name = run_digest(client.run_id)
    error: Exception | None = None
    for attempt in range(attempts):
        try:
            released = client.drop_run(timeout_s=DROP_TIMEOUT_S)
        except grpc.RpcError as e:
            refused = permanent_error("DropRun", client.address, e.code(), e.details())
            if refused is not None:
                raise refused from None
            error = e
            log.info(
                "reset of run %s failed (try %d of %d): %s: %s",
                run_name,
                attempt + 1,
                attempts,
                e.code().name,
                e.details(),
            )
            if attempt + 1 < attempts:
                time.sleep(backoff_s * 2**attempt)
            continue
        if released:
            log.info(
                "service released %d blocks of an earlier run %s (resuming at update %d)",
                released,
                run_name,
                step,
            )
        return
    raise ServiceUnreachableError(
        f"no preconditioner service answered at {client.address} (config.precond.address) "
        f"in {attempts} tries ({error.code().name}: {error.details()}): start the service "
        "there, correct config.precond.address, or leave it empty to have the trainer start "
        "its own"
    )
