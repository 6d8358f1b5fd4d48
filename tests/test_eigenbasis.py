"""Adam in Shampoo's eigenbasis (preconditioner="eigenbasis"): NumPy reference, seams, service."""

import importlib.util
import os
import time
import uuid

import keras
import numpy as np
import pytest
import tensorflow as tf

from precond_service.client.process import local_service
from precond_service.client.service_client import PreconditionerClient
from precond_service.common import eigenbasis, wire
from precond_service.common.blocks import PreconditionerBlock, StatisticsBlock
from precond_service.server import validation
from trainer.config import validate
from trainer.optimizer_config import make_optimizer
from trainer.optimizers import Shampoo
from trainer.optimizers.service_bridge import ServicePreconditioning
from trainer.optimizers.shampoo import NO_PRECONDITIONER

BETA1, BETA2, STATS_BETA2, EPS, LR = 0.9, 0.95, 0.95, 1e-8, 0.01
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def soap(**overrides):
    kwargs = dict(
        learning_rate=LR,
        preconditioner="eigenbasis",
        beta1=BETA1,
        beta2=BETA2,
        statistics_beta2=STATS_BETA2,
        diagonal_epsilon=EPS,
        start_preconditioning_step=1,
        preconditioning_compute_steps=3,
    )
    kwargs.update(overrides)
    return Shampoo(**kwargs)


def ref_basis(stat):
    """Eigenvectors in float64, largest eigenvalue first."""
    _, vectors = np.linalg.eigh(stat)
    return vectors[:, ::-1]


class RefSoap:
    """The algorithm in float64 NumPy for one 2-D variable cut into `block` blocks."""

    def __init__(self, shape, block, start=1, every=3):
        rows = [(i, min(i + block, shape[0])) for i in range(0, shape[0], block)]
        cols = [(j, min(j + block, shape[1])) for j in range(0, shape[1], block)]
        self.blocks = [(r, c) for r in rows for c in cols]
        self.start, self.every = start, every
        self.m = np.zeros(shape)
        self.left, self.right, self.q_left, self.q_right, self.v = {}, {}, {}, {}, {}
        for b in self.blocks:
            (r0, r1), (c0, c1) = b
            self.left[b], self.q_left[b] = np.zeros((r1 - r0,) * 2), np.eye(r1 - r0)
            self.right[b], self.q_right[b] = np.zeros((c1 - c0,) * 2), np.eye(c1 - c0)
            self.v[b] = np.zeros((r1 - r0, c1 - c0))

    def update(self, grad, t):
        grad = grad.astype(np.float64)
        self.m = BETA1 * self.m + (1 - BETA1) * grad
        m_hat = self.m / (1 - BETA1 ** (t + 1))
        out = np.zeros_like(grad)
        for b in self.blocks:
            (r0, r1), (c0, c1) = b
            g, m = grad[r0:r1, c0:c1], m_hat[r0:r1, c0:c1]
            self.left[b] = STATS_BETA2 * self.left[b] + (1 - STATS_BETA2) * g @ g.T
            self.right[b] = STATS_BETA2 * self.right[b] + (1 - STATS_BETA2) * g.T @ g
            if t >= self.start and (t - self.start) % self.every == 0:
                self.q_left[b], self.q_right[b] = ref_basis(self.left[b]), ref_basis(self.right[b])
            ql, qr = self.q_left[b], self.q_right[b]
            self.v[b] = BETA2 * self.v[b] + (1 - BETA2) * (ql.T @ g @ qr) ** 2
            v_hat = self.v[b] / (1 - BETA2 ** (t + 1))
            out[r0:r1, c0:c1] = ql @ ((ql.T @ m @ qr) / (np.sqrt(v_hat) + EPS)) @ qr.T
        return out


@pytest.mark.parametrize(("shape", "block"), [((6, 5), 128), ((10, 7), 4)])
def test_several_steps_with_basis_changes_match_numpy_reference(shape, block):
    rng = np.random.default_rng(0)
    var = keras.Variable(rng.normal(size=shape).astype(np.float32), name="w")
    opt = soap(block_size=block)
    ref = RefSoap(shape, block)
    expected = var.numpy().astype(np.float64)
    # Bases are computed at steps 1, 4 and 7: the 9 steps cross three basis changes.
    for t in range(9):
        grad = rng.normal(size=shape).astype(np.float32)
        opt.apply_gradients([(tf.constant(grad), var)])
        expected -= LR * ref.update(grad, t)
        np.testing.assert_allclose(var.numpy(), expected, rtol=1e-4, atol=1e-5)
    assert set(opt.preconditioner_stats_steps().values()) == {8}


