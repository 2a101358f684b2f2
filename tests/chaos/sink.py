"""A counting SMTP sink: accepts everything and records each message's token.

Run as a process (``python tests/chaos/sink.py PORT TOKENS_FILE [MAX_RATE]``) so it
never competes with the test for the GIL.  Built on mailhop's own server
engine; the token is the ``X-Mailhop-Token`` header the load generator
puts in every message.  Tokens are appended to a file, one per line, so a
test can count what arrived (and how often) at any time.  With
``SINK_TIMES=FILE`` in the environment it also writes ``token wall-clock``
lines there, for latency benchmarks.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import signal
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "src"))

from mailhop.protocol import (
    CLOSED,
    NEED_DATA,
    PAUSED,
    MailFrom,
    MessageReceived,
    Reply,
    ServerConfig,
    ServerConnection,
)

# With MAX_RATE, MAIL beyond that many per second gets SES's throttling reply.
THROTTLE = Reply.of(454, "4.7.0", "Throttling failure: Maximum sending rate exceeded.")
MAX_RATE = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
RECENT: collections.deque[float] = collections.deque()

TOKEN = re.compile(rb"(?im)^X-Mailhop-Token:[ \t]*(\S+)")
CONFIG = ServerConfig(hostname="sink.test", max_message_size=50 * 1024 * 1024)


class Sink(asyncio.Protocol):
    out = None  # the tokens file, shared
    times = None  # the arrival times file, if asked for

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.conn = ServerConnection(CONFIG)
        self.conn.greet()
        transport.write(self.conn.data_to_send())  # type: ignore[attr-defined]
        self.count = 0

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        conn.receive_data(data)
        while True:
            event = conn.next_event()
            if event in (NEED_DATA, PAUSED):
                break
            if event is CLOSED:
                self.flush()  # a pipelined QUIT can follow the final dot
                self.transport.write(conn.data_to_send())  # type: ignore[attr-defined]
                self.transport.close()
                return
            if isinstance(event, MailFrom) and MAX_RATE:
                now = time.monotonic()
                while RECENT and now - RECENT[0] > 1.0:
                    RECENT.popleft()
                if len(RECENT) >= MAX_RATE:
                    conn.reject(THROTTLE)
                    continue
                RECENT.append(now)
                conn.accept()
            elif isinstance(event, MessageReceived):
                match = TOKEN.search(event.data)
                token = match.group(1).decode() if match else "-"
                Sink.out.write(f"{token}\n")
                if Sink.times is not None:
                    Sink.times.write(f"{token} {time.time():.6f}\n")
                self.count += 1
                conn.accept(f"Ok: queued as SINK{self.count}")
            else:
                conn.accept()
        self.flush()
        self.transport.write(conn.data_to_send())  # type: ignore[attr-defined]

    @staticmethod
    def flush() -> None:
        """Before any reply goes out: what was acked is on record."""
        Sink.out.flush()
        if Sink.times is not None:
            Sink.times.flush()


async def main(port: int, path: str) -> None:
    Sink.out = open(path, "a", encoding="utf-8")  # noqa: SIM115
    if os.environ.get("SINK_TIMES"):
        Sink.times = open(os.environ["SINK_TIMES"], "a", encoding="utf-8")  # noqa: SIM115
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Sink, "127.0.0.1", port, reuse_address=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()
    Sink.out.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
