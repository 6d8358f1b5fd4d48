"""Prints a running service's status: `python -m precond_service.status --address=HOST:PORT`.

A table by default, or the `ServiceStatus` message as JSON with `--json`. Exits 1 if
the service cannot be reached. Runs are shown by digest (`auth.run_digest`), never by
run_id, which is what grants access to a run's roots; `--run_id=ID` lists only that
run and prints its digest. `--drop_run_digest=DIGEST` drops the run with that
digest instead (the service must have a token, and it is needed). `--tls_ca` (with
`--tls_cert` and `--tls_key` for a service that requires client certificates) talks to
a TLS service.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import grpc
from google.protobuf import message as proto_message

from precond_service.client.service_status import fetch_status
from precond_service.common.auth import TOKEN_ENV, TlsConfig, open_channel, read_token, run_digest
from protos import precond_service_pb2 as pb
from protos import precond_service_pb2_grpc as pb_grpc

_RUN_COLUMNS = (
    ("run_digest", "run (sha256)"),
    ("blocks_known", "blocks"),
    ("blocks_published", "with root"),
    ("pending", "pending"),
    ("received", "received"),
    ("rejected", "rejected"),
    ("coalesced", "coalesced"),
    ("published", "published"),
    ("failed", "failed"),
    ("latest_step", "latest step"),
    ("max_staleness_steps", "max staleness"),
)


def drop_run_by_digest(
    address: str,
    digest: str,
    *,
    token: str | None = None,
    tls: TlsConfig | None = None,
    timeout_s: float = 5.0,
) -> pb.DropRunReply:
    """Asks a service (one with a token) to drop the run whose digest its status shows.

    Args:
        address: "host:port".
        digest: The run's digest (12 hex digits).
        token: The service's token.
        tls: TLS settings if the service serves TLS; None for plaintext.
        timeout_s: Deadline of the RPC.

    Returns:
        The reply: whether a run was dropped, and how many blocks it released.

    Raises:
        grpc.RpcError: If the service cannot be reached or refuses.
    """
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with open_channel(address, (), tls) as channel:
        stub = pb_grpc.PreconditionerServiceStub(channel)
        return stub.DropRun(
            pb.DropRunRequest(run_digest=digest), timeout=timeout_s, metadata=metadata
        )


def to_dict(message: proto_message.Message) -> dict[str, Any]:
    """Converts a message to plain Python values, every field included (zeros too).

    Args:
        message: The message.

    Returns:
        field name -> value; nested messages become dicts, repeated fields lists.
    """
    result = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if isinstance(value, proto_message.Message):
            result[field.name] = to_dict(value)
        elif isinstance(value, str | bytes | int | float):
            result[field.name] = value
        else:  # A repeated field.
            result[field.name] = [
                to_dict(v) if isinstance(v, proto_message.Message) else v for v in value
            ]
    return result


def format_table(status: pb.ServiceStatus) -> str:
    """Formats a status as a human-readable table.

    Args:
        status: The status.

    Returns:
        Lines of text.
    """
    lines = [
        f"incarnation      {status.incarnation}",
        f"uptime           {status.uptime_seconds:.0f} s",
        f"workers          {status.workers_alive}/{status.workers} alive, "
        f"{status.worker_restarts} restarted, pids {list(status.worker_pids)}",
        f"method           {status.method}, max matrix side {status.max_matrix_size}",
        f"queue            {status.queue_depth} pending, {status.in_flight} computing",
        f"blocks known     {status.blocks_known}",
        f"statistics       {status.received} received, {status.accepted} accepted, "
        f"{status.rejected} rejected, {status.coalesced} coalesced",
        f"roots            {status.published} published, {status.failed} failed, "
        f"{status.mean_compute_seconds:.3f} s mean compute (last jobs: p50 "
        f"{status.compute_seconds_p50:.3f} s, p95 {status.compute_seconds_p95:.3f} s)",
    ]
    if status.runs:
        rows = [[title for _, title in _RUN_COLUMNS]]
        rows += [[str(getattr(run, field)) for field, _ in _RUN_COLUMNS] for run in status.runs]
        widths = [max(len(row[i]) for row in rows) for i in range(len(_RUN_COLUMNS))]
        lines.append("")
        for row in rows:
            lines.append(
                "  ".join(
                    cell.rjust(w) if i else cell.ljust(w)
                    for i, (cell, w) in enumerate(zip(row, widths, strict=True))
                )
            )
    else:
        lines.append("no runs")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Prints the status of the service at --address.

    Args:
        argv: Arguments without the program name; None means sys.argv[1:].

    Returns:
        0, or 1 if the service could not be asked.
    """
    parser = argparse.ArgumentParser(
        prog="python -m precond_service.status", description="Prints a service's status."
    )
    parser.add_argument("--address", required=True, help="host:port of the service")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--run_id", default="", help="list only this run (shown by digest)")
    parser.add_argument("--token_file", help=f"file holding the token (or set ${TOKEN_ENV})")
    parser.add_argument("--tls_ca", help="PEM CA of a TLS service's certificate")
    parser.add_argument("--tls_cert", help="PEM client certificate, if the service requires one")
    parser.add_argument("--tls_key", help="PEM private key of --tls_cert")
    parser.add_argument("--timeout_s", type=float, default=5.0, help="RPC deadline")
    parser.add_argument(
        "--drop_run_digest", help="drop the run with this digest instead (needs the token)"
    )
    args = parser.parse_args(argv)
    if (args.tls_cert or args.tls_key) and not args.tls_ca:
        parser.error("--tls_cert and --tls_key need --tls_ca (the CA of the service's certificate)")
    token = read_token(args.token_file)
    try:
        tls = (
            TlsConfig(args.tls_ca, args.tls_cert or "", args.tls_key or "") if args.tls_ca else None
        )
    except ValueError as e:
        print(f"could not read the TLS files: {e}", file=sys.stderr)
        return 1
    if args.drop_run_digest:
        return _drop(args, token, tls)
    try:
        status = fetch_status(
            args.address, run_id=args.run_id, token=token, tls=tls, timeout_s=args.timeout_s
        )
    except grpc.RpcError as e:
        print(
            f"could not get the status of {args.address}: {e.code().name}: {e.details()}",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(to_dict(status), indent=2, sort_keys=True))
    else:
        print(format_table(status))
        if args.run_id:
            print(f"(--run_id has digest {run_digest(args.run_id)})")
    return 0


def _drop(args: argparse.Namespace, token: str | None, tls: TlsConfig | None) -> int:
    """Drops the run --drop_run_digest names; prints what was released."""
    try:
        reply = drop_run_by_digest(
            args.address, args.drop_run_digest, token=token, tls=tls, timeout_s=args.timeout_s
        )
    except grpc.RpcError as e:
        print(
            f"could not drop run {args.drop_run_digest} at {args.address}: "
            f"{e.code().name}: {e.details()}",
            file=sys.stderr,
        )
        return 1
    if reply.dropped:
        print(f"dropped run {args.drop_run_digest}: {reply.blocks_released} blocks released")
    else:
        print(f"no run {args.drop_run_digest} at {args.address}: nothing dropped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