def test_a_vector_is_adam_exactly():
    rng = np.random.default_rng(1)
    var = keras.Variable(rng.normal(size=(7,)).astype(np.float32), name="b")
    opt = soap()
    m = v = np.zeros(7)
    expected = var.numpy().astype(np.float64)
    for t in range(5):
        g = rng.normal(size=7)
        opt.apply_gradients([(tf.constant(g, tf.float32), var)])
        m = BETA1 * m + (1 - BETA1) * g
        v = BETA2 * v + (1 - BETA2) * g**2
        m_hat, v_hat = m / (1 - BETA1 ** (t + 1)), v / (1 - BETA2 ** (t + 1))
        expected -= LR * m_hat / (np.sqrt(v_hat) + EPS)
    np.testing.assert_allclose(var.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_a_side_above_the_size_limit_stays_unrotated():
    rng = np.random.default_rng(2)
    var = keras.Variable(rng.normal(size=(12, 4)).astype(np.float32), name="embedding")
    opt = soap(skip_preconditioning_dim_size_gt=8, start_preconditioning_step=0)
    opt.apply_gradients([(tf.constant(rng.normal(size=(12, 4)), tf.float32), var)])
    keys = opt.preconditioner_stats_steps()
    assert [k.split("|")[-1] for k in keys] == ["d1"]  # only the small side has a basis


def test_without_a_basis_the_update_is_adam_and_installing_one_keeps_the_moments():
    rng = np.random.default_rng(3)
    grads = [rng.normal(size=(6, 5)).astype(np.float32) for _ in range(3)]
    var = keras.Variable(np.zeros((6, 5), np.float32), name="w")
    adam = keras.Variable(np.zeros((6, 5), np.float32), name="w")
    opt, reference = soap(precondition_mode="async"), soap(precondition_mode="async")
    for g in grads[:2]:
        opt.apply_gradients([(tf.constant(g), var)])
        reference.apply_gradients([(tf.constant(g), adam)])
    np.testing.assert_array_equal(var.numpy(), adam.numpy())  # identity bases: same bits
    moments = [v.numpy() for v in opt.variables if "_v_g" in v.path or "momentum" in v.path]
    stats = {b.key: b.statistics for b in opt.statistics_snapshot()}
    installed = opt.assign_preconditioners(
        PreconditionerBlock(key, 2, ref_basis(s.astype(np.float64)), method="eigenbasis")
        for key, s in stats.items()
    )
    assert installed == 2
    after = [v.numpy() for v in opt.variables if "_v_g" in v.path or "momentum" in v.path]
    for before_value, after_value in zip(moments, after):
        np.testing.assert_array_equal(before_value, after_value)
    opt.apply_gradients([(tf.constant(grads[2]), var)])
    reference.apply_gradients([(tf.constant(grads[2]), adam)])
    assert not np.allclose(var.numpy(), adam.numpy())  # the basis now turns the step


def test_a_root_is_refused_where_a_basis_is_wanted():
    var = keras.Variable(np.zeros((6, 5), np.float32), name="w")
    opt = soap(precondition_mode="async")
    opt.build([var])
    key = next(iter(opt.preconditioner_stats_steps()))
    with pytest.raises(ValueError, match="sent a root .* preconditioner='eigenbasis'"):
        opt.assign_preconditioners([PreconditionerBlock(key, 1, np.eye(6), method="eigh")])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preconditioner": "basis"}, r"preconditioner must be one of \['root', 'eigenbasis'\]"),
        ({"graft_type": "adagrad", "beta2": 1.0}, "needs graft_type='adam'"),
        ({"momentum_type": "update"}, "momentum_type='gradient'"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        soap(**kwargs)


def test_checkpoint_round_trip_continues_bitwise(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(16, 6)).astype(np.float32)
    y = rng.normal(size=(16, 3)).astype(np.float32)

    def make():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, name="dense")])
        opt = soap(block_size=4)
        opt.build(model.trainable_variables)
        return model, opt

    def train(model, opt, steps):
        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(x) - y))
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))

        for _ in range(steps):
            step()

    model, opt = make()
    train(model, opt, 5)
    path = tf.train.Checkpoint(model=model, optimizer=opt).save(os.path.join(tmp_path, "ckpt"))
    train(model, opt, 5)
    model2, opt2 = make()
    tf.train.Checkpoint(model=model2, optimizer=opt2).restore(path).assert_consumed()
    train(model2, opt2, 5)
    for a, b in zip(model.trainable_variables, model2.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# ------------------------------------------------------------- the service side


def test_eigenbasis_is_orthogonal_descending_and_diagonalizes():
    rng = np.random.default_rng(5)
    g = rng.normal(size=(20, 30))
    stat = g @ g.T
    result = eigenbasis.eigenbasis(stat.astype(np.float32))
    q = result.root
    assert result.converged and result.method == "eigenbasis" and result.error < 1e-12
    diagonal = q.T @ stat @ q
    assert np.all(np.diff(np.diag(diagonal)) <= 0)
    off = diagonal - np.diag(np.diag(diagonal))
    assert np.abs(off).max() < 1e-6 * np.abs(diagonal).max()


def test_the_wanted_preconditioner_travels_and_is_validated():
    block = StatisticsBlock("w|b0.0|d0", 3, 4, np.eye(4), preconditioner="eigenbasis")
    message = wire.statistics_to_message(block)
    assert validation.decode_settings(message).preconditioner == "eigenbasis"
    message.preconditioner = "cholesky"
    with pytest.raises(ValueError, match=r"preconditioner must be one of \('root', 'eigenbasis'\)"):
        validation.decode_settings(message)


@pytest.fixture(scope="module")
def client():
    with local_service(workers=1) as address:
        client = PreconditionerClient(
            address=address, run_id=f"test-{uuid.uuid4()}", pull_interval_s=0.05
        )
        client.start()
        yield client
        client.close()


def _one_step(mode):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(64, 12)).astype(np.float32)
    y = rng.normal(size=(64, 3)).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(3, name="dense")])
    opt = soap(
        precondition_mode=mode, start_preconditioning_step=0, preconditioning_compute_steps=1
    )
    opt.build(model.trainable_variables)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x) - y))
    opt.apply_gradients(
        zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
    )
    return opt


