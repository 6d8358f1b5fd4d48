"""Async Shampoo in `model.fit` (trainer/optimizers/fit_service.py): it opens and closes itself."""

from __future__ import annotations

import signal

import keras
import numpy as np
import pytest

from precond_service.client import wait_for_serving
from trainer.optimizers import Shampoo


def _model_and_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype(np.float32)
    y = (x @ rng.normal(size=(8, 2))).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])
    return model, x, y


def _async_shampoo() -> Shampoo:
    return Shampoo(
        1e-2,
        precondition_mode="async",
        start_preconditioning_step=2,
        preconditioning_compute_steps=2,
    )


class _InterruptAt(keras.callbacks.Callback):
    """Sends this process SIGINT after batch `batch`, as Ctrl-C would."""

    def __init__(self, batch: int):
        super().__init__()
        self.batch = batch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if batch == self.batch:
            signal.raise_signal(signal.SIGINT)


def test_fit_opens_the_service_and_closes_it_at_train_end() -> None:
    model, x, y = _model_and_data()
    optimizer = _async_shampoo()
    model.compile(optimizer=optimizer, loss="mse", jit_compile=False)
    callback = optimizer.service_callback()
    history = model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[callback])
    assert optimizer.built and "staleness_mean" in history.history
    assert callback.staleness is not None
    assert not callback.session.is_open
    assert not wait_for_serving(callback.session.address, timeout_s=0.5)


def test_ctrl_c_during_fit_closes_client_and_service() -> None:
    model, x, y = _model_and_data()
    optimizer = _async_shampoo()
    model.compile(optimizer=optimizer, loss="mse", jit_compile=False)
    callback = optimizer.service_callback()
    # Ctrl-C raises KeyboardInterrupt, also where the suite was started as a background
    # job of a script (which starts its children with SIGINT ignored).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = signal.getsignal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            model.fit(
                x, y, batch_size=32, epochs=2, verbose=0, callbacks=[callback, _InterruptAt(3)]
            )
        assert callback.wait_closed(30.0)
        assert not wait_for_serving(callback.session.address, timeout_s=0.5)
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_service_callback_needs_async_mode_and_config_keeps_no_token() -> None:
    with pytest.raises(ValueError, match="precondition_mode='async'"):
        Shampoo(precondition_mode="sync").service_callback()
    optimizer = Shampoo(
        precondition_mode="async", service_address="127.0.0.1:1", service_token="secret"
    )
    config = optimizer.get_config()
    assert config["service_address"] == "127.0.0.1:1" and config["service_tls"] is None
    assert "secret" not in repr(config)
    assert Shampoo.from_config(config).service_address == "127.0.0.1:1"
    tls = {"ca_file": "/nowhere/ca.pem", "cert_file": "", "key_file": ""}
    # TLS settings travel as file names; no file is read until training begins.
    assert Shampoo(precondition_mode="async", service_tls=tls).get_config()["service_tls"] == tls
