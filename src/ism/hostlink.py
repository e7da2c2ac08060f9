"""A TCP bridge between a virtual device's UART and a host program on loopback.

Owns: serving one logical UART (``uart.host``) of a running virtual device on
``127.0.0.1:PORT`` so a real host process can talk to the device, as it would
over a serial line.
Must not import: agent, store, cli.

Threat: an unexpected network peer. The bridge listens on the loopback
interface only, serves one client at a time, and bounds what it buffers
(the UART's own buffers are bounded).
"""

from __future__ import annotations

import contextlib
import socket
import threading

from ism.boards.virtual import Uart

__all__ = ["UartBridge"]


class UartBridge:
    """Forwards bytes between a TCP client on loopback and a :class:`Uart`."""

    def __init__(self, uart: Uart, port: int = 0) -> None:
        self.uart = uart
        self._server = socket.create_server(("127.0.0.1", port))
        self._server.settimeout(0.05)
        self.port = self._server.getsockname()[1]
        self._client: socket.socket | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="uart-bridge", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if self._client is None:
                try:
                    client, _ = self._server.accept()
                except (TimeoutError, OSError):
                    continue
                client.settimeout(0.01)
                self._client = client
            try:
                data = self._client.recv(4096)
                if not data:
                    self._drop()
                    continue
                with contextlib.suppress(BufferError):
                    self.uart.host_send(data)
            except TimeoutError:
                pass
            except OSError:
                self._drop()

    def flush(self) -> None:
        """Sends what the device wrote to the UART to the client (call from the device loop)."""
        out = self.uart.host_receive()
        if out and self._client is not None:
            try:
                self._client.sendall(out)
            except OSError:
                self._drop()

    def _drop(self) -> None:
        if self._client is not None:
            with contextlib.suppress(OSError):
                self._client.close()
        self._client = None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)
        self._drop()
        self._server.close()
