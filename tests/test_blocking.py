"""Blocking plans and the tensor moves that apply them."""

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
import tensorflow as tf

from trainer.optimizers import blocking


def test_merge_small_dims_drops_ones_and_merges_within_block_size():
    assert blocking.merge_small_dims([3, 3, 64, 128], 1024) == (576, 128)
    assert blocking.merge_small_dims([1, 512, 1], 128) == (512,)
    assert blocking.merge_small_dims([], 128) == ()
    assert blocking.merge_small_dims([8, 64], 128) == (8, 64)
    # Merging keeps the rank-2 structure: small matrices are not flattened.
    assert blocking.merge_small_dims([6, 4], 128) == (6, 4)
    assert blocking.merge_small_dims([2, 3, 4], 128) == (6, 4)


def test_embedding_is_preconditioned_on_the_model_side_only():
    plan = blocking.make_plan([32000, 512], block_size=128, skip_preconditioning_dim_size_gt=4096)
    assert plan.preconditioned == (False, True)
    assert plan.rank == 1
    # The vocabulary side is not split: 4 blocks of [32000, 128], not 1000.
    assert [(g.grid, g.block_shape) for g in plan.groups] == [((1, 4), (32000, 128))]


@pytest.mark.parametrize("shape", [[7], [], [1, 1], [1, 9]])
def test_rank_0_and_1_variables_have_no_blocks(shape):
    plan = blocking.make_plan(shape, block_size=4, skip_preconditioning_dim_size_gt=100)
    assert plan.rank == 0 and plan.groups == ()


def test_all_dimensions_skipped_means_graft_only():
    plan = blocking.make_plan([5000, 6000], block_size=128, skip_preconditioning_dim_size_gt=4096)
    assert plan.rank == 0 and plan.groups == ()


def test_ragged_blocks_form_four_groups_with_unique_coordinates():
    plan = blocking.make_plan([300, 200], block_size=128, skip_preconditioning_dim_size_gt=4096)
    shapes = sorted((g.grid, g.block_shape) for g in plan.groups)
    assert shapes == [
        ((1, 1), (44, 72)),
        ((1, 1), (44, 128)),
        ((2, 1), (128, 72)),
        ((2, 1), (128, 128)),
    ]
    coords = [c for g in plan.groups for c in g.coords]
    assert sorted(coords) == [(i, j) for i in range(3) for j in range(2)]


@hypothesis.settings(deadline=None, max_examples=40)
@hypothesis.given(
    shape=st.lists(st.integers(1, 13), min_size=2, max_size=4),
    block_size=st.integers(2, 9),
    skip=st.integers(1, 20),
)
def test_blocks_round_trip_and_cover_every_element_once(shape, block_size, skip):
    plan = blocking.make_plan(shape, block_size, skip)
    hypothesis.assume(plan.groups)
    x = tf.reshape(tf.range(np.prod(shape), dtype=tf.float32), plan.merged_shape)
    blocks = [blocking.to_blocks(x, g) for g in plan.groups]
    total = sum(int(tf.size(b)) for b in blocks)
    assert total == int(np.prod(shape))
    np.testing.assert_array_equal(blocking.from_blocks(blocks, plan).numpy(), x.numpy())


def test_block_coordinates_match_the_cut_region():
    plan = blocking.make_plan([10, 7], block_size=4, skip_preconditioning_dim_size_gt=100)
    x = np.arange(70, dtype=np.float32).reshape(10, 7)
    for group in plan.groups:
        blocks = blocking.to_blocks(tf.constant(x), group).numpy()
        for index, (bi, bj) in enumerate(group.coords):
            expected = x[bi * 4 : bi * 4 + 4, bj * 4 : bj * 4 + 4]
            np.testing.assert_array_equal(blocks[index], expected)


def test_kronecker_statistics_and_preconditioning_match_numpy_for_rank_3():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)  # 2 blocks of [3, 4, 5]
    stats = blocking.kronecker_statistics(tf.constant(g), [True, False, True])
    np.testing.assert_allclose(stats[0].numpy(), np.einsum("nabc,ndbc->nad", g, g), rtol=1e-5)
    np.testing.assert_allclose(stats[1].numpy(), np.einsum("nabc,nabd->ncd", g, g), rtol=1e-5)

    p0 = rng.normal(size=(2, 3, 3)).astype(np.float32)
    p2 = rng.normal(size=(2, 5, 5)).astype(np.float32)
    p0 = p0 + p0.transpose(0, 2, 1)
    p2 = p2 + p2.transpose(0, 2, 1)
    out = blocking.precondition_blocks(tf.constant(g), [tf.constant(p0), None, tf.constant(p2)])
    expected = np.einsum("nai,nibc,ncj->nabj", p0, g, p2)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4)
