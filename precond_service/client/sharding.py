"""A client over several services ("shards"): each block key goes to one, by a stable hash.

Each shard is an ordinary service (`python -m precond_service`), unaware of the
others. `ShardedClient` holds one `PreconditionerClient` per shard and sends every
block to shard `shard_of(key, S)`; a shard that is down or restarting delays only
its own keys, and its client re-pushes them when it is back, as for one service.

    client = ShardedClient(["cpu1:50051", "cpu2:50051"], run_id="run-1")
    client.start(); client.push(blocks); roots = client.latest(); client.close()

The assignment depends only on the key and the number of shards (SHA-256, not
Python's salted `hash`), so every process, restart and host agrees on it. Change the
number of shards only with a fresh run (or after dropping it): a key that moves to
another shard starts there without a root.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

from precond_service.client.service_client import ClientStatus, PreconditionerClient
from precond_service.common.blocks import PreconditionerBlock, RootFailure, StatisticsBlock

# ClientStatus fields summed over the shards; the rest are combined below.
_SUMMED = (
    "restarts_seen",
    "pushes_sent",
    "blocks_sent",
    "blocks_replaced",
    "pending_blocks",
    "push_failures",
    "blocks_rejected",
    "pulls",
    "pull_failures",
    "preconditioners_received",
    "root_failures_seen",
)


def shard_of(key: str, shards: int) -> int:
    """The shard, in [0, shards), that serves block `key`: SHA-256 of the key, mod `shards`."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % shards


def parse_addresses(text: str) -> list[str]:
    """ "host1:port1, host2:port2" -> the addresses, in order.

    Raises:
        ValueError: An entry is empty or not HOST:PORT, or one appears twice.
    """
    addresses = [part.strip() for part in text.split(",")]
    for address in addresses:
        host, sep, port = address.rpartition(":")
        if not (host and sep and port.isdigit()):
            raise ValueError(f"{address!r} is not HOST:PORT (in {text!r})")
    if len(set(addresses)) != len(addresses):
        raise ValueError(f"an address appears twice in {text!r}: each shard must be its own")
    return addresses


class ShardedClient:
    """The `PreconditionerClient` interface over several services, one per shard of the keys."""

    def __init__(self, addresses: Sequence[str], run_id: str, **client_options: Any) -> None:
        """Creates one client per shard; `start` starts them.

        Args:
            addresses: "host:port" of each shard, in shard order (at least one).
            run_id: Names this training run, the same on every shard.
            **client_options: `PreconditionerClient` arguments (token, tls, ...).

        Raises:
            ValueError: No address, or an argument a client refuses.
        """
        if not addresses:
            raise ValueError("ShardedClient needs at least one address")
        self.clients = [PreconditionerClient(a, run_id, **client_options) for a in addresses]
        self.run_id = run_id
        self.address = ",".join(addresses)

    def service_statuses(self, timeout_s: float = 5.0) -> list[Any]:
        """Every shard's GetStatus, in shard order; blocks (see `PreconditionerClient`)."""
        return [c.service_statuses(timeout_s)[0] for c in self.clients]

    def start(self) -> None:
        """Starts every shard's client (none waits for its service)."""
        for client in self.clients:
            client.start()

    def push(self, blocks: Sequence[StatisticsBlock]) -> None:
        """Hands each block to its shard's client; returns at once."""
        by_shard: list[list[StatisticsBlock]] = [[] for _ in self.clients]
        for block in blocks:
            by_shard[shard_of(block.key, len(self.clients))].append(block)
        for client, shard_blocks in zip(self.clients, by_shard):
            if shard_blocks:
                client.push(shard_blocks)

    def latest(self) -> dict[str, PreconditionerBlock]:
        """Every root received so far from any shard (the shards' keys are disjoint)."""
        roots: dict[str, PreconditionerBlock] = {}
        for client in self.clients:
            roots.update(client.latest())
        return roots

    def failures(self) -> dict[str, RootFailure]:
        """The roots any shard reported failed that no newer root replaced."""
        failures: dict[str, RootFailure] = {}
        for client in self.clients:
            failures.update(client.failures())
        return failures

    def status(self) -> ClientStatus:
        """The shards' statuses combined: counts summed, connected only if every shard is.

        The latencies are the slowest shard's; errors and incarnations name their shard.
        """
        shards = self.shard_status()
        summed = {name: sum(getattr(s, name) for s in shards) for name in _SUMMED}
        latencies = {
            name: max((v for s in shards if (v := getattr(s, name)) is not None), default=None)
            for name in ("last_push_latency_s", "last_pull_latency_s")
        }
        return dataclasses.replace(
            shards[0],
            **summed,
            **latencies,
            connected=all(s.connected for s in shards),
            incarnation=_joined(s.incarnation for s in shards),
            last_rejections=tuple(r for s in shards for r in s.last_rejections),
            last_error=_first_named(self.clients, (s.last_error for s in shards)),
            permanent_error=_first_named(self.clients, (s.permanent_error for s in shards)),
        )

    def shard_status(self) -> list[ClientStatus]:
        """Each shard's own status, in shard order."""
        return [client.status() for client in self.clients]

    def check(self) -> None:
        """Raises `PermanentServiceError` if any shard refused this client for good."""
        for client in self.clients:
            client.check()

    def pull_now(self) -> None:
        """Asks every shard's client to pull at once; returns at once."""
        for client in self.clients:
            client.pull_now()

    def drop_run(self, timeout_s: float = 10.0) -> int:
        """Drops the run on every shard; returns the blocks released in all.

        Every shard is tried; if any failed, the first error is raised after the others.
        """
        released, error = 0, None
        for client in self.clients:
            try:
                released += client.drop_run(timeout_s)
            except Exception as e:  # noqa: BLE001 - raised below, after the other shards
                error = error or e
        if error is not None:
            raise error
        return released

    def close(self, timeout: float = 5.0) -> None:
        """Closes every shard's client; idempotent."""
        for client in self.clients:
            client.close(timeout)

    def __enter__(self) -> ShardedClient:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _joined(values: Any) -> str | None:
    values = list(values)
    return None if all(v is None for v in values) else ",".join(str(v) for v in values)


def _first_named(clients: Sequence[PreconditionerClient], values: Any) -> str | None:
    """The first non-None value, prefixed with its shard's address."""
    for client, value in zip(clients, values):
        if value is not None:
            return f"{client.address}: {value}"
    return None


# What a trainer talks to: one service, or several.
Client = PreconditionerClient | ShardedClient
