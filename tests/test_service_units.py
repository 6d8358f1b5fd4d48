"""Tests of the service's plain objects, no network: wire, validation, scheduler, store."""

from __future__ import annotations

import gc
import logging
import re
import weakref

import numpy as np
import pytest

from precond_service.common import wire
from precond_service.common.auth import run_digest
from precond_service.common.blocks import StatisticsBlock
from precond_service.common.root_settings import RootSettings
from precond_service.server import validation
from precond_service.server.scheduler import CapacityError, Job, Outcome, Scheduler, StaleError
from precond_service.server.service import RootService
from precond_service.server.service_records import ServiceConfig
from precond_service.server.store import PublishedRoot, VersionedStore
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
        assert block.settings == RootSettings()  # Unset: the service's flags.

    def test_root_settings_are_decoded_and_override_only_what_is_set(self) -> None:
        message = _block(ridge_epsilon=1e-3, method="eigh", ridge_mode="absolute_if_needed")
        block = validation.decode_block(message, max_matrix_size=8)
        assert block.settings == RootSettings(1e-3, None, "eigh", "absolute_if_needed")
        assert block.settings.overrides() == {
            "ridge_epsilon": 1e-3,
            "method": "eigh",
            "ridge_mode": "absolute_if_needed",
        }

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
            ({"ridge_epsilon": -1e-3}, r"ridge_epsilon must be in \(0, 1\), got -0.001"),
            ({"failure_threshold": float("nan")}, "failure_threshold must be finite and > 0"),
            ({"method": "newton"}, "method must be one of"),
            ({"ridge_mode": "absolute"}, "ridge_mode must be one of"),
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

    def test_dropped_run_frees_its_pending_statistics_without_the_collector(self) -> None:
        scheduler = Scheduler(max_blocks=10)
        jobs = [_job("a", 1), _job("b", 1)]
        for job in jobs:
            scheduler.submit(job)
        freed = [weakref.ref(job.matrix) for job in jobs]
        del jobs, job
        gc.disable()
        try:
            assert scheduler.drop_run("run") == 2
            assert [ref() for ref in freed] == [None, None]
        finally:
            gc.enable()

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
            StatisticsBlock("c", 1, 2, np.eye(2, dtype=dtype), 1e-3, 0.5, "eigh"),
        ]
        encoded = wire.encode_push_request("run-1", blocks)
        expected = pb.PushStatisticsRequest(
            run_id="run-1", blocks=[wire.statistics_to_message(b) for b in blocks]
        )
        # Equal once parsed; the bytes differ only in field order (the tensor goes last).
        assert pb.PushStatisticsRequest.FromString(encoded) == expected
        assert len(encoded) == expected.ByteSize()

    def test_preconditioner_parses_as_the_same_message(self) -> None:
        header = pb.Preconditioner(key="k", stats_step=7, error=1e-7, iterations=9, method="m")
        root = np.random.default_rng(0).standard_normal((129, 129))
        expected = pb.Preconditioner()
        expected.CopyFrom(header)
        expected.root.CopyFrom(wire.array_to_tensor(root))
        parsed = pb.Preconditioner.FromString(wire.encode_preconditioner(header, root))
        assert parsed == expected
        np.testing.assert_array_equal(wire.message_to_preconditioner(parsed).root, root)

    @pytest.mark.parametrize("sizes", [[], [10], [10, 10, 10], [5000, 10, 10], [10, 5000]])
    def test_preconditioner_replies_carry_the_incarnation_and_every_root_once(
        self, sizes: list[int]
    ) -> None:
        roots = [
            wire.encode_preconditioner(pb.Preconditioner(key=f"k{i}"), np.ones((n, n)))
            for i, n in enumerate(sizes)
        ]
        batch_bytes = 3 * len(roots[0]) if roots else 1
        replies = [
            pb.GetPreconditionersReply.FromString(data)
            for data in wire.encode_preconditioner_replies("inc-1", roots, batch_bytes=batch_bytes)
        ]
        assert replies and all(reply.incarnation == "inc-1" for reply in replies)
        assert [r.key for reply in replies for r in reply.roots] == [
            f"k{i}" for i in range(len(sizes))
        ]
        for reply in replies:  # Over the batch only with a single root.
            assert len(reply.roots) == 1 or sum(r.ByteSize() for r in reply.roots) <= batch_bytes


