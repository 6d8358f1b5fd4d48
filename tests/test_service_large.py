"""Slow tests at the size limits: the largest statistic and a large root over the wire.

Run with `pytest -m slow tests/test_service_large.py`.
"""

from __future__ import annotations

import numpy as np
import pytest

from precond_service.client.service_client import PreconditionerClient
from precond_service.common.blocks import StatisticsBlock
from tests.conftest import eigh_inverse_root, random_statistic, wait_until

pytestmark = pytest.mark.slow

FAST = {"pull_interval_s": 0.05, "backoff_initial_s": 0.05, "backoff_max_s": 0.5}


def test_largest_statistic_fits_in_one_message(start_service) -> None:
    server = start_service(workers=1, method="eigh")
    with PreconditionerClient(server.address, "run", **FAST) as client:
        # Publish the key from a tiny matrix; the 4096 x 4096 float64 statistic (128 MiB)
        # at the same step is then received and validated in full, but not computed.
        client.push([StatisticsBlock("big", 1, 2, np.eye(2))])
        assert wait_until(lambda: "big" in client.latest(), 30)
        largest = np.eye(4096)
        client.push([StatisticsBlock("big", 1, 2, largest)])
        assert wait_until(lambda: client.status().pushes_sent == 2, 120)
        too_large = StatisticsBlock("too-big", 1, 2, np.eye(4097))
        client.push([too_large])
        assert wait_until(lambda: client.status().pushes_sent == 3, 120)
        status = client.status()
        assert status.blocks_rejected == 1 and status.push_failures == 0, status
        assert "max_matrix_size" in dict(status.last_rejections)["too-big"]
    overall = server.service.status()
    assert (overall.accepted, overall.published, overall.failed) == (2, 1, 0)


def test_large_root_comes_back_intact(start_service) -> None:
    server = start_service(workers=1, method="eigh")
    matrix = random_statistic(2048, seed=0, dtype=np.float32)
    with PreconditionerClient(server.address, "run", **FAST) as client:
        client.push([StatisticsBlock("k", 1, 4, matrix)])
        assert wait_until(lambda: "k" in client.latest(), 300)
        root = client.latest()["k"].root
    expected = eigh_inverse_root(matrix, 4, 1e-6)
    assert np.linalg.norm(root - expected) / np.linalg.norm(expected) < 1e-8
