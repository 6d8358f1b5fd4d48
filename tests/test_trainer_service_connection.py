"""The run at the service: reset at start (retried; a service that cannot be reached or
refuses the trainer stops it), released at a clean exit of a trainer on a shared service.
"""

from __future__ import annotations

import contextlib
import logging

import pytest

from precond_service.client.process import local_service
from precond_service.client.service_client import PermanentServiceError, PreconditionerClient
from precond_service.common.auth import run_digest
from precond_service.status import fetch_status
from tests.conftest import free_port, wait_until
from tests.test_trainer import make_trainer, tiny_config
from trainer.service_connection import ServiceUnreachableError, drop_earlier_roots


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory):
    """One SentencePiece model shared by the module's runs (trained by the first)."""
    return str(tmp_path_factory.mktemp("vocab") / "spm.model")


def test_failed_reset_is_retried_then_stops_naming_the_address(caplog):
    address = f"127.0.0.1:{free_port()}"
    client = PreconditionerClient(address, "run-a")
    with (
        caplog.at_level(logging.INFO, "trainer.service_connection"),
        pytest.raises(ServiceUnreachableError, match="config.precond.address") as raised,
    ):
        drop_earlier_roots(client, step=7, attempts=3, backoff_s=0.01)
    tries = [r for r in caplog.records if r.levelno == logging.INFO and "failed (try" in r.message]
    assert [r.message.split("(try ")[1][:6] for r in tries] == ["1 of 3", "2 of 3", "3 of 3"]
    assert f"at {address} " in str(raised.value) and "in 3 tries" in str(raised.value)


def test_a_refused_token_is_not_retried(caplog, start_service):
    server = start_service(token="the-right-token")
    client = PreconditionerClient(server.address, "run-c", token="a-wrong-token")
    with (
        caplog.at_level(logging.INFO, "trainer.service_connection"),
        pytest.raises(PermanentServiceError, match="UNAUTHENTICATED.*precond.token_file"),
    ):
        drop_earlier_roots(client, step=0, attempts=3, backoff_s=0.01)
    assert not [r for r in caplog.records if "failed (try" in r.message]


def test_reset_succeeds_at_once_against_a_real_service(caplog):
    with local_service() as address:
        client = PreconditionerClient(address, "run-b")
        with caplog.at_level(logging.INFO, "trainer.service_connection"):
            drop_earlier_roots(client, step=0, attempts=3, backoff_s=0.01)
    assert not [r for r in caplog.records if "failed (try" in r.message]


def _async_config(vocab_path: str, address: str):
    config = tiny_config(vocab_path, "shampoo", "async")
    config.train.update(num_steps=4, steps_per_loop=2, checkpoint_every_steps=4)
    config.precond.update(address=address, update_steps=2, pull_interval_s=0.05)
    return config


def test_a_shared_service_forgets_the_run_at_a_clean_exit_only(tmp_path, vocab_path):
    with local_service() as address:
        for name, fails in (("crashed", True), ("clean", False)):
            trainer = make_trainer(_async_config(vocab_path, address), tmp_path / name)
            with contextlib.suppress(RuntimeError), trainer.preconditioning() as bridge:
                trainer.run_steps(bridge, 2)
                assert bridge.wait_pushed()
                run = run_digest(bridge.client.run_id)
                assert wait_until(lambda: run in run_digests(address), 60)  # noqa: B023
                if fails:
                    raise RuntimeError("the run failed")
            assert (run in run_digests(address)) is fails, name


def run_digests(address: str) -> list[str]:
    return [run.run_digest for run in fetch_status(address, timeout_s=30).runs]
