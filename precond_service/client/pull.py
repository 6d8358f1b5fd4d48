"""The client's pull loop: fetches roots newer than it holds, every interval.

`PullLoop` holds the cache of the newest root per key and the failures the
service reported, and runs on the client's pull thread.
"""

from __future__ import annotations

import logging
import time

import grpc

from precond_service.client.core import ConnectionState, keep_newest
from precond_service.common import wire
from precond_service.common.blocks import PreconditionerBlock, RootFailure
from precond_service.common.versions import is_newer
from protos import precond_service_pb2 as pb
from protos import precond_service_pb2_grpc as pb_grpc

logger = logging.getLogger("precond_service.client.service_client")


class PullLoop:
    """Pulls new roots every `pull_interval_s` on the pull thread (`run`) into its cache.

    Args:
        state: The client's connection, shared with its push loop.
        pull_interval_s: Seconds between pulls.
    """

    def __init__(self, state: ConnectionState, pull_interval_s: float) -> None:
        self._state = state
        self._interval_s = pull_interval_s
        # Replaced, never mutated, so that `latest` needs no lock.
        self._cache: dict[str, PreconditionerBlock] = {}
        # Bumped by `forget`: a pull that was in flight across it is discarded.
        self._generation = 0
        # key -> the failure the service last reported for it (replaced each pull).
        self._failures: dict[str, RootFailure] = {}
        # Figures for `ClientStatus`, guarded by the state's lock.
        self.pulls = 0
        self.pull_failures = 0
        self.received = 0
        self.latency_s: float | None = None
        self.failures_seen = 0

    def latest(self) -> dict[str, PreconditionerBlock]:
        """Every root received so far, the newest per key (a new dict); never blocks."""
        return dict(self._cache)

    def failures(self) -> dict[str, RootFailure]:
        """The roots the service reported failed and the cache holds no newer root of."""
        with self._state.lock:
            failures, cache = self._failures, self._cache
        return {
            key: failure
            for key, failure in failures.items()
            if key not in cache or is_newer(failure.stats_step, cache[key].stats_step)
        }

    def forget(self) -> None:
        """Drops the cache and the failures, and discards a pull in flight (the run was dropped)."""
        with self._state.lock:
            self._generation += 1
            self._cache = {}
            self._failures = {}

    def run(self, stub: pb_grpc.PreconditionerServiceStub) -> None:
        """The pull thread: pulls until the client stops, backing off after failures."""
        state = self._state
        failures = 0
        while not state.stopped():
            state.wake_puller.clear()
            if self._pull_once(stub):
                if failures:  # the service is back: retry a failed push now
                    state.wake_retry.set()
                failures = 0
                state.wake_puller.wait(self._interval_s)
            else:
                failures += 1
                state.wake_puller.wait(max(self._interval_s, state.backoff(failures)))

    def _pull_once(self, stub: pb_grpc.PreconditionerServiceStub) -> bool:
        """Fetches roots newer than the cache; returns whether the RPC succeeded."""
        state = self._state
        with state.lock:
            cache, generation = self._cache, self._generation
        request = pb.GetPreconditionersRequest(
            run_id=state.run_id, known_steps={key: b.stats_step for key, b in cache.items()}
        )
        start = time.perf_counter()
        call = stub.GetPreconditioners(
            request, timeout=state.rpc_timeout_s, metadata=state.metadata
        )
        state.track(call)
        try:
            received, failures, incarnation = _read_replies(call)
        except grpc.RpcError as e:
            with state.lock:
                self.pull_failures += 1
                state.rpc_failed("GetPreconditioners", e.code(), e.details())
            state.fail_if_permanent("GetPreconditioners", e.code(), e.details())
            return False
        except ValueError as e:
            with state.lock:
                self.pull_failures += 1
                state.last_error = f"GetPreconditioners: malformed root: {e}"
            return False
        finally:
            state.untrack(call)
        latency = time.perf_counter() - start
        with state.lock:
            if generation == self._generation:
                if received:
                    updated = dict(self._cache)
                    keep_newest(updated, received)
                    self._cache = updated
                self._note_failures(failures)
            state.connected = True
            self.pulls += 1
            self.received += len(received)
            self.latency_s = latency
        if incarnation:
            state.saw_incarnation(incarnation)
        return True

    def _note_failures(self, failures: dict[str, RootFailure]) -> None:
        """Keeps the failures the service reports now and counts new ones; holds the lock."""
        new = [f for key, f in failures.items() if self._failures.get(key) != f]
        self.failures_seen += len(new)
        self._failures = failures
        if new:
            logger.warning(
                "the service could not compute %d root(s), the previous ones stay; "
                "latest: key %r step %d: %s",
                len(new),
                new[-1].key,
                new[-1].stats_step,
                new[-1].reason,
            )


def _read_replies(
    call: grpc.Call,
) -> tuple[list[PreconditionerBlock], dict[str, RootFailure], str]:
    """Reads a GetPreconditioners stream: (roots, failures by key, the service's incarnation)."""
    received: list[PreconditionerBlock] = []
    failures: dict[str, RootFailure] = {}
    incarnation = ""
    for reply in call:
        incarnation = reply.incarnation or incarnation
        received += [wire.message_to_preconditioner(root) for root in reply.roots]
        failures.update((f.key, RootFailure(f.key, f.stats_step, f.reason)) for f in reply.failures)
    return received, failures, incarnation
