"""One round trip per message: the next envelope goes out before the last final reply.

The downstream here is a sink on mailhop's own server engine that holds
each final 250 back until the client has sent something more (or a few
seconds pass).  A client that waits for the 250 before its next ``MAIL``
makes every hold run into the timeout; a pipelining one releases it at
once.  A second case drops the connection at that moment: the message
whose reply never came is deferred, the next one is retried, none is lost.
"""

from __future__ import annotations

import asyncio
import smtplib
import threading
from pathlib import Path

from support import MailhopNode, free_port, mailhop, wait_for

from mailhop.protocol import (
    CLOSED,
    NEED_DATA,
    PAUSED,
    MessageReceived,
    ServerConfig,
    ServerConnection,
)

HOLD = 3.0


class HoldingSink:
    """Holds every end-of-data reply until more client bytes are buffered (or ``HOLD`` s)."""

    def __init__(self, port: int, drop_first: bool = False) -> None:
        self.port = port
        self.drop_first = drop_first  # close the first connection instead of releasing
        self.released: list[str] = []  # "chained" or "timeout", per message
        self.messages: list[bytes] = []
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> HoldingSink:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result(5)
        return self

    async def _serve(self) -> None:
        self.server = await self.loop.create_server(self._protocol, "127.0.0.1", self.port)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def _protocol(self) -> asyncio.Protocol:
        sink = self
        sink.connections += 1
        number = sink.connections

        class Session(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport
                self.conn = ServerConnection(ServerConfig(hostname="hold.test"))
                self.conn.greet()
                self.held: asyncio.TimerHandle | None = None
                transport.write(self.conn.data_to_send())  # type: ignore[attr-defined]

            def data_received(self, data: bytes) -> None:
                self.conn.receive_data(data)
                self.pump()

            def release(self, how: str) -> None:
                assert self.held is not None
                self.held.cancel()
                self.held = None
                if how == "chained" and sink.drop_first and number == 1:
                    sink.released.append("dropped")
                    self.transport.abort()  # type: ignore[attr-defined]
                    return
                sink.released.append(how)
                self.conn.accept()
                self.pump()

            def pump(self) -> None:
                conn = self.conn
                if self.held is not None:
                    if conn.buffered:
                        self.release("chained")
                    return
                while True:
                    event = conn.next_event()
                    if event is NEED_DATA or event is PAUSED:
                        break
                    if event is CLOSED:
                        self.transport.write(conn.data_to_send())  # type: ignore[attr-defined]
                        self.transport.close()
                        return
                    if isinstance(event, MessageReceived):
                        sink.messages.append(event.data)
                        self.held = asyncio.get_running_loop().call_later(
                            HOLD, self.release, "timeout")
                        if conn.buffered:
                            self.transport.write(conn.data_to_send())  # type: ignore
                            self.release("chained")
                            return
                        break
                    conn.accept()
                self.transport.write(conn.data_to_send())  # type: ignore[attr-defined]

        return Session()


def submit(node: MailhopNode, count: int) -> None:
    with smtplib.SMTP(node.host, node.port) as s:
        for i in range(count):
            s.sendmail("app@example.com", ["user@example.com"],
                       f"Subject: {i}\r\nMessage-ID: <p{i}@test>\r\n\r\nbody {i}\r\n")


def queued_then_flushed(tmp_path: Path, sink_port: int, count: int) -> MailhopNode:
    """``count`` messages wait in the queue (next hop down), then go at once."""
    node = MailhopNode(tmp_path / "node", relay=f"[127.0.0.1]:{sink_port}",
                       hop='tls = "none"\nmax_connections = 1\n',
                       queue='min_backoff = "1h"\nmax_backoff = "2h"\nrun_delay = "1h"\n').start()
    submit(node, count)
    wait_for(lambda: node.log().count("status=deferred") >= count, timeout=20,
             what="all deferred while the next hop is down")
    return node


def test_next_envelope_rides_with_the_data(tmp_path: Path) -> None:
    port = free_port()
    node = queued_then_flushed(tmp_path, port, 6)
    sink = HoldingSink(port).start()
    try:
        assert mailhop("queue", "flush", "--spool", str(node.spool)).returncode == 0
        wait_for(lambda: node.log().count("status=sent") == 6, timeout=30, what="six sent")
        # Every reply but the last was released by the next envelope, not by the clock.
        assert sink.released == ["chained"] * 5 + ["timeout"]
        assert sink.connections == 1
        assert len(sink.messages) == 6
        assert node.queue() == []
    finally:
        node.stop()
        sink.stop()


def test_connection_lost_with_a_reply_outstanding(tmp_path: Path) -> None:
    port = free_port()
    node = queued_then_flushed(tmp_path, port, 3)
    sink = HoldingSink(port, drop_first=True).start()
    try:
        assert mailhop("queue", "flush", "--spool", str(node.spool)).returncode == 0
        wait_for(lambda: node.log().count("status=deferred") >= 4, timeout=20,
                 what="the unanswered message deferred")
        log = node.log()
        assert "message may be sent more than once" in log
        assert mailhop("queue", "flush", "--spool", str(node.spool)).returncode == 0
        wait_for(lambda: node.queue() == [], timeout=30, what="an empty queue")
        subjects = {m.split(b"Subject: ")[1][:1] for m in sink.messages}
        assert subjects == {b"0", b"1", b"2"}  # at least once each, nothing lost
    finally:
        node.stop()
        sink.stop()
