"""What a trainer imports to use a preconditioner service: the client, sharding, local services.

`service_client.PreconditionerClient` pushes statistics and pulls roots for one service,
`sharding.ShardedClient` spreads keys over several, and `process` starts, supervises and
stops `python -m precond_service` children. Imports only `precond_service.common` and the
generated protos; never the server or the workers.
"""
