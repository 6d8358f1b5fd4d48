"""What the trainer, the server and the workers share: TensorFlow-free records and numerics.

Imports nothing from the client, server or worker packages: the records that cross the
wire (`blocks`, `wire`), the one "newer than" rule (`versions`), the root settings each
statistic carries (`root_settings`), the service's default limits (`limits`), the float64
solvers (`roots` for inverse roots, `eigenbasis` for eigenbases), secrets and channels
(`auth`), and the event log (`events`).
"""
