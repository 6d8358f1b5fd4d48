"""Moved to `precond_service.process`; this shim goes once trainer/train.py and
tests/test_service_bridge.py import that module instead."""

from precond_service.process import ServiceChild, local_service, wait_for_port  # noqa: F401
