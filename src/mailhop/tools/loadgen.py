"""A pipelining SMTP load generator (like Postfix's ``smtp-source``, but pipelined).

Each session keeps one connection and sends one message per round trip:
the end of one message's data, the next ``MAIL``, ``RCPT`` and ``DATA``
go out together (RFC 2920 lets message content start a group).  Every
message carries a unique ``X-Mailhop-Token`` header, and the generator
records which tokens got a 250, so a test can prove that nothing acked was
lost downstream.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..protocol.replies import Reply, ReplyParser


@dataclass
class LoadResult:
    sent: int = 0
    acked: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    submitted: dict[str, float] = field(default_factory=dict)  # token -> wall clock, paced runs

    @property
    def rate(self) -> float:
        return len(self.acked) / self.seconds if self.seconds else 0.0


_LINE = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\r\n"


@functools.lru_cache(maxsize=8)
def _body(lines: int) -> bytes:
    """The same body for every message of a size: the generator's own CPU is spent
    on the same two cores as the servers it measures, so it builds each body once."""
    return _LINE * max(1, lines)


def make_message(token: str, size: int, sender: str, rcpt: str) -> bytes:
    head = (f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: load {token}\r\n"
            f"Message-ID: <{token}@loadgen.test>\r\nX-Mailhop-Token: {token}\r\n\r\n").encode()
    return head + _body((size - len(head)) // len(_LINE))


_LOST = Reply.of(599, "", "connection lost")


class _Session(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = ReplyParser()
        self.replies: asyncio.Queue[Reply] = asyncio.Queue()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    async def get(self) -> Reply:
        """The next reply; once the connection is gone, always a 599."""
        if self.closed and self.replies.empty():
            return _LOST
        return await self.replies.get()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            for reply in self.parser.feed(data):
                self.replies.put_nowait(reply)
        except ValueError as exc:
            self.replies.put_nowait(Reply.of(599, "", f"bad reply: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.replies.put_nowait(_LOST)


async def _open(host: str, port: int, result: LoadResult,
                source: str | None = None) -> tuple[asyncio.Transport, _Session] | None:
    """A connection past its greeting and EHLO; None (and an error noted) if not."""
    loop = asyncio.get_running_loop()
    try:
        transport, proto = await loop.create_connection(
            _Session, host, port, local_addr=(source, 0) if source else None)
    except OSError as exc:
        result.errors.append(f"connect: {exc}")
        return None
    if (await proto.get()).code != 220:
        result.errors.append("no greeting")
    else:
        transport.write(b"EHLO loadgen.test\r\n")
        if (await proto.get()).code == 250:
            return transport, proto
        result.errors.append("EHLO refused")
    transport.close()
    return None


async def _session(host: str, port: int, tokens: asyncio.Queue[str], size: int,
                   sender: str, rcpt: str, result: LoadResult,
                   source: str | None) -> None:
    opened = await _open(host, port, result, source)
    if opened is None:
        return
    transport, proto = opened
    get = proto.get
    try:
        envelope = f"MAIL FROM:<{sender}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode()
        pending = b""  # the previous message's data, sent with this envelope
        previous: str | None = None
        while not proto.closed:
            token = tokens.get_nowait() if not tokens.empty() else None
            if token is None:
                break
            transport.write(pending + envelope)
            if previous is not None:
                _record(await get(), previous, result)
                previous = None
            mail, rcpt_reply, data = await get(), await get(), await get()
            result.sent += 1
            if data.code != 354:
                bad = mail if mail.code != 250 else rcpt_reply if rcpt_reply.code != 250 else data
                result.refused.append((token, bad.text))
                pending = b""
                if bad.code >= 421 and mail.code == 421:
                    return
                continue
            pending = make_message(token, size, sender, rcpt) + b".\r\n"  # nothing to stuff
            previous = token
        if not proto.closed:
            transport.write(pending + b"QUIT\r\n")
        if previous is not None:
            _record(await get(), previous, result)
    finally:
        transport.close()


async def _paced_session(host: str, port: int, schedule: Iterator[tuple[str, float]], size: int,
                         sender: str, rcpt: str, result: LoadResult) -> None:
    """One message per due time, each sent whole (envelope pipelined, then data).

    Used to measure latency at a fixed rate, so nothing waits for the next
    message to share a write with, unlike :func:`_session`.
    """
    loop = asyncio.get_running_loop()
    opened = await _open(host, port, result)
    if opened is None:
        return
    transport, proto = opened
    get = proto.get
    envelope = f"MAIL FROM:<{sender}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode()
    try:
        for token, due in schedule:
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if proto.closed:
                result.errors.append("connection lost")
                return
            result.submitted[token] = time.time()
            transport.write(envelope)
            replies = [await get(), await get(), await get()]
            result.sent += 1
            if replies[2].code != 354:
                result.refused.append((token, replies[2].text))
                continue
            transport.write(make_message(token, size, sender, rcpt) + b".\r\n")
            _record(await get(), token, result)
        transport.write(b"QUIT\r\n")
    finally:
        transport.close()


def _record(reply: Reply, token: str, result: LoadResult) -> None:
    if reply.code == 250:
        result.acked.append(token)
    else:
        result.refused.append((token, reply.text))


async def run_load(host: str, port: int, *, messages: int, sessions: int = 20,
                   size: int = 4096, sender: str = "load@example.org",
                   rcpt: str = "sink@example.com", prefix: str = "",
                   source: str | None = None, rate: float | None = None) -> LoadResult:
    """Send ``messages`` messages over ``sessions`` pipelining connections.

    With ``rate``, messages go out at that many per second instead of as
    fast as the server answers, and ``submitted`` records when each began.
    """
    stamp = prefix or f"t{time.time_ns():x}"
    names = [f"{stamp}-{i:07d}" for i in range(messages)]
    result = LoadResult()
    started = time.perf_counter()
    if rate:
        t0 = asyncio.get_running_loop().time() + 0.2
        schedule = iter([(name, t0 + i / rate) for i, name in enumerate(names)])
        await asyncio.gather(*(_paced_session(host, port, schedule, size, sender, rcpt, result)
                               for _ in range(sessions)))
    else:
        tokens: asyncio.Queue[str] = asyncio.Queue()
        for name in names:
            tokens.put_nowait(name)
        await asyncio.gather(*(_session(host, port, tokens, size, sender, rcpt, result, source)
                               for _ in range(sessions)))
    result.seconds = time.perf_counter() - started
    return result


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="mailhop-loadgen", description=__doc__.splitlines()[0])
    parser.add_argument("server", help="HOST:PORT")
    parser.add_argument("-m", "--messages", type=int, default=1000)
    parser.add_argument("-s", "--sessions", type=int, default=20)
    parser.add_argument("-l", "--size", type=int, default=4096)
    parser.add_argument("-r", "--rate", type=float, help="messages per second (default: flat out)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    host, _, port = args.server.rpartition(":")
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(run_load(host.strip("[]"), int(port), messages=args.messages,
                             sessions=args.sessions, size=args.size, rate=args.rate))
    if args.json:
        print(json.dumps({"acked": len(result.acked), "refused": len(result.refused),
                          "errors": result.errors, "seconds": result.seconds,
                          "rate": result.rate, "submitted": result.submitted}))
    else:
        print(f"{len(result.acked)} acked, {len(result.refused)} refused, "
              f"{len(result.errors)} errors in {result.seconds:.2f}s = {result.rate:.0f} msg/s")
    return 0 if len(result.acked) == args.messages else 1


if __name__ == "__main__":
    raise SystemExit(main())
