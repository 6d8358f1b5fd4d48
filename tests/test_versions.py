"""Property tests of the one "newer than" rule and of everything that keeps one version per key."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from precond_service.client.service_client import PreconditionerClient, keep_newest
from precond_service.common.blocks import PreconditionerBlock, StatisticsBlock
from precond_service.common.versions import NO_VERSION, is_newer, newest
from precond_service.server.scheduler import Job, Outcome, Scheduler, StaleError
from precond_service.server.store import PublishedRoot, VersionedStore

KEYS = ("a", "b", "c")
STEPS = st.integers(min_value=0, max_value=30)
OFFERS = st.lists(st.tuples(st.sampled_from(KEYS), STEPS), max_size=40)
MATRIX = np.eye(2)
MATRIX.flags.writeable = False


def expected_newest(offers: list[tuple[str, int]]) -> dict[str, int]:
    """Per key, `versions.newest` of the steps offered for it."""
    result: dict[str, int] = {}
    for key, step in offers:
        result[key] = newest(result.get(key), step)
    return result


@given(st.integers(min_value=-1, max_value=10**12))
def test_is_newer_is_irreflexive(step: int) -> None:
    assert not is_newer(step, step)


@given(st.integers(-1, 50), st.integers(-1, 50), st.integers(-1, 50))
def test_is_newer_is_transitive_and_asymmetric(a: int, b: int, c: int) -> None:
    if is_newer(a, b) and is_newer(b, c):
        assert is_newer(a, c)
    assert not (is_newer(a, b) and is_newer(b, a))


@given(st.integers(min_value=0, max_value=10**12))
def test_every_step_is_newer_than_nothing_held(step: int) -> None:
    assert is_newer(step, NO_VERSION) and is_newer(step, None)
    assert not is_newer(NO_VERSION, step)


@given(st.lists(st.one_of(st.none(), STEPS), max_size=10))
def test_newest_is_newer_than_or_equal_to_every_step(steps: list[int | None]) -> None:
    best = newest(*steps)
    assert best is None if all(s is None for s in steps) else best in steps
    assert not any(s is not None and is_newer(s, best) for s in steps)


@given(OFFERS)
def test_store_holds_the_newest_root_offered_per_key(offers: list[tuple[str, int]]) -> None:
    store = VersionedStore()
    for key, step in offers:
        store.publish("run", PublishedRoot(key, step, MATRIX, 0.0, 1, "eigh", 0.0, 1e-6, 0.0))
    assert store.steps("run") == expected_newest(offers)
    held = expected_newest(offers)
    for key, step in held.items():  # A client holding the newest gets nothing more.
        assert not [r for r in store.newer_than("run", {key: step}) if r.key == key]
        assert [r.key for r in store.newer_than("run", {key: step - 1}) if r.key == key] == [key]


@settings(max_examples=200)
@given(st.lists(st.one_of(st.tuples(st.sampled_from(KEYS), STEPS), st.booleans()), max_size=40))
def test_scheduler_holds_the_newest_statistic_offered_per_key(
    operations: list[tuple[str, int] | bool],
) -> None:
    """Offers interleaved with a worker taking a job and publishing it (True) or failing (False).

    A failed job's statistic is forgotten (the key falls back to its published
    root), so "offered" counts the offers whose statistic did not fail.
    """
    scheduler = Scheduler(max_blocks=len(KEYS))
    held: dict[str, int | None] = {}
    published: dict[str, int] = {}
    for operation in operations:
        if isinstance(operation, bool):
            job = scheduler.take()
            if job is not None:
                assert job.step == held[job.key]  # Only the newest is ever computed.
                scheduler.finish(job, published=operation)
                if operation:
                    published[job.key] = job.step
                else:
                    held[job.key] = published.get(job.key)
            continue
        key, step = operation
        try:
            outcome = scheduler.submit(Job("run", key, step, 2, MATRIX))
        except StaleError:
            assert is_newer(held.get(key), step)
        else:
            assert (outcome is Outcome.DUPLICATE) == (step == held.get(key))
            held[key] = newest(held.get(key), step)
    # A repeat of the newest step is the only one neither stale nor new: so it is held.
    for key, step in held.items():
        if step is None:
            continue
        assert scheduler.submit(Job("run", key, step, 2, MATRIX)) is Outcome.DUPLICATE
        if step > 0:
            with pytest.raises(StaleError):
                scheduler.submit(Job("run", key, step - 1, 2, MATRIX))


@given(OFFERS)
def test_client_caches_hold_the_newest_offered_per_key(offers: list[tuple[str, int]]) -> None:
    statistics: dict[str, StatisticsBlock] = {}
    roots: dict[str, PreconditionerBlock] = {}
    for key, step in offers:
        keep_newest(statistics, [StatisticsBlock(key, step, 2, MATRIX)])
        keep_newest(roots, [PreconditionerBlock(key, step, MATRIX)])
    assert {k: b.step for k, b in statistics.items()} == expected_newest(offers)
    assert {k: b.stats_step for k, b in roots.items()} == expected_newest(offers)


@given(OFFERS)
def test_client_push_keeps_the_newest_unsent_statistic_per_key(
    offers: list[tuple[str, int]],
) -> None:
    client = PreconditionerClient("127.0.0.1:1", "run")  # Never started: nothing is sent.
    for key, step in offers:
        client.push([StatisticsBlock(key, step, 2, MATRIX)])
    assert client.status().pending_blocks == len(expected_newest(offers))
    client.close()
