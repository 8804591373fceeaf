"""Starting a service on a free TCP port without losing a race for it.

The OS can only say which port is free *now*; the service binds it later, and anything that
starts in between (another test's server, Ray's own processes) may take it first. Every place
the project starts a service goes through ``start_on_free_port``: it offers a port, lets the
service bind it, and when the service reports the port taken, starts it again on a fresh one.
"""

from __future__ import annotations

import re
import socket
import sys
from collections.abc import Callable
from typing import TypeVar

HOST = "127.0.0.1"
ATTEMPTS = 8
Service = TypeVar("Service")

# How a bind that lost the race reads: Python's OSError (errno 98 on Linux, 48 on macOS),
# aiohttp / uvicorn / werkzeug / gRPC messages, Ray's own pre-check ("already occupied").
_ADDRESS_IN_USE = re.compile(
    r"address already in use|errno:? ?(?:98|48)\b|EADDRINUSE|already occupied", re.IGNORECASE
)


class PortTaken(RuntimeError):
    """A service could not bind the port it was given: another process holds it."""


def offered_port(host: str = HOST) -> int:
    """A port the OS says is free on ``host`` now (it may be taken before it is used)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def says_address_in_use(text: str) -> bool:
    """Does an error message or a server log say that a bind found its port taken?"""
    return bool(_ADDRESS_IN_USE.search(text))


def lost_port_race(error: BaseException) -> bool:
    """Did ``error`` (or an error it wraps) come from a bind on a taken port?"""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, PortTaken):
            return True
        if isinstance(error, OSError) and error.errno in (48, 98):
            return True
        if says_address_in_use(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def retry_when_port_taken(
    start: Callable[[], Service], what: str, attempts: int = ATTEMPTS
) -> Service:
    """``start()`` (which picks its ports with ``offered_port``); when it fails because
    another process bound one of them first, again (``attempts`` in all), so fresh ports are
    offered. Any other error, or the last attempt's, propagates. ``start`` must leave
    nothing running when it raises."""
    for attempt in range(1, attempts + 1):
        try:
            return start()
        except Exception as error:
            if attempt == attempts or not lost_port_race(error):
                raise
            print(
                f"[ports] {what}: a port was taken before it could bind it; "
                f"retrying on fresh ports ({attempt}/{attempts})",
                file=sys.stderr,
                flush=True,
            )
    raise AssertionError("unreachable")


def start_on_free_port(
    start: Callable[[int], Service], what: str, attempts: int = ATTEMPTS, host: str = HOST
) -> Service:
    """``start(port)`` on a port the OS offers, with ``retry_when_port_taken``."""
    return retry_when_port_taken(lambda: start(offered_port(host)), what, attempts)


def rendezvous_store():
    """A ``torch.distributed`` rendezvous store for processes this one starts, listening on a
    port it binds itself (port 0): hand ``store.port`` to each, which joins with
    ``join_process_group``. Keep the store alive until they are done."""
    import torch.distributed as dist

    return dist.TCPStore(HOST, 0, is_master=True, wait_for_workers=False)


def join_process_group(port: int, rank: int, world_size: int, backend: str = "gloo") -> None:
    """Join the process group whose store ``rendezvous_store`` opened on ``port``."""
    import torch.distributed as dist

    store = dist.TCPStore(HOST, port, is_master=False)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
