"""Faults of the preconditioner service under a real trainer, with real processes and signals.

A real `trainer.train.Trainer` on a tiny numbers task in async mode against a service
that is killed and restarted (by the trainer's own supervisor, or by the test on its
port), or stopped (SIGSTOP) for a while: training never stops or raises, the roots in
use grow stale while the service is gone, and fresh roots are installed again once it
is back. A service absent from the start stops the trainer, naming the address. The
supervisor alone is tested in test_process.py.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator

import ml_collections
import numpy as np
import pytest

from precond_service.client.process import ServiceProcess, start_service
from tests.conftest import free_port, service_children, signal_tree
from trainer import train
from trainer.config import default_config
from trainer.optimizers.service_bridge import ServicePreconditioning, Staleness, staleness
from trainer.service_connection import DROP_ATTEMPTS, DROP_TIMEOUT_S, ServiceUnreachableError

# A chunk of training between two looks at the staleness: one inner loop.
CHUNK = 4
# Statistics are pushed every UPDATE steps; with roots back within a chunk the
# freshest root is at most a chunk and a push period old.
UPDATE = 2
FRESH = CHUNK + UPDATE


@pytest.fixture
def service_on_port(tmp_path) -> Iterator[Callable[[int], ServiceProcess]]:
    """Starts `python -m precond_service` on a given port (`service_on_port(port)`), SERVING.

    Every service started is stopped afterwards (continued first if it was stopped).
    """
    services: list[ServiceProcess] = []

    def start(port: int) -> ServiceProcess:
        service = start_service(port=port, log_path=tmp_path / "service.log")
        services.append(service)
        return service

    yield start
    for service in services:
        service.stop(timeout_s=30)


# ---------------------------------------------------------------- a real trainer


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory) -> str:
    """One SentencePiece model shared by the module's trainers (trained by the first)."""
    return str(tmp_path_factory.mktemp("vocab") / "spm.model")


def fault_config(
    vocab_path: str, address: str = "", num_steps: int = 100_000
) -> ml_collections.ConfigDict:
    """A tiny Transformer on the numbers task, async Shampoo pushing every 2 steps."""
    config = default_config()
    config.data.update(
        source="numbers",
        numbers_train_size=2000,
        numbers_eval_size=20,
        numbers_max=99_999,
        vocab_path=vocab_path,
        vocab_size=150,
        vocab_train_sentences=4000,
        max_length=32,
        max_eval_length=40,
        tokens_per_batch=256,
        shuffle_buffer=500,
        eval_batch_size=10,
        eval_bleu_examples=4,
    )
    config.model.update(
        num_layers=1, d_model=32, num_heads=2, d_ff=64, dropout=0.0, attention_dropout=0.0
    )
    config.model.max_length = 64
    config.decode.update(beam_size=1, max_extra_length=8)
    config.train.update(
        num_steps=num_steps,
        steps_per_loop=CHUNK,
        summary_every_steps=CHUNK,
        checkpoint_every_steps=1000,
        eval_every_steps=0,
        log_every_s=0.0,
    )
    config.optimizer.update(learning_rate=1e-3, warmup_steps=2)
    config.optimizer.shampoo.update(start_preconditioning_step=2, block_size=32)
    config.precond.update(mode="async", address=address, update_steps=UPDATE, pull_interval_s=0.1)
    return config


class Run:
    """Trains in chunks of one inner loop, recording wall time and staleness after each."""

    def __init__(self, trainer: train.Trainer, bridge: ServicePreconditioning) -> None:
        self.trainer = trainer
        self.bridge = bridge
        self.seconds: list[float] = []
        self.staleness: list[Staleness] = []

    @property
    def step(self) -> int:
        return int(self.trainer.step.numpy())

    def chunk(self) -> Staleness:
        """Trains CHUNK steps; returns the staleness after them."""
        began = time.monotonic()
        self.trainer.train(self.bridge, until_step=self.step + CHUNK)
        self.seconds.append(time.monotonic() - began)
        held = staleness(self.trainer.optimizer)
        self.staleness.append(held)
        return held

    def until(
        self, predicate: Callable[[Staleness], bool], timeout_s: float = 60.0
    ) -> list[Staleness]:
        """Trains chunks until `predicate(staleness)` holds; returns the staleness seen."""
        seen = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            seen.append(self.chunk())
            if predicate(seen[-1]):
                return seen
        raise AssertionError(
            f"not reached within {timeout_s:.0f} s (at step {self.step}); staleness seen: "
            f"{seen[-5:]}; client: {self.bridge.client.status()}"
        )

    def warm_up(self) -> None:
        """Trains until every block holds a fresh root (the first chunk traces the loop)."""
        self.until(fresh, 120)


def fresh(held: Staleness) -> bool:
    """Every block holds a root, none older than a chunk and a push period."""
    return held.fraction_preconditioned == 1.0 and held.max <= FRESH


