"""Shampoo optimizer: the update against a NumPy reference, grafting, the seam, checkpoints, fit."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.optimizers import Shampoo
from trainer.optimizers.shampoo import NO_PRECONDITIONER, block_key

# Larger than float32 noise in rank-deficient statistics (~1e-7 of λmax), so that
# the float32 optimizer and the float64 reference agree on the null space too.
RIDGE = 1e-3


# --------------------------------------------------------------- references


def ref_inverse_root(stat: np.ndarray, p: int) -> np.ndarray:
    """(S + ε·λmax·I)^(-1/p) by eigendecomposition in float64."""
    stat = stat.astype(np.float64)
    w, v = np.linalg.eigh(stat)
    w = w + RIDGE * w.max()
    return (v * w ** (-1.0 / p)) @ v.T


def ref_blocks(shape, block):
    """Row and column ranges of the blocks of a 2-D variable."""
    rows = [(i, min(i + block, shape[0])) for i in range(0, shape[0], block)]
    cols = [(j, min(j + block, shape[1])) for j in range(0, shape[1], block)]
    return [(r, c) for r in rows for c in cols]


class RefShampoo:
    """Plain Shampoo for one 2-D variable: graft "none", beta1 = 0, beta2 = 1, roots every step."""

    def __init__(self, shape, block):
        self.blocks = ref_blocks(shape, block)
        self.left = {b: np.zeros((b[0][1] - b[0][0],) * 2) for b in self.blocks}
        self.right = {b: np.zeros((b[1][1] - b[1][0],) * 2) for b in self.blocks}

    def direction(self, grad):
        out = np.zeros_like(grad, dtype=np.float64)
        for b in self.blocks:
            (r0, r1), (c0, c1) = b
            g = grad[r0:r1, c0:c1].astype(np.float64)
            self.left[b] += g @ g.T
            self.right[b] += g.T @ g
            out[r0:r1, c0:c1] = (
                ref_inverse_root(self.left[b], 4) @ g @ ref_inverse_root(self.right[b], 4)
            )
        return out


def make_var(shape, seed=0, name="w"):
    rng = np.random.default_rng(seed)
    return keras.Variable(rng.normal(size=shape).astype(np.float32), name=name)


def grads_for(shape, steps, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape).astype(np.float32) for _ in range(steps)]


def plain_shampoo(**overrides):
    kwargs = dict(
        learning_rate=0.1,
        block_size=128,
        beta1=0.0,
        beta2=1.0,
        graft_type="none",
        start_preconditioning_step=0,
        preconditioning_compute_steps=1,
        matrix_epsilon=RIDGE,
    )
    kwargs.update(overrides)
    return Shampoo(**kwargs)


# ------------------------------------------------------------------- update


@pytest.mark.parametrize(("shape", "block"), [((6, 4), 128), ((10, 7), 4)])
def test_several_steps_match_numpy_reference(shape, block):
    var = make_var(shape)
    opt = plain_shampoo(block_size=block)
    ref = RefShampoo(shape, block)
    expected = var.numpy().astype(np.float64)
    for grad in grads_for(shape, 4):
        opt.apply_gradients([(tf.constant(grad), var)])
        expected -= 0.1 * ref.direction(grad)
        np.testing.assert_allclose(var.numpy(), expected, rtol=2e-4, atol=2e-4)


def test_rank_3_uses_exponent_six_and_mode_products():
    shape = (3, 4, 5)
    var = make_var(shape)
    # 3 * 4 > 6: nothing merges, and no dimension exceeds 6: one block of rank 3.
    opt = plain_shampoo(block_size=6)
    grad = grads_for(shape, 1)[0]
    before = var.numpy().astype(np.float64)
    opt.apply_gradients([(tf.constant(grad), var)])
    g = grad.astype(np.float64)
    p = [
        ref_inverse_root(np.einsum("abc,dbc->ad", g, g), 6),
        ref_inverse_root(np.einsum("abc,adc->bd", g, g), 6),
        ref_inverse_root(np.einsum("abc,abd->cd", g, g), 6),
    ]
    direction = np.einsum("ai,bj,ck,ijk->abc", p[0], p[1], p[2], g)
    np.testing.assert_allclose(var.numpy(), before - 0.1 * direction, rtol=2e-4, atol=2e-4)


def test_one_sided_embedding_preconditions_the_small_side_only():
    shape = (50, 6)
    var = make_var(shape)
    opt = plain_shampoo(skip_preconditioning_dim_size_gt=20)
    grad = grads_for(shape, 1)[0]
    before = var.numpy().astype(np.float64)
    opt.apply_gradients([(tf.constant(grad), var)])
    g = grad.astype(np.float64)
    direction = g @ ref_inverse_root(g.T @ g, 2)  # r = 1: exponent -1/2
    np.testing.assert_allclose(var.numpy(), before - 0.1 * direction, rtol=2e-4, atol=2e-4)
    assert set(opt.preconditioner_stats_steps()) == {block_key(var.path, (0, 0), 1)}


def test_exponent_override():
    shape = (5, 3)
    var = make_var(shape)
    opt = plain_shampoo(exponent_override=2)
    grad = grads_for(shape, 1)[0]
    before = var.numpy().astype(np.float64)
    opt.apply_gradients([(tf.constant(grad), var)])
    g = grad.astype(np.float64)
    direction = ref_inverse_root(g @ g.T, 2) @ g @ ref_inverse_root(g.T @ g, 2)
    np.testing.assert_allclose(var.numpy(), before - 0.1 * direction, rtol=2e-4, atol=2e-4)


# ------------------------------------------------------------------ grafting


def adagrad_updates(grads, eps=1e-10):
    acc = 0.0
    out = []
    for g in grads:
        acc = acc + g.astype(np.float64) ** 2
        out.append(g / (np.sqrt(acc) + eps))
    return out


@pytest.mark.parametrize(
    "mode_kwargs",
    [{"start_preconditioning_step": 3}, {"precondition_mode": "off"}],
    ids=["before_start", "off_mode"],
)
def test_graft_only_update_is_exactly_the_grafting_optimizer(mode_kwargs):
    shape = (8, 5)
    var = make_var(shape)
    opt = Shampoo(learning_rate=0.05, beta1=0.0, graft_type="adagrad", **mode_kwargs)
    grads = grads_for(shape, 3)
    expected = var.numpy().astype(np.float64)
    for grad, update in zip(grads, adagrad_updates(grads)):
        opt.apply_gradients([(tf.constant(grad), var)])
        expected -= 0.05 * update
    np.testing.assert_allclose(var.numpy(), expected, rtol=1e-5, atol=1e-6)
    if mode_kwargs.get("precondition_mode") == "off":
        # No statistics or roots are kept at all.
        assert opt.preconditioner_stats_steps() == {}
        assert opt.statistics_snapshot() == []


def test_grafted_update_has_shampoo_direction_and_adagrad_norm():
    shape = (12, 7)
    var = make_var(shape)
    opt = Shampoo(
        learning_rate=1.0,
        beta1=0.0,
        beta2=1.0,
        block_size=5,  # several blocks, ragged ones included: the norm is per layer
        graft_scope="layer",
        matrix_epsilon=RIDGE,
        graft_type="adagrad",
        start_preconditioning_step=0,
        preconditioning_compute_steps=1,
    )
    grad = grads_for(shape, 1)[0]
    before = var.numpy().astype(np.float64)
    opt.apply_gradients([(tf.constant(grad), var)])
    update = before - var.numpy()

    shampoo_dir = RefShampoo(shape, 5).direction(grad)
    graft = adagrad_updates([grad])[0]
    np.testing.assert_allclose(np.linalg.norm(update), np.linalg.norm(graft), rtol=1e-4)
    cosine = np.sum(update * shampoo_dir) / np.linalg.norm(update) / np.linalg.norm(shampoo_dir)
    assert cosine == pytest.approx(1.0, abs=1e-5)
    # The diagnostic: how far Shampoo's direction turned the graft's update.
    turned = np.sum(shampoo_dir * graft) / np.linalg.norm(shampoo_dir) / np.linalg.norm(graft)
    (reported,) = opt.direction_cosines().values()
    assert reported == pytest.approx(turned, abs=1e-5) and turned < 0.99


def test_direction_cosine_is_nan_before_preconditioning_starts():
    var = make_var((6, 4))
    opt = plain_shampoo(start_preconditioning_step=5)
    opt.apply_gradients([(tf.constant(grads_for((6, 4), 1)[0]), var)])
    assert np.isnan(list(opt.direction_cosines().values())).all()


@pytest.mark.parametrize("graft_type", ["adagrad", "adam", "sgd", "none"])
def test_async_mode_without_roots_is_graft_only_never_zero(graft_type):
    shape = (6, 6)
    var = make_var(shape)
    opt = Shampoo(
        learning_rate=0.1,
        beta1=0.0,
        graft_type=graft_type,
        precondition_mode="async",
        start_preconditioning_step=0,
    )
    grad = grads_for(shape, 1)[0]
    before = var.numpy().astype(np.float64)
    opt.apply_gradients([(tf.constant(grad), var)])
    update = (before - var.numpy()) / 0.1
    g = grad.astype(np.float64)
    expected = {
        "adagrad": g / (np.abs(g) + 1e-10),
        "adam": g / (np.sqrt(g**2) + 1e-10),
        "sgd": g,
        "none": g,
    }[graft_type]
    np.testing.assert_allclose(update, expected, rtol=1e-4, atol=1e-5)


def test_rejected_roots_keep_the_block_graft_only():
    shape = (6, 4)
    var = make_var(shape)
    # No residual can be under this threshold, so every root is rejected.
    opt = plain_shampoo(graft_type="sgd", inverse_failure_threshold=1e-300)
    grad = grads_for(shape, 1)[0]
    before = var.numpy()
    opt.apply_gradients([(tf.constant(grad), var)])
    np.testing.assert_allclose(var.numpy(), before - 0.1 * grad, rtol=1e-6)
    assert set(opt.preconditioner_stats_steps().values()) == {NO_PRECONDITIONER}


def test_momentum_and_nesterov_follow_the_moving_average():
    shape = (4, 3)
    grads = grads_for(shape, 3)
    for nesterov in (False, True):
        var = make_var(shape)
        opt = Shampoo(
            learning_rate=0.1,
            beta1=0.9,
            graft_type="sgd",
            nesterov=nesterov,
            momentum_type="update",  # The EMA of the update, uncorrected.
            start_preconditioning_step=100,
        )
        expected = var.numpy().astype(np.float64)
        m = 0.0
        for g in grads:
            opt.apply_gradients([(tf.constant(g), var)])
            m = 0.9 * m + 0.1 * g
            expected -= 0.1 * (0.9 * m + 0.1 * g if nesterov else m)
        np.testing.assert_allclose(var.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(8, 5), (7,)], ids=["matrix", "vector"])
def test_gradient_momentum_with_adam_graft_and_no_roots_is_keras_adam(shape):
    grads = grads_for(shape, 6)
    keras_var, var = make_var(shape), make_var(shape)
    adam = keras.optimizers.Adam(0.01, beta_1=0.9, beta_2=0.99, epsilon=1e-10)
    opt = Shampoo(
        0.01,
        beta1=0.9,
        beta2=0.99,
        diagonal_epsilon=1e-10,
        momentum_type="gradient",
        graft_type="adam",
        precondition_mode="off",
    )
    for g in grads:
        adam.apply_gradients([(tf.constant(g), keras_var)])
        opt.apply_gradients([(tf.constant(g), var)])
    np.testing.assert_allclose(var.numpy(), keras_var.numpy(), rtol=1e-6, atol=1e-6)


def test_gradient_momentum_preconditions_the_bias_corrected_first_moment():
    shape = (6, 4)
    grads = grads_for(shape, 3)
    var = make_var(shape)
    opt = plain_shampoo(beta1=0.8, momentum_type="gradient")
    ref = RefShampoo(shape, 128)
    expected = var.numpy().astype(np.float64)
    m = np.zeros(shape)
    for t, g in enumerate(grads, start=1):
        opt.apply_gradients([(tf.constant(g), var)])
        m = 0.8 * m + 0.2 * g
        ref.direction(g)  # accumulates the statistics of the raw gradient
        # The roots of those statistics, applied to the first moment instead.
        left = ref_inverse_root(ref.left[ref.blocks[0]], 4)
        right = ref_inverse_root(ref.right[ref.blocks[0]], 4)
        expected -= 0.1 * left @ (m / (1 - 0.8**t)) @ right
    np.testing.assert_allclose(var.numpy(), expected, rtol=2e-4, atol=2e-4)


def test_block_grafting_gives_each_block_its_grafts_norm():
    shape = (12, 7)
    var = make_var(shape)
    opt = plain_shampoo(block_size=5, graft_type="adagrad", graft_scope="block")
    grad = grads_for(shape, 1)[0]
    before = var.numpy().astype(np.float64)
    opt.apply_gradients([(tf.constant(grad), var)])
    update = (before - var.numpy()) / 0.1
    shampoo_dir = RefShampoo(shape, 5).direction(grad)
    graft = adagrad_updates([grad])[0]
    for (r0, r1), (c0, c1) in ref_blocks(shape, 5):
        block, want = update[r0:r1, c0:c1], shampoo_dir[r0:r1, c0:c1]
        np.testing.assert_allclose(
            np.linalg.norm(block), np.linalg.norm(graft[r0:r1, c0:c1]), rtol=1e-4
        )
        cosine = np.sum(block * want) / np.linalg.norm(block) / np.linalg.norm(want)
        assert cosine == pytest.approx(1.0, abs=1e-5)


def test_statistics_beta2_decays_the_statistics_apart_from_the_graft():
    shape = (5, 3)
    grads = grads_for(shape, 3)
    summed = Shampoo(beta2=0.9, statistics_beta2=1.0, precondition_mode="async")
    tied = Shampoo(beta2=0.9, precondition_mode="async")
    for opt in (summed, tied):
        var = make_var(shape)
        for g in grads:
            opt.apply_gradients([(tf.constant(g), var)])
    left = {b.key: b.statistics for b in summed.statistics_snapshot()}
    decayed = {b.key: b.statistics for b in tied.statistics_snapshot()}
    (key,) = [k for k in left if k.endswith("d0")]
    np.testing.assert_allclose(left[key], sum(g @ g.T for g in grads), rtol=1e-5)
    expected = np.zeros((5, 5))
    for g in grads:
        expected = 0.9 * expected + 0.1 * g @ g.T
    np.testing.assert_allclose(decayed[key], expected, rtol=1e-5)


def test_mixed_variables_each_get_their_own_update():
    # Vector (graft only), a matrix (preconditioned), an embedding (one-sided),
    # in an order that puts a graft-only variable between preconditioned ones.
    shapes = {"a": (5, 4), "bias": (4,), "emb": (40, 3), "c": (3, 6)}
    variables = [make_var(s, seed=i, name=n) for i, (n, s) in enumerate(shapes.items())]
    opt = plain_shampoo(graft_type="sgd", skip_preconditioning_dim_size_gt=10)
    grads = [grads_for(v.shape, 1, seed=10 + i)[0] for i, v in enumerate(variables)]
    before = [v.numpy().astype(np.float64) for v in variables]
    opt.apply_gradients(zip([tf.constant(g) for g in grads], variables))

    def graft_scaled(direction, g):
        return direction * np.linalg.norm(g) / np.linalg.norm(direction)

    ga, gb, ge, gc = (g.astype(np.float64) for g in grads)
    expected = [
        graft_scaled(RefShampoo((5, 4), 128).direction(ga), ga),
        gb,
        graft_scaled(ge @ ref_inverse_root(ge.T @ ge, 2), ge),
        graft_scaled(RefShampoo((3, 6), 128).direction(gc), gc),
    ]
    for var, b, e in zip(variables, before, expected):
        np.testing.assert_allclose(var.numpy(), b - 0.1 * e, rtol=2e-4, atol=2e-4)


# -------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"graft_type": "adamw"},
            r"graft_type must be one of \['adagrad', 'adam', 'sgd', 'none'\], got 'adamw'",
        ),
        ({"block_size": 0}, "block_size must be a positive integer, got 0"),
        ({"beta1": 1.5}, r"beta1 must be a number in \[0, 1\], got 1.5"),
        ({"precondition_mode": "later"}, "precondition_mode must be one of"),
        ({"graft_type": "adam", "beta2": 1.0}, "graft_type='adam' needs beta2 < 1"),
        ({"matrix_epsilon": 0.0}, "matrix_epsilon must be a positive number, got 0.0"),
        ({"start_preconditioning_step": -1}, "start_preconditioning_step must be a non-negative"),
        (
            {"momentum_type": "after"},
            r"momentum_type must be one of \['update', 'gradient'\], got 'after'",
        ),
        ({"graft_scope": "model"}, r"graft_scope must be one of \['layer', 'block'\]"),
        ({"statistics_beta2": 2.0}, r"statistics_beta2 must be a number in \[0, 1\], got 2.0"),
        ({"root_method": "svd"}, r"root_method must be one of \['schur_newton', 'eigh'\]"),
        ({"ridge_mode": "always"}, r"ridge_mode must be one of \['relative', 'absolute_if"),
    ],
)
def test_bad_hyperparameters_name_the_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Shampoo(**kwargs)
