"""Tests of the service's plain objects, no network: wire, validation, scheduler, store."""

from __future__ import annotations

import numpy as np
import pytest

from precond_service import validation, wire
from precond_service.blocks import StatisticsBlock
from precond_service.scheduler import CapacityError, Job, Outcome, Scheduler, StaleError
from precond_service.store import PublishedRoot, VersionedStore
from protos import precond_service_pb2 as pb


def _job(key: str, step: int, run_id: str = "run") -> Job:
    return Job(run_id, key, step, 4, np.eye(2))


def _root(key: str, step: int) -> PublishedRoot:
    return PublishedRoot(key, step, np.eye(2), 0.0, 1, "eigh", 0.0, 1e-6, 0.0)


def _block(**fields: object) -> pb.BlockStatistics:
    message = wire.statistics_to_message(StatisticsBlock("k", 3, 4, np.eye(3)))
    tensor = fields.pop("statistics", None)
    if tensor is not None:
        message.statistics.CopyFrom(tensor)
    for name, value in fields.items():
        setattr(message, name, value)
    return message


class TestWire:
    @pytest.mark.parametrize("dtype", [np.float32, np.float64, ">f8", np.float16])
    def test_round_trip_keeps_values_and_sends_float32_or_float64(self, dtype: object) -> None:
        array = np.arange(12, dtype=dtype).reshape(3, 4)
        tensor = wire.array_to_tensor(array)
        back = wire.tensor_to_array(tensor)
        np.testing.assert_array_equal(back, array)
        expected = np.float32 if np.dtype(dtype) == np.float32 else np.float64
        assert back.dtype == expected
        assert len(tensor.data) == 12 * np.dtype(expected).itemsize

    def test_decoded_array_views_the_message_bytes(self) -> None:
        tensor = wire.array_to_tensor(np.ones((4, 4), np.float32))
        array = wire.tensor_to_array(tensor)
        assert not array.flags.writeable
        assert not array.flags.owndata

    def test_message_limit_fits_largest_float64_matrix(self) -> None:
        assert wire.max_message_bytes(4096) >= 4096 * 4096 * 8
        assert wire.max_message_bytes(1) == 4 * 1024 * 1024


class TestValidation:
    def test_good_block_is_decoded(self) -> None:
        block = validation.decode_block(_block(), max_matrix_size=8)
        assert (block.key, block.step, block.exponent) == ("k", 3, 4)
        np.testing.assert_array_equal(block.matrix, np.eye(3))

    @pytest.mark.parametrize(
        ("fields", "reason"),
        [
            ({"key": ""}, "empty key"),
            ({"key": "x" * 2000}, "characters"),
            ({"step": -1}, "step must be >= 0"),
            ({"exponent": 0}, "exponent must be >= 1"),
            ({"statistics": pb.Tensor(shape=[2, 2], dtype=7, data=b"\0" * 32)}, "unknown"),
            ({"statistics": pb.Tensor(shape=[2, 2], data=b"\0" * 32)}, "unknown"),
            ({"statistics": pb.Tensor(shape=[2, 3], dtype=pb.FLOAT64, data=b"\0" * 48)}, "square"),
            ({"statistics": pb.Tensor(shape=[4], dtype=pb.FLOAT64, data=b"\0" * 32)}, "square"),
            ({"statistics": pb.Tensor(shape=[0, 0], dtype=pb.FLOAT64)}, "square"),
            ({"statistics": pb.Tensor(shape=[2, 2], dtype=pb.FLOAT64, data=b"\0" * 31)}, "bytes"),
            ({"statistics": pb.Tensor(shape=[2, 2], dtype=pb.FLOAT32, data=b"\0" * 32)}, "bytes"),
            ({"statistics": wire.array_to_tensor(np.eye(9))}, "max_matrix_size"),
            ({"statistics": wire.array_to_tensor(np.diag([1.0, np.nan]))}, "NaN"),
            ({"statistics": wire.array_to_tensor(np.diag([1.0, np.inf]))}, "infinity"),
            ({"statistics": wire.array_to_tensor(np.array([[1.0, 1.0], [0, 1]]))}, "symmetric"),
        ],
    )
    def test_bad_block_is_rejected_with_reason(self, fields: dict, reason: str) -> None:
        with pytest.raises(ValueError, match=reason):
            validation.decode_block(_block(**fields), max_matrix_size=8)

    def test_missing_tensor_is_rejected(self) -> None:
        message = pb.BlockStatistics(key="k", step=1, exponent=2)
        with pytest.raises(ValueError, match="no statistics"):
            validation.decode_block(message, max_matrix_size=8)


