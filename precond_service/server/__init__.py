"""The service itself: gRPC handlers, validation, limits, scheduling, the store, the worker pool.

Run it with `python -m precond_service`. Clients never import this package; it imports
`precond_service.common` and the worker package's protocol, never the client.
"""
