"""The service's GetStatus figures reach TensorBoard at the summary cadence (reporting.py)."""

from __future__ import annotations

import types

import numpy as np
import tensorflow as tf

from precond_service.client import PreconditionerClient
from precond_service.common.blocks import StatisticsBlock
from precond_service.common.events import EventLog
from tests.conftest import random_statistic, wait_until
from trainer import config as config_lib
from trainer.controller import LoopMetrics
from trainer.reporting import Reporter
from trainer.service_figures import service_scalars

FAST = {"pull_interval_s": 0.02, "backoff_initial_s": 0.02, "backoff_max_s": 0.2}


def _written_scalars(logdir) -> dict[str, float]:
    values = {}
    for path in logdir.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                array = tf.make_ndarray(value.tensor)
                if array.ndim == 0:  # scalars, not histograms
                    values[value.tag] = float(array)
    return values


def test_train_summaries_write_the_services_figures(start_service, tmp_path) -> None:
    server = start_service(workers=1, memory_budget_mb=64)
    config = config_lib.default_config()
    config.optimizer.name, config.precond.mode = "adam", "off"
    optimizer = tf.keras.optimizers.Adam(1e-3)
    writer = tf.summary.create_file_writer(str(tmp_path / "tb"))
    reporter = Reporter(config, optimizer, writer, EventLog(str(tmp_path / "events.jsonl")))
    metrics = LoopMetrics(
        steps=10, seconds=0.1, loss_sum=10.0, weight_sum=10.0, tokens=100.0, grad_norm_sum=10.0
    )
    with PreconditionerClient(server.address, "run", **FAST) as client:
        client.push([StatisticsBlock("k", 1, 2, random_statistic(16, 0))])
        assert wait_until(lambda: "k" in client.latest(), 30)
        bridge = types.SimpleNamespace(client=client, delay_steps=0, wait_seconds=0.0)
        reporter.train_summaries(10, metrics, 0, bridge)  # starts the first fetch
        reporter._status_poller.wait()
        reporter.train_summaries(20, metrics, 0, bridge)
    writer.close()
    written = _written_scalars(tmp_path / "tb")
    assert written["service/memory_budget_mb"] == 64
    assert 0 < written["service/memory_held_mb"] < 64
    assert written["service/roots_published"] == 1 and written["service/roots_failed"] == 0
    assert written["service/queue_depth"] == 0 and written["service/compute_ms_mean"] > 0
    # One job: its time is every percentile, and the mean.
    assert written["service/compute_ms_p50"] == written["service/compute_ms_p95"] > 0
    assert np.isclose(written["service/compute_ms_p50"], written["service/compute_ms_mean"])


def test_service_scalars_sum_over_shards_and_weigh_compute_time_by_roots() -> None:
    def status(published, mean_s, held):
        return types.SimpleNamespace(
            compute_seconds_p50=mean_s,
            compute_seconds_p95=2 * mean_s,
            queue_depth=1,
            in_flight=0,
            published=published,
            mean_compute_seconds=mean_s,
            memory_held_bytes=held,
            memory_budget_bytes=4 << 20,
            failed=1,
            rejected=0,
            memory_refused=0,
            worker_restarts=0,
        )

    scalars = service_scalars([status(1, 0.010, 1 << 20), status(3, 0.030, 3 << 20)])
    assert scalars["service/queue_depth"] == 2 and scalars["service/roots_failed"] == 2
    assert np.isclose(scalars["service/compute_ms_mean"], 25.0)
    assert np.isclose(scalars["service/compute_ms_p95"], 60.0)  # the slower shard's
    assert scalars["service/memory_held_mb"] == 4 and scalars["service/memory_used_fraction"] == 0.5
