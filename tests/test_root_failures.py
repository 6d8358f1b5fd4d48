"""Failures are messages: a root the service cannot compute is reported per key (issue 14).

The service records the failure of a key's root (key, stats step, reason) until a
root at least as new is published, and every pull of a client that holds no root at
or after that step carries it (`GetPreconditionersReply.failures`); the client shows
it in `failures()` and counts it.
"""

from __future__ import annotations

import time

import numpy as np

from precond_service.client.service_client import PreconditionerClient
from precond_service.common import wire
from precond_service.common.blocks import RootFailure, StatisticsBlock
from precond_service.server.store import PublishedRoot, VersionedStore
from protos import precond_service_pb2 as pb
from tests.conftest import random_statistic, wait_until


def ill_conditioned(n: int = 16) -> np.ndarray:
    """A statistic of condition 1e12: eigh's residual ~1e-4, over a 1e-9 threshold."""
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((n, n)))
    matrix = (q * np.logspace(0, -12, n)) @ q.T
    return (matrix + matrix.T) / 2


def root(key: str, step: int) -> PublishedRoot:
    return PublishedRoot(key, step, np.eye(2), 0.0, 1, "eigh", 0.0, 1e-6, 0.0)


def test_store_keeps_a_failure_until_a_root_as_new_is_published() -> None:
    store = VersionedStore()
    store.publish("run", root("k", 5))
    assert not store.fail("run", RootFailure("k", 5, "late"))  # A root as new is held.
    assert store.fail("run", RootFailure("k", 7, "diverged"))
    assert not store.fail("run", RootFailure("k", 6, "older"))
    assert store.failures_newer_than("run", {"k": 5}) == [RootFailure("k", 7, "diverged")]
    assert store.failures_newer_than("run", {"k": 7}) == []
    assert store.failures_newer_than("other", {}) == []
    store.publish("run", root("k", 6))  # Older than the failure: it stays.
    assert store.failures_newer_than("run", {}) == [RootFailure("k", 7, "diverged")]
    store.publish("run", root("k", 7))
    assert store.failures_newer_than("run", {}) == []
    store.fail("run", RootFailure("j", 1, "worker died"))
    store.drop_run("run")
    assert store.failures_newer_than("run", {}) == []


def test_failures_travel_in_the_first_reply_only() -> None:
    roots = [
        wire.encode_preconditioner(pb.Preconditioner(key=f"k{i}"), np.ones((4, 4)))
        for i in range(3)
    ]
    failure = pb.BlockFailure(key="bad", stats_step=3, reason="diverged")
    replies = [
        pb.GetPreconditionersReply.FromString(data)
        for data in wire.encode_preconditioner_replies(
            "inc", roots, failures=[failure], batch_bytes=len(roots[0])
        )
    ]
    assert len(replies) == 3
    assert list(replies[0].failures) == [failure]
    assert not any(reply.failures for reply in replies[1:])
    assert [r.key for reply in replies for r in reply.roots] == ["k0", "k1", "k2"]
    (empty,) = [
        pb.GetPreconditionersReply.FromString(d)
        for d in wire.encode_preconditioner_replies("inc", [], failures=[failure])
    ]
    assert list(empty.failures) == [failure] and empty.incarnation == "inc"


def test_a_failed_root_reaches_the_client_and_a_newer_root_clears_it(start_service) -> None:
    server = start_service(workers=1, method="eigh", failure_threshold=1e-9, ridge_epsilon=1e-12)
    with PreconditionerClient(server.address, "run", pull_interval_s=0.05) as client:
        client.push([StatisticsBlock("k", 1, 4, 2.0 * np.eye(16))])
        assert wait_until(lambda: "k" in client.latest(), 30)
        began = time.monotonic()
        client.push([StatisticsBlock("k", 2, 4, ill_conditioned())])
        assert wait_until(lambda: "k" in client.failures(), 30)
        print(f"failure known to the client {time.monotonic() - began:.3f} s after the push")
        failure = client.failures()["k"]
        assert failure.stats_step == 2 and "error" in failure.reason, failure
        assert client.latest()["k"].stats_step == 1  # The previous root stays.
        assert client.status().root_failures_seen == 1
        client.pull_now()  # Reported again on every pull, counted once.
        assert wait_until(lambda: client.status().pulls >= 3, 30)
        assert client.status().root_failures_seen == 1

        client.push([StatisticsBlock("k", 3, 4, random_statistic(16, 3))])
        assert wait_until(lambda: client.latest()["k"].stats_step == 3, 30)
        assert client.failures() == {}