@pytest.mark.parametrize("restarter", ["supervisor", "test"])
def test_service_killed_mid_training_then_restarted(
    tmp_path, vocab_path, service_on_port, restarter
):
    if restarter == "supervisor":  # the trainer's own child, restarted by local_service
        config = fault_config(vocab_path)
    else:  # a service at precond.address, restarted by the test on its port
        port = free_port()
        service = service_on_port(port)
        config = fault_config(vocab_path, address=f"127.0.0.1:{port}")
    trainer = train.Trainer(config, str(tmp_path / "work"))
    with trainer.preconditioning() as bridge:
        run = Run(trainer, bridge)
        run.warm_up()
        if restarter == "supervisor":
            [pid] = service_children()
        else:
            pid = service.pid
        assert bridge.client.status().restarts_seen == 0
        killed_at = run.step
        os.kill(pid, signal.SIGKILL)

        if restarter == "supervisor":
            # Down until the supervisor's restart serves: no root newer than the kill.
            down = run.until(lambda s: s.min < run.step - killed_at)[:-1]
        else:
            down = [run.chunk() for _ in range(8)]
            service_on_port(port)
        assert len(down) >= 2, "the service came back before a chunk of training ended"
        # Nothing new arrives while it is down: the freshest root ages with every step.
        mins = [s.min for s in down]
        assert mins == sorted(mins) and mins[-1] - mins[0] == CHUNK * (len(down) - 1)
        assert down[-1].min >= CHUNK * len(down)
        peak = max(s.max for s in down)

        # Back: the client notices the new incarnation, pushes again, fresh roots arrive.
        recovered = run.until(fresh)
        status = bridge.client.status()
        assert status.restarts_seen >= 1 and status.connected
        restarted_pids = service_children()
        assert recovered[-1].max < peak
        trainer.train(bridge, until_step=run.step + CHUNK)
        closing = time.monotonic()
    close_s = time.monotonic() - closing
    if restarter == "supervisor":
        # Restarted by the supervisor: one child serves now, and not the killed one.
        assert len(restarted_pids) == 1 and restarted_pids[0] != pid, restarted_pids
    print(
        f"{restarter}: peak staleness {peak:.0f} over {len(down) * CHUNK} steps down; "
        f"fresh again {len(recovered) * CHUNK} steps after the restart; chunk time "
        f"median {np.median(run.seconds[1:]):.2f} s, max {max(run.seconds[1:]):.2f} s; "
        f"closed in {close_s:.2f} s"
    )


def test_service_unreachable_from_the_start_stops_the_trainer_naming_the_address(
    tmp_path, vocab_path
):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    config = fault_config(vocab_path, address=address, num_steps=24)
    trainer = train.Trainer(config, str(tmp_path / "work"))
    began = time.monotonic()
    with pytest.raises(ServiceUnreachableError, match=r"config\.precond\.address"):
        trainer.train_and_evaluate()
    # Each try is refused at once by a closed port: the backoff, not the RPC deadlines.
    assert time.monotonic() - began < DROP_ATTEMPTS * DROP_TIMEOUT_S
    assert int(trainer.step.numpy()) == 0


def test_service_stopped_for_a_while_then_continued(tmp_path, vocab_path, service_on_port):
    port = free_port()
    service = service_on_port(port)
    config = fault_config(vocab_path, address=f"127.0.0.1:{port}")
    trainer = train.Trainer(config, str(tmp_path / "work"))
    with trainer.preconditioning() as bridge:
        run = Run(trainer, bridge)
        run.warm_up()
        for _ in range(4):
            run.chunk()
        normal_s = float(np.median(run.seconds[-4:]))

        signal_tree(service.pid, signal.SIGSTOP)
        before = bridge.client.status()
        stopped = [run.chunk() for _ in range(10)]
        stopped_s = run.seconds[-10:]
        # Ten chunks trained and pushed while no push could be answered: the
        # training loop never waited for one.
        during = bridge.client.status()
        signal_tree(service.pid, signal.SIGCONT)
        recovered = run.until(fresh)

        # Stopped again when the run ends: closing the client must not wait for it.
        signal_tree(service.pid, signal.SIGSTOP)
        run.chunk()
        closing = time.monotonic()
    close_s = time.monotonic() - closing
    signal_tree(service.pid, signal.SIGCONT)

    assert during.pushes_sent <= before.pushes_sent + 1  # one may have been on its way
    assert bridge.pushes >= 10
    # Steps went on, on roots that age by a chunk per chunk (one may have been in flight).
    mins = [s.min for s in stopped[1:]]
    assert mins == list(range(int(mins[0]), int(mins[0]) + CHUNK * len(mins), CHUNK)), mins
    assert stopped[-1].max >= CHUNK * 9
    assert fresh(recovered[-1])
    print(
        f"stopped: chunk {np.median(stopped_s):.2f} s (normal {normal_s:.2f} s), peak staleness "
        f"{stopped[-1].max:.0f}, fresh again {len(recovered) * CHUNK} steps after SIGCONT, "
        f"trainer closed in {close_s:.2f} s with the service stopped"
    )
