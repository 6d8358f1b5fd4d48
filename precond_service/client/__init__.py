"""What a trainer imports to use a preconditioner service: the client, sharding, local services.

`PreconditionerClient` pushes statistics and pulls roots for one service,
`ShardedClient` spreads keys over several, `local_service` starts, supervises and
stops a `python -m precond_service` child, and `fetch_status` asks a service for its
figures. Imports only `precond_service.common` and the generated protos; never the
server or the workers.
"""

from precond_service.client.core import PermanentServiceError
from precond_service.client.process import ServiceChild, local_service, parse_cpus, start_service
from precond_service.client.service_client import (
    ClientStatus,
    PreconditionerClient,
    wait_for_serving,
)
from precond_service.client.service_status import fetch_status
from precond_service.client.sharding import Client, ShardedClient, parse_addresses

__all__ = [
    "Client",
    "ClientStatus",
    "PermanentServiceError",
    "PreconditionerClient",
    "ServiceChild",
    "ShardedClient",
    "fetch_status",
    "local_service",
    "parse_addresses",
    "parse_cpus",
    "start_service",
    "wait_for_serving",
]
