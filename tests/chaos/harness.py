"""Fault-injection harness: a real two-hop chain under load, and ways to hurt it.

Usable from pytest (``tests/chaos/test_chaos.py``, short CI variants) and
from ``tests/chaos/run.py`` (long variants with a summary table).  The
promise checked everywhere: every message that got a 250 from the ingress
reaches the sink (0 lost); duplicates are allowed (at-least-once) but
counted and reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support import MailhopNode, free_port, wait_for, wait_port

from mailhop.tools.loadgen import run_load

SINK = Path(__file__).with_name("sink.py")


class CountingSink:
    """``sink.py`` as a subprocess; :meth:`tokens` counts what arrived."""

    def __init__(self, directory: Path, max_rate: float = 0.0, *, timed: bool = False) -> None:
        self.max_rate = max_rate
        self.timed = timed
        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        self.file = directory / "sink-tokens"
        self.file.touch()
        self.times_file = directory / "sink-times"
        self.times_file.touch()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> CountingSink:
        env = dict(os.environ, SINK_TIMES=str(self.times_file)) if self.timed else None
        self.proc = subprocess.Popen([sys.executable, str(SINK), str(self.port),
                                      str(self.file), str(self.max_rate)], env=env)
        wait_port("127.0.0.1", self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)

    def tokens(self) -> Counter[str]:
        return Counter(self.file.read_text().split())

    def arrivals(self) -> dict[str, float]:
        """Token -> wall-clock time it arrived (``timed`` sinks only; first arrival wins)."""
        seen: dict[str, float] = {}
        for line in self.times_file.read_text().splitlines():
            token, _, when = line.partition(" ")
            seen.setdefault(token, float(when))
        return seen


class Chain:
    """ingress -> egress -> counting sink, all real processes on loopback."""

    def __init__(self, directory: Path, *, link: Callable[[int], int] | None = None,
                 queue: str = "", extra: str = "") -> None:
        """``link`` gets the egress port and returns the port the ingress relays to
        (a :class:`FaultyProxy` in front of the egress, for instance)."""
        self.dir = directory
        self.sink = CountingSink(directory)
        hop = 'tls = "none"\nmax_connections = 8\n'
        self.egress = MailhopNode(directory / "egress", name="egress", hop=hop, queue=queue,
                                  relay=f"[127.0.0.1]:{self.sink.port}", extra=extra)
        next_port = link(self.egress.port) if link else self.egress.port
        self.ingress = MailhopNode(directory / "ingress", name="ingress", hop=hop, queue=queue,
                                   relay=f"[127.0.0.1]:{next_port}",
                                   listen="max_connections_per_ip = 1000\n", extra=extra)

    def start(self) -> Chain:
        self.sink.start()
        self.egress.start()
        self.ingress.start()
        return self

    def stop(self) -> None:
        for node in (self.ingress, self.egress):
            node.stop()
        self.sink.stop()

    def drained(self) -> bool:
        return self.ingress.queue() == [] and self.egress.queue() == []

    def wait_drained(self, timeout: float = 120.0) -> None:
        wait_for(self.drained, timeout=timeout, interval=0.5, what="both queues to drain")


@dataclass
class Load:
    """Continuous load in a background thread; remembers every token that got a 250."""

    host: str
    port: int
    sessions: int = 4
    batch: int = 40
    size: int = 2048
    acked: list[str] = field(default_factory=list)
    refused: int = 0
    errors: int = 0
    pause: float = 0.0  # between batches, to cap the offered load

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._run_id = f"r{time.time_ns():x}"

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            result = await run_load(self.host, self.port, messages=self.batch,
                                    sessions=self.sessions, size=self.size,
                                    prefix=f"{self._run_id}-{n}")
            self.acked += result.acked
            self.refused += len(result.refused)
            self.errors += len(result.errors)
            if not result.acked:
                await asyncio.sleep(0.1)  # the node is down: do not spin
            elif self.pause:
                await asyncio.sleep(self.pause)


@dataclass
class Outcome:
    scenario: str
    acked: int
    delivered: int
    lost: int
    duplicates: int
    seconds: float
    notes: str = ""

    @property
    def duplicate_rate(self) -> float:
        return self.duplicates / self.acked if self.acked else 0.0


def outcome(scenario: str, acked: list[str], received: Counter[str], seconds: float,
            notes: str = "") -> Outcome:
    acked_set = set(acked)
    lost = len(acked_set - set(received))
    duplicates = sum(c - 1 for c in received.values() if c > 1)
    delivered = sum(1 for t in acked_set if t in received)
    return Outcome(scenario, len(acked_set), delivered, lost, duplicates, seconds, notes)


def kill_loop(chain: Chain, kills: int, rng: random.Random,
              gap: tuple[float, float] = (0.4, 1.2)) -> list[str]:
    """``kill -9`` the ingress or the egress at random moments, restarting each time."""
    done = []
    for _ in range(kills):
        time.sleep(rng.uniform(*gap))
        node = chain.ingress if rng.random() < 0.5 else chain.egress
        node.kill9()
        node.start()
        done.append(node.name)
    return done


class FaultyProxy:
    """A userspace stand-in for a bad cross-border link (this kernel has no netem).

    Between ingress and egress it adds ``latency`` per direction, caps the rate,
    and, on a share of connections, drops them at a chosen point: during the
    greeting, in the middle of DATA, or after the final dot before the reply
    comes back (the case that must lead to a retry, never a loss).  ``hang``
    makes new connections accept and then say nothing, like a black-holed path.
    """

    MODES = ("greeting", "data", "after_dot")

    def __init__(self, target_port: int, *, latency: float = 0.02, rate: float | None = None,
                 fault_every: int = 2) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.latency = latency
        self.rate = rate
        self.fault_every = fault_every  # every Nth connection fails, cycling through MODES
        self.hang = False
        self.faults: Counter[str] = Counter()
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def start(self) -> FaultyProxy:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True), self._loop)
        self._server = future.result(10)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        n = self.connections  # before any await: each connection its own number
        if self.hang:
            await asyncio.sleep(3600)  # cancelled when the client gives up
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        mode = self.MODES[(n // self.fault_every) % len(self.MODES)] \
            if self.fault_every and n % self.fault_every == 0 else None
        state = {"dot": False, "data": 0}

        def reset(why: str) -> None:
            self.faults[why] += 1
            writer.transport.abort()
            up_writer.transport.abort()

        async def client_to_server() -> None:
            async with self._delayed(up_writer) as forward:
                while chunk := await reader.read(65536):
                    if mode == "data" and state["data"] > 0 and state["data"] + len(chunk) > 512:
                        forward(chunk[: max(1, len(chunk) // 2)])
                        await asyncio.sleep(self.latency + 0.01)  # let the half go out
                        return reset("mid-DATA")
                    if b"DATA\r\n" in chunk or state["data"]:
                        state["data"] += len(chunk)
                    if b"\r\n.\r\n" in chunk:
                        state["dot"] = True
                    forward(chunk)
                    await self._pace(len(chunk))

        async def server_to_client() -> None:
            first = True
            async with self._delayed(writer) as forward:
                while chunk := await up_reader.read(65536):
                    if first and mode == "greeting":
                        return reset("greeting")
                    first = False
                    if mode == "after_dot" and state["dot"]:
                        return reset("after final dot")
                    forward(chunk)
                    await self._pace(len(chunk))

        with contextlib.suppress(Exception):
            await asyncio.gather(client_to_server(), server_to_client())

    @contextlib.asynccontextmanager
    async def _delayed(self, writer: asyncio.StreamWriter
                       ) -> AsyncIterator[Callable[[bytes], None]]:
        """A delay line: each chunk leaves ``latency`` after it arrived, in order.

        Reading goes on meanwhile, so the link has latency without turning
        into stop-and-wait (a pipelined peer keeps several chunks in flight).
        """
        line: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def drain() -> None:
            while (item := await line.get()) is not None:
                delay = item[0] - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(item[1])
                await writer.drain()
            writer.close()

        task = asyncio.ensure_future(drain())
        try:
            yield lambda chunk: line.put_nowait((loop.time() + self.latency, chunk))
        finally:
            line.put_nowait(None)
            with contextlib.suppress(Exception):
                await task

    async def _pace(self, size: int) -> None:
        if self.rate:
            await asyncio.sleep(size / self.rate)


def table(outcomes: list[Outcome]) -> str:
    head = (f"{'scenario':<28} {'acked':>7} {'delivered':>9} {'lost':>5} {'duplicates':>10} "
            f"{'time':>7}  notes")
    rows = [head, "-" * len(head)]
    for o in outcomes:
        rows.append(f"{o.scenario:<28} {o.acked:>7} {o.delivered:>9} {o.lost:>5} "
                    f"{o.duplicates:>10} {o.seconds:>6.1f}s  {o.notes}")
    return "\n".join(rows)


# -- scenarios ----------------------------------------------------------------

def scenario_kill9(directory: Path, kills: int = 10, seed: int = 1) -> Outcome:
    """kill -9 either node at random moments under continuous load; nothing acked is lost."""
    rng = random.Random(seed)
    chain = Chain(directory).start()
    started = time.monotonic()
    load = Load(chain.ingress.host, chain.ingress.port).start()
    try:
        killed = kill_loop(chain, kills, rng)
        time.sleep(0.5)
        load.stop()
        chain.wait_drained()
        time.sleep(0.5)
        result = outcome(f"kill -9 x{kills}", load.acked, chain.sink.tokens(),
                         time.monotonic() - started,
                         f"ingress killed {killed.count('ingress')}x, "
                         f"egress {killed.count('egress')}x")
    finally:
        load.stop()
        chain.stop()
    return result


def scenario_outage(directory: Path, outage: float = 4.0) -> tuple[Outcome, str]:
    """The egress goes away under load and comes back; the ingress queues and retries."""
    chain = Chain(directory).start()
    started = time.monotonic()
    load = Load(chain.ingress.host, chain.ingress.port).start()
    try:
        time.sleep(1.0)
        chain.egress.stop()
        time.sleep(outage)
        chain.egress.start()
        time.sleep(1.0)
        load.stop()
        chain.wait_drained()
        time.sleep(0.5)
        log = chain.ingress.log()
        result = outcome(f"next-hop outage {outage:.0f}s", load.acked, chain.sink.tokens(),
                         time.monotonic() - started,
                         f"{log.count('status=deferred')} deferrals at the ingress")
    finally:
        load.stop()
        chain.stop()
    return result, log


def scenario_lossy(directory: Path, seconds: float = 8.0) -> Outcome:
    """ingress -> faulty link (20 ms each way, drops) -> egress -> sink."""
    proxies: list[FaultyProxy] = []

    def link(egress_port: int) -> int:
        proxies.append(FaultyProxy(egress_port, latency=0.02, rate=2_000_000).start())
        return proxies[0].port

    chain = Chain(directory, link=link,
                  extra='[delivery]\nidle_time = "0.3s"\n').start()  # more, shorter connections
    proxy = proxies[0]
    started = time.monotonic()
    load = Load(chain.ingress.host, chain.ingress.port, sessions=2, batch=20, pause=0.2).start()
    try:
        time.sleep(seconds)
        # Every kind of reset must have happened; a pipelining client reuses its
        # connections well, so on a slow day that can take a little longer.
        deadline = time.monotonic() + 3 * seconds
        while len(proxy.faults) < len(FaultyProxy.MODES) and time.monotonic() < deadline:
            time.sleep(0.2)
        load.stop()
        chain.wait_drained(timeout=180)
        time.sleep(0.5)
        faults = ", ".join(f"{k} {v}" for k, v in sorted(proxy.faults.items()))
        result = outcome("lossy link 20ms+drops", load.acked, chain.sink.tokens(),
                         time.monotonic() - started,
                         f"{proxy.connections} connections; resets: {faults or 'none'}")
        result.faults = dict(proxy.faults)  # type: ignore[attr-defined]
    finally:
        load.stop()
        chain.stop()
        proxy.stop()
    return result
