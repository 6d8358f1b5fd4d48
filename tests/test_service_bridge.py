"""Shampoo in async mode against a real `python -m precond_service` child process."""

import time
import uuid

import keras
import numpy as np
import pytest
import tensorflow as tf

from precond_service.client.process import local_service
from precond_service.client.service_client import PreconditionerClient
from precond_service.common import roots
from tests.conftest import wait_until
from trainer.optimizers import Shampoo
from trainer.optimizers.service_bridge import (
    ServicePreconditioning,
    ShampooServiceCallback,
    staleness,
)
from trainer.optimizers.shampoo import NO_PRECONDITIONER, block_key


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


def _one_step_model(precondition_mode, **shampoo_args):
    """A Dense model with fixed weights and the Shampoo optimizer given, after one step."""
    x, y = regression(seed=2)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(3, name="dense")])
    opt = Shampoo(
        0.01,
        precondition_mode=precondition_mode,
        start_preconditioning_step=0,
        preconditioning_compute_steps=1,
        **shampoo_args,
    )
    opt.build(model.trainable_variables)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x) - y))
    grads = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))
    return opt


@pytest.mark.parametrize("ridge", [{}, {"ridge_mode": "absolute_if_needed"}])
def test_async_roots_use_the_optimizers_own_root_settings_as_sync_does(client, ridge):
    # Settings far from the service's defaults (--ridge_epsilon 1e-6): the statistic
    # of one step is rank-deficient, so the ridge decides the root.
    settings = {"matrix_epsilon": 1e-2, "inverse_failure_threshold": 0.5, **ridge}
    sync = _one_step_model("sync", **settings)
    opt = _one_step_model("async", **settings)
    bridge = ServicePreconditioning(opt, client, update_steps=1)
    snapshot = {b.key: b for b in opt.statistics_snapshot()}
    bridge.after_steps()
    assert wait_until(lambda: bridge.after_steps() >= 0 and _all_held(opt), timeout_s=30)

    # One clock: both modes name the root by the update count its statistic includes.
    assert (
        opt.preconditioner_stats_steps()
        == sync.preconditioner_stats_steps()
        == {key: 1 for key in snapshot}
    )
    for key, block in snapshot.items():
        assert block.ridge_epsilon == 1e-2 and block.failure_threshold == 0.5
        assert block.ridge_mode == ridge.get("ridge_mode", "relative")
        held, expected = _held_root(opt, key), _held_root(sync, key)
        np.testing.assert_allclose(held, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    # The service's own default would have given a different root.
    key = block_key("dense/kernel", (0, 0), 0)
    default = roots.inverse_pth_root(snapshot[key].statistics, 4).root
    assert not np.allclose(default, _held_root(sync, key), rtol=1e-2)


def _all_held(opt):
    return all(s != NO_PRECONDITIONER for s in opt.preconditioner_stats_steps().values())


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
    assert np.all(np.isfinite(history.history["loss"]))
    # Every block took a root during fit, computed from statistics the callback
    # pushed: at update counts 4, 8, ..., 48.
    held = set(opt.preconditioner_stats_steps().values())
    assert NO_PRECONDITIONER not in held and held <= set(range(4, 49, 4))
    assert bridge.pushes == 12  # every 4 of the 48 updates
    assert bridge.wait_pushed() and wait_until(lambda: client.status().pushes_sent >= 2, 30)


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


def test_pushes_follow_the_optimizers_update_count(client):
    x, y = regression(seed=3)
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(3, name="dense")])
    opt = Shampoo(0.01, precondition_mode="async")
    opt.build(model.trainable_variables)
    bridge = ServicePreconditioning(opt, client, update_steps=3)

    def steps(count):
        for _ in range(count):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(x) - y))
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))

    assert bridge.steps_until_due() == 3
    steps(2)
    bridge.after_steps()
    assert bridge.pushes == 0 and bridge.steps_until_due() == 1
    steps(1)
    bridge.after_steps()
    assert bridge.pushes == 1 and bridge.steps_until_due() == 3
    steps(2)
    # A bridge made for a resumed run (update count 5) pushes at once, then at 6.
    resumed = ServicePreconditioning(opt, client, update_steps=3)
    assert resumed.step == 5 and resumed.steps_until_due() == 1
    resumed.after_steps()
    assert resumed.pushes == 1 and resumed.steps_until_due() == 1
    assert bridge.wait_pushed() and resumed.wait_pushed()
    assert wait_until(lambda: client.status().pushes_sent == 2, timeout_s=30)


def test_adaptive_cadence_pushes_again_once_the_last_push_is_published(client):
    x, y = regression(seed=4)
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(3, name="dense")])
    opt = Shampoo(0.01, precondition_mode="async")
    opt.build(model.trainable_variables)
    bridge = ServicePreconditioning(opt, client, update_steps=100, cadence="adaptive")

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x) - y))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))

    for expected_pushes in (1, 2, 3):
        step()
        bridge.after_steps()
        assert bridge.pushes == expected_pushes
        bridge.after_steps()  # same update count: never pushed twice
        assert bridge.pushes == expected_pushes
        # Once every root of that push is in, the next update pushes again.
        assert wait_until(lambda: bridge._last_push_published(), timeout_s=30)
        assert bridge.after_steps() >= 0 and _all_held(opt)
    assert staleness(opt).max <= 1
    with pytest.raises(ValueError, match="cadence must be one of"):
        ServicePreconditioning(opt, client, update_steps=4, cadence="sometimes")


def test_delay_mode_goes_on_at_once_when_the_service_fails_a_due_root(client):
    # A failure threshold no root meets: the service reports the failures, and the
    # repeatable mode installs what did arrive instead of waiting out its timeout.
    opt = _one_step_model("async", root_method="eigh", inverse_failure_threshold=1e-300)
    bridge = ServicePreconditioning(
        opt, client, update_steps=1, delay_steps=1, delay_timeout_s=300.0
    )
    held_before = opt.preconditioner_stats_steps()
    bridge.after_steps()  # Pushes the statistics of update 1, due at update 2.
    opt.iterations.assign_add(1)
    began = time.monotonic()
    bridge.after_steps()
    print(f"due roots settled {time.monotonic() - began:.2f} s after the wait began")

    assert bridge.failed_roots == len(held_before)
    assert opt.preconditioner_stats_steps() == held_before  # each block kept its root