def test_the_service_publishes_the_basis_the_sync_mode_computes(client):
    sync, opt = _one_step("sync"), _one_step("async")
    bridge = ServicePreconditioning(opt, client, update_steps=1)
    bridge.after_steps()
    deadline = time.monotonic() + 30
    while (
        time.monotonic() < deadline
        and NO_PRECONDITIONER in opt.preconditioner_stats_steps().values()
    ):
        bridge.after_steps()
        time.sleep(0.05)
    assert opt.preconditioner_stats_steps() == sync.preconditioner_stats_steps()
    for key in opt.preconditioner_stats_steps():
        held = [o._registry.by_key[key] for o in (opt, sync)]
        a, b = (factor.preconditioner.numpy()[index] for factor, index in held)
        # Same basis up to the sign of each eigenvector.
        np.testing.assert_allclose(np.abs(a.T @ b), np.eye(len(a)), atol=1e-4)


# ------------------------------------------------------------- configs and fit


def _config(path, variant):
    spec = importlib.util.spec_from_file_location("config_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


@pytest.mark.parametrize(
    ("path", "variant"),
    [
        ("configs/wmt14_en_fr.py", "big_soap"),
        ("configs/text_en_fr.py", "tiny_soap"),
        ("configs/quickstart.py", "soap"),
    ],
)
def test_soap_variants_are_async_adaptive_eigenbasis_and_build(path, variant):
    config = _config(os.path.join(REPO_ROOT, path), variant)
    if config.data.source == "text":
        config.data.train_files = config.data.dev_files = "pairs.tsv"
    validate(config)
    assert (config.precond.mode, config.precond.cadence) == ("async", "adaptive")
    optimizer = make_optimizer(config)
    assert optimizer.preconditioner == "eigenbasis"
    assert (optimizer.beta1, optimizer.beta2, optimizer.statistics_beta2) == (0.9, 0.98, 0.98)


def test_model_fit_in_sync_mode_installs_bases_and_lowers_the_loss():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(256, 12)).astype(np.float32) * np.logspace(0, -1.5, 12)
    y = (x @ rng.normal(size=(12, 3))).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(3, name="dense")])
    opt = soap(learning_rate=0.05, weight_decay=1e-4)
    model.compile(optimizer=opt, loss="mse", jit_compile=False)
    history = model.fit(x, y, batch_size=32, epochs=8, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert losses[-1] < 0.2 * losses[0]
    assert NO_PRECONDITIONER not in opt.preconditioner_stats_steps().values()