class TestScheduler:
    def test_newer_statistic_replaces_pending_one(self) -> None:
        scheduler = Scheduler(max_blocks=10)
        assert scheduler.submit(_job("a", 1)) is Outcome.QUEUED
        assert scheduler.submit(_job("a", 2)) is Outcome.COALESCED
        assert scheduler.submit(_job("a", 5)) is Outcome.COALESCED
        assert scheduler.queue_depth() == 1
        assert scheduler.take().step == 5
        assert scheduler.take() is None

    def test_older_statistic_is_stale_whatever_the_newer_one_does(self) -> None:
        scheduler = Scheduler(max_blocks=10)
        scheduler.submit(_job("a", 5))
        with pytest.raises(StaleError, match="step 4 is older than step 5 already pending"):
            scheduler.submit(_job("a", 4))
        job = scheduler.take()
        with pytest.raises(StaleError, match="being computed"):
            scheduler.submit(_job("a", 3))
        assert scheduler.finish(job, published=True)
        with pytest.raises(StaleError, match="published"):
            scheduler.submit(_job("a", 4))
        assert scheduler.submit(_job("a", 5)) is Outcome.DUPLICATE
        assert scheduler.submit(_job("a", 6)) is Outcome.QUEUED

    def test_failed_step_may_be_computed_again(self) -> None:
        scheduler = Scheduler(max_blocks=10)
        scheduler.submit(_job("a", 5))
        scheduler.finish(scheduler.take(), published=False)
        assert scheduler.submit(_job("a", 5)) is Outcome.QUEUED

    def test_serves_unpublished_first_then_stalest(self) -> None:
        scheduler = Scheduler(max_blocks=10)
        for key, step in (("fresh", 10), ("stale", 10), ("mid", 10)):
            scheduler.submit(_job(key, step))
            scheduler.finish(scheduler.take(), published=True)
        scheduler.submit(_job("fresh", 12))
        scheduler.submit(_job("stale", 100))
        scheduler.submit(_job("mid", 50))
        scheduler.submit(_job("new1", 1))
        scheduler.submit(_job("new2", 1, run_id="other"))
        order = [scheduler.take().key for _ in range(5)]
        assert order == ["new1", "new2", "stale", "mid", "fresh"]

    def test_dropped_run_orphans_its_computing_job(self) -> None:
        scheduler = Scheduler(max_blocks=10)
        scheduler.submit(_job("a", 1))
        scheduler.submit(_job("b", 1))
        job = scheduler.take()
        assert scheduler.drop_run("run") == 2
        assert scheduler.queue_depth() == 0
        assert not scheduler.finish(job, published=True)
        assert scheduler.submit(_job("a", 1)) is Outcome.QUEUED

    def test_capacity_counts_keys_over_all_runs(self) -> None:
        scheduler = Scheduler(max_blocks=2)
        scheduler.submit(_job("a", 1))
        scheduler.submit(_job("a", 1, run_id="other"))
        scheduler.submit(_job("a", 2))
        with pytest.raises(CapacityError, match="max_blocks=2"):
            scheduler.submit(_job("b", 1))


class TestStore:
    def test_keeps_only_newest_root_per_key(self) -> None:
        store = VersionedStore()
        assert store.publish("run", _root("a", 2))
        assert not store.publish("run", _root("a", 1))
        assert not store.publish("run", _root("a", 2))
        assert store.publish("run", _root("a", 3))
        assert store.steps("run") == {"a": 3}

    def test_newer_than_filters_by_known_steps_and_run(self) -> None:
        store = VersionedStore()
        for key, step in (("a", 1), ("b", 5), ("c", 7)):
            store.publish("run", _root(key, step))
        store.publish("other", _root("z", 1))
        newer = store.newer_than("run", {"a": 1, "b": 4})
        assert [(r.key, r.stats_step) for r in newer] == [("b", 5), ("c", 7)]
        assert store.newer_than("missing", {}) == []

    def test_drop_run_releases_roots(self) -> None:
        store = VersionedStore()
        store.publish("run", _root("a", 1))
        assert store.drop_run("run") == 1
        assert store.newer_than("run", {}) == []
        assert store.drop_run("run") == 0


class TestEncoders:
    @pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
    def test_push_request_parses_as_the_same_message(self, dtype: type) -> None:
        blocks = [
            StatisticsBlock("a", 3, 4, np.arange(16, dtype=dtype).reshape(4, 4)),
            StatisticsBlock("b" * 200, 2**40, 8, np.eye(300, dtype=dtype)),
        ]
        encoded = wire.encode_push_request("run-1", blocks)
        expected = pb.PushStatisticsRequest(
            run_id="run-1", blocks=[wire.statistics_to_message(b) for b in blocks]
        )
        assert pb.PushStatisticsRequest.FromString(encoded) == expected
        assert encoded == expected.SerializeToString()

    def test_preconditioner_parses_as_the_same_message(self) -> None:
        header = pb.Preconditioner(key="k", stats_step=7, error=1e-7, iterations=9, method="m")
        root = np.random.default_rng(0).standard_normal((129, 129))
        expected = pb.Preconditioner()
        expected.CopyFrom(header)
        expected.root.CopyFrom(wire.array_to_tensor(root))
        parsed = pb.Preconditioner.FromString(wire.encode_preconditioner(header, root))
        assert parsed == expected
        np.testing.assert_array_equal(wire.message_to_preconditioner(parsed).root, root)
