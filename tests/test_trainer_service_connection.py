"""Resetting the run at the service at start: retried, and a failure says what it risks."""

from __future__ import annotations

import logging
import socket

from precond_service.client import PreconditionerClient
from precond_service.process import local_service
from trainer.service_connection import drop_earlier_roots


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_failed_reset_is_retried_then_warns_what_the_run_risks(caplog):
    client = PreconditionerClient(f"127.0.0.1:{_closed_port()}", "run-a")
    with caplog.at_level(logging.INFO, "trainer.service_connection"):
        assert not drop_earlier_roots(client, step=7, attempts=3, backoff_s=0.01)
    tries = [r for r in caplog.records if r.levelno == logging.INFO and "failed (try" in r.message]
    assert [r.message.split("(try ")[1][:6] for r in tries] == ["1 of 3", "2 of 3", "3 of 3"]
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "after 3 attempts" in warning.message
    assert "statistics after update 7 may be installed" in warning.message


def test_reset_succeeds_at_once_against_a_real_service(caplog):
    with local_service() as address:
        client = PreconditionerClient(address, "run-b")
        with caplog.at_level(logging.INFO, "trainer.service_connection"):
            assert drop_earlier_roots(client, step=0, attempts=3, backoff_s=0.01)
    assert not [r for r in caplog.records if "failed (try" in r.message]
