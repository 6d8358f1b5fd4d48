"""The client's pull thread: fetches roots newer than it holds, every interval."""

from __future__ import annotations

import logging
import time

import grpc

from precond_service.client.core import ClientCore, keep_newest
from precond_service.common import wire
from precond_service.common.blocks import PreconditionerBlock, RootFailure
from precond_service.common.versions import is_newer
from protos import precond_service_pb2 as pb
from protos import precond_service_pb2_grpc as pb_grpc

logger = logging.getLogger("precond_service.client.service_client")


class PullThread(ClientCore):
    """The pull thread of a `PreconditionerClient`, its cache and the figures it keeps."""

    def _init_pull(self, pull_interval_s: float) -> None:
        """Sets up the pull thread's state; the client's constructor calls it."""
        self._pull_interval_s = pull_interval_s
        # Replaced, never mutated, so that `latest` needs no lock.
        self._cache: dict[str, PreconditionerBlock] = {}
        # Bumped by drop_run: a pull that was in flight across it is discarded.
        self._generation = 0
        self._pulls = 0
        self._pull_failures = 0
        self._received = 0
        self._pull_latency: float | None = None
        # key -> the failure the service last reported for it (replaced each pull).
        self._failures: dict[str, RootFailure] = {}
        self._failures_seen = 0

    def _pull_loop(self, stub: pb_grpc.PreconditionerServiceStub) -> None:
        failures = 0
        while not self._stopped():
            self._wake_puller.clear()
            if self._pull_once(stub):
                if failures:  # the service is back: retry a failed push now
                    self._wake_retry.set()
                failures = 0
                self._wake_puller.wait(self._pull_interval_s)
            else:
                failures += 1
                self._wake_puller.wait(max(self._pull_interval_s, self._backoff(failures)))

    def _pull_once(self, stub: pb_grpc.PreconditionerServiceStub) -> bool:
        """Fetches roots newer than the cache; returns whether the RPC succeeded."""
        with self._lock:
            cache, generation = self._cache, self._generation
        request = pb.GetPreconditionersRequest(
            run_id=self.run_id, known_steps={key: b.stats_step for key, b in cache.items()}
        )
        start = time.perf_counter()
        call = stub.GetPreconditioners(
            request, timeout=self._rpc_timeout_s, metadata=self._metadata
        )
        self._track(call)
        received: list[PreconditionerBlock] = []
        failures: dict[str, RootFailure] = {}
        incarnation = ""
        try:
            for reply in call:
                incarnation = reply.incarnation or incarnation
                received += [wire.message_to_preconditioner(root) for root in reply.roots]
                failures.update(
                    (f.key, RootFailure(f.key, f.stats_step, f.reason)) for f in reply.failures
                )
        except grpc.RpcError as e:
            with self._lock:
                self._pull_failures += 1
                self._last_error = f"GetPreconditioners: {e.code().name}: {e.details()}"
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    self._connected = False
            self._fail_if_permanent("GetPreconditioners", e.code(), e.details())
            return False
        except ValueError as e:
            with self._lock:
                self._pull_failures += 1
                self._last_error = f"GetPreconditioners: malformed root: {e}"
            return False
        finally:
            with self._lock:
                self._calls.discard(call)
        latency = time.perf_counter() - start
        with self._lock:
            if received and generation == self._generation:
                updated = dict(self._cache)
                keep_newest(updated, received)
                self._cache = updated
            if generation == self._generation:
                self._note_failures(failures)
            self._connected = True
            self._pulls += 1
            self._received += len(received)
            self._pull_latency = latency
        if incarnation:
            self._saw_incarnation(incarnation)
        return True

    def _note_failures(self, failures: dict[str, RootFailure]) -> None:
        """Keeps the failures the service reports now and counts new ones; holds the lock."""
        new = [f for key, f in failures.items() if self._failures.get(key) != f]
        self._failures_seen += len(new)
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

    def failures(self) -> dict[str, RootFailure]:
        """Returns the roots the service reported failed and the client holds no newer root of.

        A failed root does not come unless a newer statistic of its key is pushed
        (the previous root stays); see `ClientStatus.root_failures_seen` for the count.

        Returns:
            key -> RootFailure (a new dict).
        """
        with self._lock:
            failures, cache = self._failures, self._cache
        return {
            key: failure
            for key, failure in failures.items()
            if key not in cache or is_newer(failure.stats_step, cache[key].stats_step)
        }
