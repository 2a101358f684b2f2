"""Connecting to a next hop: every address, both families, staggered (RFC 8305).

The seed's outage was ``connect to smtp.gmail.com[2404:…]:587: Network is
unreachable`` — an IPv6 route that did not work while IPv4 did.  So a
connection attempt starts on the first address, and if it has not
succeeded within ``delay`` the next address (of the other family) starts
in parallel; the first to connect wins.  A family that failed for a host is
remembered for a while and tried last.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

ATTEMPT_DELAY = 0.25  # RFC 8305 5: "Connection Attempt Delay" default


def family_of(address: str) -> int:
    return ipaddress.ip_address(address).version


class FamilyMemory:
    """Per host, which address family failed recently (and so goes last)."""

    def __init__(self, hold: float = 600.0) -> None:
        self.hold = hold
        self._bad: dict[tuple[str, int], float] = {}

    def order(self, host: str, addresses: tuple[str, ...]) -> list[str]:
        v6 = [a for a in addresses if family_of(a) == 6]
        v4 = [a for a in addresses if family_of(a) == 4]
        now = time.monotonic()
        first, second = (v6, v4)
        if self._bad.get((host, 6), 0) > now and v4:
            first, second = v4, v6
        out: list[str] = []
        for i in range(max(len(first), len(second))):  # interleave the families
            out += first[i : i + 1] + second[i : i + 1]
        return out

    def failed(self, host: str, address: str) -> None:
        self._bad[(host, family_of(address))] = time.monotonic() + self.hold

    def succeeded(self, host: str, address: str) -> None:
        self._bad.pop((host, family_of(address)), None)


@dataclass
class ConnectResult:
    transport: asyncio.Transport
    protocol: asyncio.Protocol
    address: str
    seconds: float
    errors: list[tuple[str, str]] = field(default_factory=list)


class ConnectFailed(Exception):
    def __init__(self, errors: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{addr}: {err}" for addr, err in errors) or "no addresses")
        self.errors = errors


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "Connection timed out"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # "Connection refused", "Network is unreachable"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or exc.__class__.__name__


async def connect_staggered(addresses: list[str], port: int,
                            factory: Callable[[], asyncio.Protocol], *,
                            timeout: float, delay: float = ATTEMPT_DELAY,
                            source: str | None = None) -> ConnectResult:
    """Race connections to ``addresses`` (already ordered); raise :class:`ConnectFailed`."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    deadline = started + timeout
    errors: list[tuple[str, str]] = []
    pending: dict[asyncio.Task[tuple[asyncio.BaseTransport, asyncio.Protocol]], str] = {}
    queue = list(addresses)
    if source is not None:  # a source address only fits targets of its own family
        queue = [a for a in queue if family_of(a) == family_of(source)] or queue

    def start(address: str) -> None:
        local = (source, 0) if source and family_of(source) == family_of(address) else None
        task = asyncio.ensure_future(loop.create_connection(factory, address, port,
                                                            local_addr=local))
        pending[task] = address

    try:
        while queue or pending:
            if queue and not pending:
                start(queue.pop(0))
            now = time.monotonic()
            if now >= deadline:
                break
            wait = min(delay, deadline - now) if queue else deadline - now
            done, _ = await asyncio.wait(pending, timeout=wait,
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:
                if queue:
                    start(queue.pop(0))  # the next address starts alongside (RFC 8305)
                continue
            for task in done:
                address = pending.pop(task)
                exc = task.exception()
                if exc is None:
                    transport, protocol = task.result()
                    return ConnectResult(transport, protocol, address,  # type: ignore[arg-type]
                                         time.monotonic() - started, errors)
                errors.append((address, _describe(exc)))
            if queue and not pending:
                continue
        for address in pending.values():
            errors.append((address, "Connection timed out"))
        for address in queue:
            errors.append((address, "not tried: connect timeout"))
        raise ConnectFailed(errors)
    finally:
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(BaseException):
                transport, _ = await task
                transport.close()
