"""Fault-injection harness: a real two-hop chain under load, and ways to hurt it.

Usable from pytest (``tests/chaos/test_chaos.py``, short CI variants) and
from ``tests/chaos/run.py`` (long variants with a summary table).  The
promise checked everywhere: every message that got a 250 from the ingress
reaches the sink (0 lost); duplicates are allowed (at-least-once) but
counted and reported.
"""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support import MailhopNode, free_port, wait_for, wait_port  # noqa: E402

from mailhop.tools.loadgen import run_load  # noqa: E402

SINK = Path(__file__).with_name("sink.py")


class CountingSink:
    """``sink.py`` as a subprocess; :meth:`tokens` counts what arrived."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.file = directory / "sink-tokens"
        self.file.touch()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> CountingSink:
        self.proc = subprocess.Popen([sys.executable, str(SINK), str(self.port),
                                      str(self.file)])
        wait_port("127.0.0.1", self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)

    def tokens(self) -> Counter[str]:
        return Counter(self.file.read_text().split())


class Chain:
    """ingress -> egress -> counting sink, all real processes on loopback."""

    def __init__(self, directory: Path, *, egress_relay_port: int | None = None,
                 ingress_relay_port: int | None = None, queue: str = "",
                 extra: str = "") -> None:
        self.dir = directory
        self.sink = CountingSink(directory)
        hop = 'tls = "none"\nmax_connections = 8\n'
        self.egress = MailhopNode(directory / "egress", name="egress", hop=hop, queue=queue,
                                  relay=f"[127.0.0.1]:{egress_relay_port or self.sink.port}",
                                  extra=extra)
        self.ingress = MailhopNode(directory / "ingress", name="ingress", hop=hop, queue=queue,
                                   relay=f"[127.0.0.1]:{ingress_relay_port or self.egress.port}",
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
