from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from mailhop.protocol import (
    CLOSED,
    NEED_DATA,
    PAUSED,
    AuthRequest,
    MessageReceived,
    ServerConfig,
    ServerConnection,
    StartTLS,
)


class EngineDriver:
    """Feeds bytes to a server engine and answers its events like a simple binding."""

    def __init__(self, config: ServerConfig | None = None, *, tls: bool = False,
                 decide: Callable[[object], object] | None = None) -> None:
        self.conn = ServerConnection(config or ServerConfig(hostname="mx.test"), tls=tls)
        self.events: list[object] = []
        self.decide = decide or (lambda event: None)
        self.conn.greet()
        self.out = bytearray(self.conn.data_to_send())

    def feed(self, data: bytes) -> bytes:
        start = len(self.out)
        self.conn.receive_data(data)
        self._pump()
        return bytes(self.out[start:])

    def _pump(self) -> None:
        conn = self.conn
        while True:
            event = conn.next_event()
            if event in (NEED_DATA, PAUSED, CLOSED):
                break
            self.events.append(event)
            if isinstance(event, StartTLS):
                self.out += conn.data_to_send()
                conn.tls_established()
                continue
            verdict = self.decide(event)
            if verdict is None:
                if isinstance(event, MessageReceived):
                    conn.accept(f"Ok: queued as Q{len(self.messages)}")
                elif isinstance(event, AuthRequest):
                    if event.password == "secret":
                        conn.accept()
                    else:
                        from mailhop.protocol.server import R_AUTH_FAILED
                        conn.reject(R_AUTH_FAILED)
                else:
                    conn.accept()
            else:
                conn.reject(verdict)  # type: ignore[arg-type]
        self.out += conn.data_to_send()

    @property
    def messages(self) -> list[MessageReceived]:
        return [e for e in self.events if isinstance(e, MessageReceived)]

    def codes(self, data: bytes) -> list[str]:
        """Reply codes (with enhanced code) of the final line of each reply to ``data``."""
        text = self.feed(data).decode()
        out = []
        for line in text.split("\r\n"):
            match = re.match(r"(\d{3}) (\d\.\d{1,3}\.\d{1,3})?", line)
            if match:
                out.append(" ".join(g for g in match.groups() if g))
        return out


@pytest.fixture
def engine() -> EngineDriver:
    return EngineDriver()
