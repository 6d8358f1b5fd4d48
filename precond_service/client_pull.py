"""The client's pull thread: fetches roots newer than it holds, every interval."""

from __future__ import annotations

import time

import grpc

from precond_service import wire
from precond_service.blocks import PreconditionerBlock
from precond_service.client_core import ClientCore, keep_newest
from protos import precond_service_pb2 as pb
from protos import precond_service_pb2_grpc as pb_grpc


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
        incarnation = ""
        try:
            for reply in call:
                incarnation = reply.incarnation or incarnation
                received += [wire.message_to_preconditioner(root) for root in reply.roots]
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
            self._connected = True
            self._pulls += 1
            self._received += len(received)
            self._pull_latency = latency
        if incarnation:
            self._saw_incarnation(incarnation)
        return True
