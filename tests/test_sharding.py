"""A sharded service: keys split by a stable hash; one shard down delays only its keys."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from precond_service.client.process import ServiceChild
from precond_service.client.sharding import ShardedClient, parse_addresses, shard_of
from precond_service.common.blocks import StatisticsBlock
from tests.conftest import wait_until


def test_shard_of_is_stable_across_processes_and_spreads_keys():
    keys = [
        f"encoder/layer{i}/kernel|b{j}.0|d{d}" for i in range(40) for j in range(5) for d in (0, 1)
    ]
    here = [shard_of(key, 3) for key in keys]
    # Another interpreter (another hash seed) assigns every key the same shard.
    code = (
        "import sys, json; from precond_service.client.sharding import shard_of; "
        "print(json.dumps([shard_of(k, 3) for k in json.load(sys.stdin)]))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(keys),
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, PYTHONHASHSEED="12345"),
    )
    assert json.loads(other.stdout) == here
    counts = np.bincount(here, minlength=3)
    assert counts.min() > len(keys) / 3 * 0.7  # no shard starved (400 keys)
    assert {shard_of(key, 1) for key in keys} == {0}


@pytest.mark.parametrize(
    ("text", "message"),
    [("a:1,", "is not HOST:PORT"), ("a:1,a:1", "appears twice"), ("host", "is not HOST:PORT")],
)
def test_bad_address_lists_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_addresses(text)


def _blocks(step: int, count: int = 12) -> list[StatisticsBlock]:
    rng = np.random.default_rng(step)
    blocks = []
    for index in range(count):
        g = rng.standard_normal((8, 20))
        blocks.append(StatisticsBlock(f"w{index}|b0.0|d0", step, 4, g @ g.T))
    return blocks


def _steps(client: ShardedClient) -> dict[str, int]:
    return {key: root.stats_step for key, root in client.latest().items()}


def test_keys_go_to_their_shard_and_a_killed_shard_delays_only_its_keys():
    with ServiceChild(workers=1) as first, ServiceChild(workers=1) as second:
        client = ShardedClient([first.address, second.address], "sharded-run", pull_interval_s=0.1)
        with client:
            client.push(_blocks(1))
            assert wait_until(
                lambda: set(_steps(client).values()) == {1} and len(_steps(client)) == 12
            )
            shards = {key: shard_of(key, 2) for key in _steps(client)}
            assert set(shards.values()) == {0, 1}
            # Each service holds exactly its keys' roots.
            for index, shard_client in enumerate(client.clients):
                assert set(shard_client.latest()) == {k for k, s in shards.items() if s == index}

            os.kill(second.pid, signal.SIGKILL)
            client.push(_blocks(2))
            # Shard 0's keys move on while shard 1 is down or restarting.
            assert wait_until(
                lambda: all(_steps(client)[k] == 2 for k, s in shards.items() if s == 0)
            )
            # Shard 1 comes back on its port (supervisor), forgets everything, and the
            # client pushes its keys' newest statistics again.
            assert wait_until(lambda: second.restarts == 1, timeout_s=60)
            assert wait_until(lambda: set(_steps(client).values()) == {2}, timeout_s=60)
            status = client.status()
            assert status.restarts_seen >= 1 and status.connected
            assert status.preconditioners_received >= 24
            assert client.drop_run() > 0
