"""The service's default limits hold every shipped config, counted from its model (issue 23).

Each config's Transformer is built (not trained) and its variables blocked as its
Shampoo would block them (`blocking.statistic_sides`). The vocabulary is cut to one
above `skip_preconditioning_dim_size_gt`: the embedding's vocabulary side is then
still not preconditioned, so the statistics are those of the full model, without
building a 32,000-row embedding.
"""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

from precond_service.common import wire
from precond_service.common.blocks import StatisticsBlock
from precond_service.server.service import RootService
from precond_service.server.service_records import ServiceConfig
from protos import precond_service_pb2 as pb
from trainer.model import transformer
from trainer.optimizers import blocking
from trainer.service_connection import sized_service_flags

REPO = pathlib.Path(__file__).resolve().parents[1]

# Every config of configs/ that uses Shampoo (text_en_fr.py has wmt14_en_fr.py's models).
SHAMPOO_CONFIGS = [
    ("quickstart.py", "shampoo"),
    ("wmt14_en_fr.py", "tiny_shampoo"),
    ("wmt14_en_fr.py", "base_shampoo"),
    ("wmt14_en_fr.py", "big_shampoo"),
]


def config_of(file: str, variant: str):
    spec = importlib.util.spec_from_file_location(file[:-3], REPO / "configs" / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def statistic_sides(file: str, variant: str) -> list[int]:
    """The side of every statistic a run of the config pushes, from its model's shapes."""
    config = config_of(file, variant)
    shampoo = config.optimizer.shampoo
    vocab = min(config.data.vocab_size, shampoo.skip_preconditioning_dim_size_gt + 1)
    model = transformer.build_transformer(config.model, vocab)
    plans = [
        blocking.make_plan(
            variable.shape, shampoo.block_size, shampoo.skip_preconditioning_dim_size_gt
        )
        for variable in model.trainable_variables
    ]
    return blocking.statistic_sides(plans)


@pytest.mark.parametrize(("file", "variant"), SHAMPOO_CONFIGS)
def test_the_default_limits_hold_two_runs_of_every_config(file: str, variant: str) -> None:
    sides = statistic_sides(file, variant)
    defaults = ServiceConfig()
    # Keys of one run, pushed in one call and held; two such runs on one service.
    assert len(sides) <= defaults.max_blocks_per_run <= defaults.max_blocks_per_request
    assert 2 * len(sides) <= defaults.max_blocks
    assert max(sides) <= defaults.max_matrix_size
    # The byte budget: the trainer sizes the service child it starts from its model.
    flags = dict(flag.split("=", 1) for flag in sized_service_flags(sides, []))
    budget_mb = int(flags.get("--memory_budget_mb", defaults.memory_budget_mb))
    assert budget_mb << 20 >= sum(12 * n * n for n in sides)  # float32 statistic, float64 root.
    assert "--max_blocks_per_run" not in flags  # The defaults suffice.
    if variant == "big_shampoo":  # As docs/REPRODUCING.md counts it.
        assert len(sides) == 21_512 and set(sides) == {128}
        assert budget_mb > defaults.memory_budget_mb


def test_a_limit_the_config_gives_is_left_alone() -> None:
    sides = [128] * 40_000
    assert sized_service_flags(sides, []) == [
        "--memory_budget_mb=9439",  # 40,000 x 12 x 128^2 bytes x 1.25 = 9375 MiB, + 64.
        "--max_blocks_per_run=40000",
        "--max_blocks_per_request=40000",
    ]
    given = ["--memory_budget_mb=100000", "--max_blocks_per_run=50000"]
    assert sized_service_flags(sides, given) == ["--max_blocks_per_request=40000"]


def test_one_runs_22000_keys_are_all_accepted_with_the_default_flags() -> None:
    service = RootService(ServiceConfig())  # Not started: nothing is computed.
    block = wire.statistics_to_message(StatisticsBlock("k", 1, 2, np.eye(2, dtype=np.float32)))
    accepted = 0
    for start in range(0, 22_000, 4_000):  # Requests of at most 4,000 blocks.
        blocks = []
        for index in range(start, min(start + 4_000, 22_000)):
            block.key = f"layer{index}|b0.0|d0"
            blocks.append(pb.BlockStatistics.FromString(block.SerializeToString()))
        count, rejections = service.push("run", blocks)
        assert not rejections, rejections[:1]
        accepted += count
    assert accepted == 22_000 and service.status("run").runs[0].blocks_known == 22_000