class TestCapacity:
    def test_run_and_per_run_caps_refuse_new_keys_only(self) -> None:
        scheduler = Scheduler(max_blocks=100, max_blocks_per_run=2, max_runs=2)
        scheduler.submit(_job("a", 1))
        scheduler.submit(_job("b", 1))
        with pytest.raises(CapacityError, match="max_blocks_per_run=2") as error:
            scheduler.submit(_job("c", 1))
        assert "--max_blocks_per_run" in str(error.value)
        assert scheduler.submit(_job("a", 2)) is Outcome.COALESCED  # Existing keys update.
        scheduler.submit(_job("a", 1, run_id="other"))
        with pytest.raises(CapacityError, match="max_runs=2") as error:
            scheduler.submit(_job("a", 1, run_id="third"))
        assert "--max_runs" in str(error.value)
        assert scheduler.blocks_known() == 3 and scheduler.runs_known() == 2
        assert scheduler.drop_run("run") == 2
        assert scheduler.submit(_job("a", 1, run_id="third")) is Outcome.QUEUED
        assert (scheduler.blocks_known(), scheduler.runs_known()) == (2, 2)
        assert (scheduler.queue_depth("third"), scheduler.blocks_known("third")) == (1, 1)

    @pytest.mark.parametrize(
        ("fields", "message"),
        [
            ({"max_blocks_per_run": 0}, "max_blocks_per_run (--max_blocks_per_run) must be >= 1"),
            ({"max_runs": -1}, "max_runs (--max_runs) must be >= 1, got -1"),
            ({"max_run_id_length": 0}, "max_run_id_length (--max_run_id_length) must be >= 1"),
            (
                {"max_blocks_per_run": 100, "max_blocks_per_request": 99},
                "--max_blocks_per_request) must be >= max_blocks_per_run=100",
            ),
        ],
    )
    def test_config_names_the_flag_and_its_range(self, fields: dict, message: str) -> None:
        with pytest.raises(ValueError, match=re.escape(message)):
            ServiceConfig(**fields)


class TestRequestChecks:
    def test_run_id_must_be_given_and_short(self) -> None:
        validation.check_run_id("r" * 10, max_length=10)
        with pytest.raises(ValueError, match="empty run_id"):
            validation.check_run_id("", max_length=10)
        with pytest.raises(ValueError, match="11 characters, more than max_run_id_length=10"):
            validation.check_run_id("r" * 11, max_length=10)

    def test_known_steps_are_bounded(self) -> None:
        validation.check_known_steps({"a": 1, "b": 2}, max_entries=2)
        with pytest.raises(wire.RequestTooLargeError, match="3 entries, more than"):
            validation.check_known_steps({"a": 1, "b": 2, "c": 3}, max_entries=2)
        with pytest.raises(ValueError, match="key of 1025 characters"):
            validation.check_known_steps({"k" * 1025: 1}, max_entries=2)

    def test_wrong_rank_is_rejected_without_listing_the_shape(self) -> None:
        tensor = pb.Tensor(shape=[1] * 100_000, dtype=pb.FLOAT64, data=b"\0" * 8)
        with pytest.raises(ValueError, match="got 100000 dimensions") as error:
            validation.decode_block(_block(statistics=tensor), max_matrix_size=8)
        assert len(str(error.value)) < 200
        with pytest.raises(ValueError, match="100000 dimensions, more than 32"):
            wire.tensor_to_array(tensor)

    def test_run_digest_is_short_stable_and_hides_the_run_id(self) -> None:
        digest = run_digest("host:/runs/secret-run")
        assert re.fullmatch("[0-9a-f]{12}", digest)
        assert digest == run_digest("host:/runs/secret-run") != run_digest("host:/runs/other")


