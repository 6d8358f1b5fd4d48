"""The preconditioner service: Shampoo's inverse roots and eigenbases, computed on CPU.

Four subpackages, by audience; their import lines show who may use what:
- `common`: TensorFlow-free records and numerics every side shares: `blocks` (the records
  exchanged), `wire` (their messages), `versions`, `root_settings`, `limits`, `roots` and
  `eigenbasis` (the float64 solvers), `auth`, `events`. It imports none of the others.
- `client`: what a trainer imports: `service_client`, `sharding`, `process` (starting a
  local service). Imports `common` only.
- `server`: gRPC, health and shutdown (`server`) over `service` (the plain object that
  validates with `validation`, queues with `scheduler`, computes with `pool` and publishes
  to `store`). Imports `common` and the worker protocol, never the client.
- `worker`: `python -m precond_service.worker`, one worker process computing roots.

`python -m precond_service` runs the service; `python -m precond_service.status` asks it
how it is doing. No TensorFlow here.
"""
