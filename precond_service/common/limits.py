"""The service's default limits, which a client sizing a service child compares against.

`precond_service.server.service_records.ServiceConfig` takes its defaults from here, so
that a trainer can size the service it starts without importing the server.
"""

# Flag name -> default of `python -m precond_service`.
SERVICE_DEFAULTS = {
    "max_blocks": 65536,
    "max_blocks_per_run": 32768,
    "max_blocks_per_request": 32768,
    "memory_budget_mb": 4096,
}
