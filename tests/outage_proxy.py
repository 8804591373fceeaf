"""A TCP proxy that stands for a server's endpoint and can make it go away: clients connect
to the proxy's port, the proxy relays to the server. ``trip_on(pattern, seconds)`` arms an
outage that begins when a client sends bytes containing ``pattern`` (that request never
reaches the server): every open connection is dropped and the port refuses connections for
``seconds``, then it listens again on the same port. The server behind it keeps its state,
which moto's in-memory S3 would lose if its process were stopped."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from components.platform.ports import HOST


@dataclass
class Outage:
    started: float
    ended: float | None = None
    trigger: bytes = b""

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started


@dataclass
class OutageProxy:
    target_port: int
    port: int = 0
    outages: list[Outage] = field(default_factory=list)
    sightings: dict[bytes, int] = field(default_factory=dict)
    _listener: socket.socket | None = field(default=None, init=False)
    _connections: set[socket.socket] = field(default_factory=set, init=False)
    _armed: tuple[bytes, float] | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _running: bool = field(default=False, init=False)

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> OutageProxy:
        self._listen()
        self._running = True
        threading.Thread(target=self._accept_loop, daemon=True).start()
        return self

    def stop(self) -> None:
        self._running = False
        self._drop_everything()

    def __enter__(self) -> OutageProxy:
        return self.start()

    def __exit__(self, *_) -> None:
        self.stop()

    def trip_on(self, pattern: bytes, seconds: float) -> None:
        """Arm the outage; ``sightings[pattern]`` then counts every request that carries it
        (the one that tripped included): a client that retried sent it again."""
        self._armed = (pattern, seconds)
        self.sightings[pattern] = 0

    def _listen(self, patience_s: float = 10.0) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + patience_s
        while True:  # the same port again after an outage: its old connections may linger
            try:
                listener.bind((HOST, self.port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    listener.close()
                    raise
                time.sleep(0.1)
        listener.listen(64)
        listener.settimeout(0.2)
        self.port = listener.getsockname()[1]
        self._listener = listener

    def _accept_loop(self) -> None:
        while self._running:
            listener = self._listener
            if listener is None:  # in an outage
                time.sleep(0.05)
                continue
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                upstream = socket.create_connection((HOST, self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections |= {client, upstream}
            threading.Thread(target=self._relay, args=(client, upstream, True), daemon=True).start()
            threading.Thread(
                target=self._relay, args=(upstream, client, False), daemon=True
            ).start()

    def _relay(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                if from_client:
                    for pattern in self.sightings:
                        self.sightings[pattern] += pattern in chunk
                armed = self._armed
                if from_client and armed and armed[0] in chunk:
                    self._armed = None
                    self._outage(armed[0], armed[1])
                    return
                sink.sendall(chunk)
        with self._lock:
            self._connections -= {source, sink}
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def _outage(self, trigger: bytes, seconds: float) -> None:
        outage = Outage(time.monotonic(), trigger=trigger)
        self.outages.append(outage)
        self._drop_everything()

        def back() -> None:
            time.sleep(seconds)
            if self._running:
                self._listen()
            outage.ended = time.monotonic()

        threading.Thread(target=back, daemon=True).start()

    def _drop_everything(self) -> None:
        """Close the listener (new connections are refused) and reset every open connection."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            with contextlib.suppress(OSError):
                # An abortive close (RST), as a server process that died leaves its clients.
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            connection.close()
