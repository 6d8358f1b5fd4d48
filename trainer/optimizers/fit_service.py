"""Async Shampoo in `model.fit`: the optimizer's own service connection, and its callback.

    optimizer = Shampoo(1e-3, precondition_mode="async")  # or service_address="host:port"
    model.compile(optimizer=optimizer, loss="mse", jit_compile=False)
    model.fit(x, y, callbacks=[optimizer.service_callback()])

`Shampoo.service_callback()` returns a `ShampooFitCallback`, which opens the
optimizer's `ServiceSession` when training begins: it builds the optimizer on the
model's trainable variables if it is not built yet, starts a local service child
unless `service_address` names a service, connects a client under a random run id
and drives a `ServicePreconditioning` bridge after every batch (pushing every
`preconditioning_compute_steps` updates). The session closes (bridge, client, then
the child) when training ends, at interpreter exit, and on Ctrl-C: a SIGINT during
`fit` closes it on a thread of its own while the KeyboardInterrupt propagates.
Each epoch's logs get the roots' staleness (`staleness_mean`, `staleness_max`,
`preconditioned_fraction`), which also land in `model.fit`'s History.

A custom training loop uses `ServicePreconditioning` directly (see service_bridge.py).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import secrets
import signal
import threading
from typing import Any

import keras

from precond_service.client import (
    Client,
    PreconditionerClient,
    ShardedClient,
    local_service,
    parse_addresses,
)
from precond_service.common.auth import TlsConfig, read_token
from trainer.optimizers.service_bridge import ServicePreconditioning
from trainer.optimizers.shampoo import Shampoo
from trainer.optimizers.staleness import Staleness, staleness

log = logging.getLogger(__name__)

# Seconds between the client's pulls: a fit step takes milliseconds, so pull often.
PULL_INTERVAL_S = 0.2


def tls_config(tls: TlsConfig | dict[str, str] | None) -> TlsConfig | None:
    """`Shampoo(service_tls=...)` as a TlsConfig: one already, its fields as a dict, or None."""
    if tls is None or isinstance(tls, TlsConfig):
        return tls
    if isinstance(tls, dict):
        return TlsConfig(**tls)
    raise TypeError(f"service_tls must be a TlsConfig, a dict of its fields or None, got {tls!r}")


def tls_fields(tls: TlsConfig | dict[str, str] | None) -> dict[str, str] | None:
    """The file names of `tls` (what `Shampoo.get_config` keeps; no file is read), or None."""
    if tls is None or isinstance(tls, dict):
        return tls
    return {"ca_file": tls.ca_file, "cert_file": tls.cert_file, "key_file": tls.key_file}


class ServiceSession:
    """What an async Shampoo optimizer owns in `model.fit`: a service child, a client, a bridge.

    Args:
        optimizer: A Shampoo optimizer with `precondition_mode="async"`.
        workers: Worker processes of a service child the session starts itself.

    Raises:
        ValueError: The optimizer is not in async mode, or its `service_address`
            is not a list of "host:port".
    """

    def __init__(self, optimizer: Shampoo, workers: int = 1) -> None:
        if optimizer.precondition_mode != "async":
            raise ValueError(
                "service_callback() needs Shampoo(precondition_mode='async'), got "
                f"precondition_mode={optimizer.precondition_mode!r}; the sync mode needs no "
                "callback"
            )
        self.optimizer = optimizer
        self.workers = workers
        self.addresses = (
            parse_addresses(optimizer.service_address) if optimizer.service_address else []
        )
        self.bridge: ServicePreconditioning | None = None
        # The service(s) of the last `open`, comma-separated.
        self.address: str | None = None
        self._stack: contextlib.ExitStack | None = None
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        """Whether a service connection is open now."""
        return self.bridge is not None

    def open(self, model: keras.Model) -> ServicePreconditioning:
        """Builds the optimizer if needed and connects it to its service; idempotent.

        Args:
            model: The model being fitted (its trainable variables build the optimizer).

        Returns:
            The bridge to drive after every batch.

        Raises:
            RuntimeError: A service child did not start (its log's end is in the message).
        """
        with self._lock:
            if self.bridge is not None:
                return self.bridge
            if not self.optimizer.built:
                self.optimizer.build(model.trainable_variables)
            with contextlib.ExitStack() as stack:
                addresses = self.addresses or [
                    stack.enter_context(local_service(workers=self.workers))
                ]
                client = self._connect(addresses)
                stack.callback(client.close)
                self.bridge = stack.enter_context(
                    ServicePreconditioning(
                        self.optimizer, client, self.optimizer.preconditioning_compute_steps
                    )
                )
                self._stack = stack.pop_all()
            self.address = ",".join(addresses)
            atexit.register(self.close)
            log.info("async Shampoo in fit: service %s", self.address)
            return self.bridge

    def _connect(self, addresses: list[str]) -> Client:
        """A started client of the service(s) under a fresh random run id."""
        run_id = f"fit-{os.uname().nodename}-{secrets.token_hex(16)}"
        token = self.optimizer.service_token or read_token(None)
        options: dict[str, Any] = dict(
            token=token,
            tls=tls_config(self.optimizer.service_tls),
            pull_interval_s=PULL_INTERVAL_S,
        )
        client = (
            PreconditionerClient(addresses[0], run_id, **options)
            if len(addresses) == 1
            else ShardedClient(addresses, run_id, **options)
        )
        client.start()
        return client

    def close(self) -> None:
        """Stops the bridge's thread, the client, then the service child; idempotent."""
        with self._lock:
            stack, self._stack, self.bridge = self._stack, None, None
        if stack is not None:
            stack.close()
        atexit.unregister(self.close)


def session_of(optimizer: Shampoo) -> ServiceSession:
    """The optimizer's service session, made at the first call."""
    session = getattr(optimizer, "_fit_service_session", None)
    if session is None:
        session = ServiceSession(optimizer)
        optimizer._fit_service_session = session
    return session


class ShampooFitCallback(keras.callbacks.Callback):
    """Runs an async Shampoo optimizer's service session through `model.fit`.

    Attributes:
        session: The optimizer's `ServiceSession`.
        staleness: How old the roots in use were at the last epoch's end (None before).
    """

    def __init__(self, optimizer: Shampoo):
        super().__init__()
        self.session = session_of(optimizer)
        self.staleness: Staleness | None = None
        self._previous_sigint: Any = None
        self._closer: threading.Thread | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.session.open(self.model)
        self._catch_sigint()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.session.bridge.after_steps()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.staleness = staleness(self.session.optimizer)
        if logs is not None:
            logs.update(
                staleness_mean=self.staleness.mean,
                staleness_max=self.staleness.max,
                preconditioned_fraction=self.staleness.fraction_preconditioned,
            )
        log.info(
            "epoch %d: %.0f%% of the block factors preconditioned%s",
            epoch + 1,
            100 * self.staleness.fraction_preconditioned,
            ""
            if math.isnan(self.staleness.mean)
            else f", roots {self.staleness.mean:.0f} steps old on average "
            f"(at most {self.staleness.max:.0f})",
        )

    def on_train_end(self, logs: dict | None = None) -> None:
        self._release_sigint()
        self.session.close()

    def wait_closed(self, timeout_s: float = 30.0) -> bool:
        """After a Ctrl-C: waits for the session to close; returns whether it did."""
        if self._closer is not None:
            self._closer.join(timeout_s)
        return not self.session.is_open

    def _catch_sigint(self) -> None:
        """Closes the session on SIGINT too, where Python raises KeyboardInterrupt for it."""
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGINT)
        if not callable(previous):  # SIG_IGN, SIG_DFL: no KeyboardInterrupt comes
            return
        self._previous_sigint = previous
        signal.signal(signal.SIGINT, self._interrupted)

    def _release_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def _interrupted(self, signum: int, frame: Any) -> None:
        # The training thread may hold a lock that closing needs, so a thread of its
        # own closes the session (not a daemon: the interpreter waits for it at exit).
        previous = self._previous_sigint
        self._release_sigint()
        self._closer = threading.Thread(target=self.session.close, name="precond-fit-close")
        self._closer.start()
        previous(signum, frame)
