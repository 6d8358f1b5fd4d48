"""Shampoo in async mode against a real `python -m precond_service` child process."""

import time
import uuid

import keras
import numpy as np
import pytest
import tensorflow as tf

from precond_service import roots
from precond_service.client import PreconditionerClient
from trainer.optimizers import Shampoo
from trainer.optimizers.service_bridge import (
    ServicePreconditioning,
    ShampooServiceCallback,
    staleness,
)
from trainer.optimizers.shampoo import NO_PRECONDITIONER, block_key
from trainer.service_process import local_service


@pytest.fixture(scope="module")
def service_address():
    with local_service(workers=1) as address:
        yield address


@pytest.fixture
def client(service_address):
    client = PreconditionerClient(
        address=service_address, run_id=f"test-{uuid.uuid4()}", pull_interval_s=0.05
    )
    client.start()
    yield client
    client.close()


def regression(seed=0, n=256, d_in=12, d_out=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_in)) * np.logspace(0, -1.5, d_in)
    y = x @ rng.normal(size=(d_in, d_out))
    return x.astype(np.float32), y.astype(np.float32)


def test_roots_from_the_service_are_installed_and_match_the_solver(client):
    x, y = regression()
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(3, name="dense")])
    opt = Shampoo(0.01, precondition_mode="async", start_preconditioning_step=0)
    opt.build(model.trainable_variables)
    bridge = ServicePreconditioning(opt, client, update_steps=2)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x) - y))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))

    step()
    step()
    snapshot = {b.key: b for b in opt.statistics_snapshot()}
    assert bridge.after_steps() == 0  # pushed at step 2; nothing computed yet
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        held = opt.preconditioner_stats_steps()
        if all(s == 2 for s in held.values()):
            break
        bridge.after_steps()
        time.sleep(0.05)
    assert opt.preconditioner_stats_steps() == {key: 2 for key in snapshot}

    # The installed root is the service's float64 root of that step's statistic.
    key = block_key("dense/kernel", (0, 0), 0)
    state_root = _held_root(opt, key)
    expected = roots.inverse_pth_root(snapshot[key].statistics, 4).root
    np.testing.assert_allclose(state_root, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    s = staleness(opt)
    assert s.fraction_preconditioned == 1.0 and s.min == s.max == 0


def _held_root(opt, key):
    factor, index = opt._registry.by_key[key]
    return factor.preconditioner.numpy()[index]


def test_model_fit_with_the_callback_trains_with_service_roots(client):
    x, y = regression(seed=1)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(3, name="dense")])
    opt = Shampoo(0.05, precondition_mode="async", start_preconditioning_step=4)
    opt.build(model.trainable_variables)
    bridge = ServicePreconditioning(opt, client, update_steps=4)
    model.compile(optimizer=opt, loss="mse", jit_compile=False)
    history = model.fit(
        x, y, batch_size=32, epochs=6, verbose=0, callbacks=[ShampooServiceCallback(bridge)]
    )
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0]
    held = opt.preconditioner_stats_steps().values()
    assert all(s != NO_PRECONDITIONER for s in held)
    assert client.status().pushes_sent >= 2


def test_bridge_needs_async_mode_and_positive_update_steps(client):
    with pytest.raises(ValueError, match="precondition_mode='async'"):
        ServicePreconditioning(Shampoo(), client, update_steps=5)
    with pytest.raises(ValueError, match="update_steps must be a positive integer, got 0"):
        ServicePreconditioning(Shampoo(precondition_mode="async"), client, update_steps=0)
    with pytest.raises(RuntimeError, match="optimizer.build"):
        ServicePreconditioning(Shampoo(precondition_mode="async"), client, update_steps=5)


def test_a_service_that_cannot_start_is_reported_with_its_log():
    # The message ends with what the service logged before exiting.
    with pytest.raises(
        RuntimeError,
        match="(?s)exited with status 1 before serving; its log ends:.*workers must be >= 1, got 0",
    ):
        with local_service(workers=0):
            pass