class TestParseRequest:
    def test_parses_what_clients_send(self) -> None:
        blocks = [StatisticsBlock(f"k{i}", i, 4, np.eye(3, dtype=np.float32)) for i in range(50)]
        data = wire.encode_push_request("run", blocks)
        parsed = wire.parse_request(pb.PushStatisticsRequest, data, max_entries=50)
        assert parsed == pb.PushStatisticsRequest.FromString(data)
        pull = pb.GetPreconditionersRequest(run_id="r", known_steps={f"k{i}": i for i in range(50)})
        parsed = wire.parse_request(
            pb.GetPreconditionersRequest, pull.SerializeToString(), max_entries=50
        )
        assert parsed == pull

    def test_refuses_too_many_entries_before_parsing(self) -> None:
        many = pb.PushStatisticsRequest(run_id="r", blocks=[pb.BlockStatistics(key="k")] * 20_000)
        with pytest.raises(wire.RequestTooLargeError, match="room for 100 blocks"):
            wire.parse_request(pb.PushStatisticsRequest, many.SerializeToString(), max_entries=100)
        pull = pb.GetPreconditionersRequest(known_steps={f"k{i}": i for i in range(20_000)})
        with pytest.raises(wire.RequestTooLargeError):
            wire.parse_request(
                pb.GetPreconditionersRequest, pull.SerializeToString(), max_entries=100
            )
        # A shape of ten million dimensions is refused by its length, without counting.
        bomb = pb.PushStatisticsRequest(
            blocks=[pb.BlockStatistics(key="k", statistics=pb.Tensor(shape=[1] * 10_000_000))]
        ).SerializeToString()
        with pytest.raises(wire.RequestTooLargeError):
            wire.parse_request(pb.PushStatisticsRequest, bomb, max_entries=100)
        # Unknown fields count too: a flood of them is no cheaper.
        unknown = b"\x78\x01" * 10_000  # Field 15, varint 1.
        with pytest.raises(wire.RequestTooLargeError):
            wire.parse_request(pb.DropRunRequest, unknown, max_entries=0)

    @pytest.mark.parametrize(
        ("data", "reason"),
        [
            (b"\xff\xff\xff\xff not a protobuf", "not a valid precond.v1.PushStatisticsRequest"),
            (pb.PushStatisticsRequest(run_id="run").SerializeToString()[:-1], "truncated"),
            (b"\x0b\x0c", "wire type 3"),  # A group, which proto3 messages never have.
            (b"\x12\x05\x0a\x02k", "truncated"),  # A block whose key runs past its end.
            (b"\x08" + b"\xff" * 11, "longer than 10 bytes"),
        ],
    )
    def test_malformed_bytes_raise_value_error(self, data: bytes, reason: str) -> None:
        with pytest.raises(ValueError, match=reason) as error:
            wire.parse_request(pb.PushStatisticsRequest, data, max_entries=10)
        assert not isinstance(error.value, wire.RequestTooLargeError)


def test_rejections_are_logged_once_per_interval_with_a_count_and_no_run_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="precond_service")
    service = RootService(ServiceConfig())  # Not started: rejections need no worker.
    try:
        bad = pb.BlockStatistics(key="k" * 100_000, step=1, exponent=2)
        for _ in range(100):
            accepted, (rejection,) = service.push("secret-run", [bad])
            assert accepted == 0 and len(rejection.key) == validation.MAX_KEY_LENGTH
        assert service.status().rejected == 100
    finally:
        service.stop()
    (line,) = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert line.startswith("rejected 1 block(s)") and run_digest("secret-run") in line
    assert "secret-run" not in line and len(line) < 600
