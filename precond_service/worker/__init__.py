"""The worker processes: `python -m precond_service.worker` computes roots in float64.

`protocol` holds the records the server's pool and a worker exchange. Imports only
`precond_service.common`.
"""
