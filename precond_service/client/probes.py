"""What tools that start or watch services from outside share (tests, scripts).

Resident memory of a process and its descendants, read from /proc (Linux); gRPC
channels that each have a connection of their own, so that each is one peer to the
service, as a client in another process is; and loopback ports free to bind.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket

import grpc

# Message size limit of `own_channel`: room for the largest matrix the service accepts.
_CHANNEL_MESSAGE_BYTES = 256 << 20


def descendants(pid: int) -> list[int]:
    """Process ids of the children of `pid`, their children, and so on."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = pathlib.Path(f"/proc/{entry}/stat").read_text()
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def rss_bytes(pid: int) -> int:
    """Resident memory of one process (VmRSS).

    Raises:
        OSError: If the process is gone.
        ValueError: If its status has no VmRSS (a zombie).
    """
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for process {pid}")


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants; those gone count 0."""
    total = 0
    for member in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError, ValueError):
            total += rss_bytes(member)
    return total


def own_channel(address: str) -> grpc.Channel:
    """An insecure channel with a connection of its own and large message limits.

    Channels of one process otherwise share one connection, and so are one peer.
    """
    return grpc.insecure_channel(
        address,
        options=[
            ("grpc.max_send_message_length", _CHANNEL_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", _CHANNEL_MESSAGE_BYTES),
            ("grpc.use_local_subchannel_pool", 1),
        ],
    )


def free_ports(count: int = 1) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago (all bound at once)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
