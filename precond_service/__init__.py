"""The preconditioner service: Shampoo inverse roots computed on CPU, outside the trainer.

Read top-down: `blocks` (the records exchanged), `wire` (their messages), `client`
(what the trainer uses), `server` (gRPC, health, shutdown) over `service` (the plain
object that validates with `validation`, queues with `scheduler`, computes with `pool`
and `worker`, which call `roots`, and publishes to `store`). `python -m precond_service`
runs it; `python -m precond_service.status` asks it how it is doing. No TensorFlow here.
"""
