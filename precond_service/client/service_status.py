"""Asks a service for its status (the GetStatus RPC): what a trainer reports of it."""

from __future__ import annotations

from precond_service.common.auth import TlsConfig, open_channel
from protos import precond_service_pb2 as pb
from protos import precond_service_pb2_grpc as pb_grpc

__all__ = ["fetch_status"]


def fetch_status(
    address: str,
    *,
    run_id: str = "",
    token: str | None = None,
    tls: TlsConfig | None = None,
    timeout_s: float = 5.0,
) -> pb.ServiceStatus:
    """Asks a service for its status.

    Args:
        address: "host:port".
        run_id: When set, only this run is listed.
        token: Shared secret if the service has one.
        tls: TLS settings if the service serves TLS; None for plaintext.
        timeout_s: Deadline of the RPC.

    Returns:
        The status message.

    Raises:
        grpc.RpcError: If the service cannot be reached or refuses.
    """
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with open_channel(address, (), tls) as channel:
        stub = pb_grpc.PreconditionerServiceStub(channel)
        return stub.GetStatus(pb.StatusRequest(run_id=run_id), timeout=timeout_s, metadata=metadata)
