"""Runs expire, and an operator drops a run by its digest (issue 14, "run lifecycle").

Real servers on loopback: in-process (`start_service`) with a short `run_ttl_s`, and a
`python -m precond_service` process with a token for the operator's command.
"""

from __future__ import annotations

import pathlib

import grpc
import numpy as np
import pytest

from precond_service import status as status_command
from precond_service.client.process import start_service as start_service_process
from precond_service.client.service_client import PreconditionerClient
from precond_service.common.auth import TOKEN_ENV, run_digest
from precond_service.common.blocks import StatisticsBlock
from precond_service.status import drop_run_by_digest, fetch_status
from protos import precond_service_pb2 as pb
from tests.conftest import wait_until

TOKEN = "operator-secret-0123456789abcdef"


def push_one(address: str, run_id: str, token: str | None = None) -> None:
    """Pushes one statistic for `run_id` and waits for its root."""
    with PreconditionerClient(address, run_id, token=token, pull_interval_s=0.05) as client:
        client.push([StatisticsBlock("k", 1, 2, np.eye(3))])
        assert wait_until(lambda: "k" in client.latest(), 30)


def run_digests(address: str, token: str | None = None) -> list[str]:
    return [run.run_digest for run in fetch_status(address, token=token, timeout_s=30).runs]


def test_idle_runs_expire_and_active_ones_stay(start_service) -> None:
    # Long enough that the active client's pulls (every 0.05 s) never leave such a gap,
    # even on a loaded machine.
    server = start_service(workers=1, run_ttl_s=3.0)
    push_one(server.address, "idle")
    with PreconditionerClient(server.address, "active", pull_interval_s=0.05) as client:
        client.push([StatisticsBlock("k", 1, 2, np.eye(3))])
        assert wait_until(lambda: "k" in client.latest(), 30)
        # The idle run goes; the active one pulls every 0.05 s and stays.
        assert wait_until(lambda: run_digests(server.address) == [run_digest("active")], 30)
        began = client.status().pulls
        assert wait_until(lambda: client.status().pulls >= began + 20, 30)
        assert run_digests(server.address) == [run_digest("active")]
    assert wait_until(lambda: run_digests(server.address) == [], 30)
    assert fetch_status(server.address, timeout_s=30).blocks_known == 0


def test_operator_drops_a_run_by_digest_with_the_token(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    flags = ["--workers=1", f"--token_file={token_file}"]
    with start_service_process(flags, log_path=tmp_path / "service.log") as service:
        push_one(service.address, "stranger's run", token=TOKEN)
        digest = run_digest("stranger's run")
        assert run_digests(service.address, TOKEN) == [digest]
        with pytest.raises(grpc.RpcError) as error:
            drop_run_by_digest(service.address, digest, token="wrong", timeout_s=30)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as error:
            drop_run_by_digest(service.address, "not-a-digest", token=TOKEN, timeout_s=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "12 lowercase hex digits" in error.value.details()

        monkeypatch.delenv(TOKEN_ENV, raising=False)
        argv = [f"--address={service.address}", f"--token_file={token_file}"]
        assert status_command.main([*argv, f"--drop_run_digest={digest}"]) == 0
        assert f"dropped run {digest}: 1 blocks released" in capsys.readouterr().out
        assert run_digests(service.address, TOKEN) == []
        assert status_command.main([*argv, f"--drop_run_digest={digest}"]) == 0
        assert "nothing dropped" in capsys.readouterr().out


def test_drop_by_digest_is_refused_without_a_token_and_with_a_run_id(start_service) -> None:
    server = start_service(workers=1)
    push_one(server.address, "run")
    with grpc.insecure_channel(server.address) as channel:
        drop = channel.unary_unary(
            "/precond.v1.PreconditionerService/DropRun",
            request_serializer=pb.DropRunRequest.SerializeToString,
            response_deserializer=pb.DropRunReply.FromString,
        )
        with pytest.raises(grpc.RpcError) as error:
            drop(pb.DropRunRequest(run_digest=run_digest("run")), timeout=30)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "--token_file" in error.value.details()
        with pytest.raises(grpc.RpcError) as error:
            drop(pb.DropRunRequest(run_id="run", run_digest=run_digest("run")), timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert run_digests(server.address) == [run_digest("run")]
