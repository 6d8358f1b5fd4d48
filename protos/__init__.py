"""The precond.v1 wire contract (`precond_service.proto`) and the code generated from it.

Regenerate with `protos/generate.sh` after editing the .proto.
"""
