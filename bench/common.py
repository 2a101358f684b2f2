"""What the benchmarks share: the two chains under test, the load, the clocks.

A chain is ``hops`` relays in a row in front of a sink: mailhop nodes, or
Postfix instances each with ``relayhost`` set to the next.  Both keep their
queue on disk and fsync every message before its 250.  ``link`` can put
something (the latency proxy) between the first and the second hop.  The
clock stops when the last hop has logged ``status=sent`` for every message;
CPU is the user+system time of the relay processes (and, for Postfix, of
every daemon its master started), the load generator and sink excluded.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "chaos"))

from support import MailhopNode, PostfixInstance, free_port, wait_port  # noqa: E402

T = TypeVar("T")
Link = Callable[[int], int]  # next hop's port -> the port to relay to instead
# The test helper's queue settings retry in seconds; a benchmark runs with the defaults.
QUEUE = 'min_backoff = "5m"\nmax_backoff = "1h"\nrun_delay = "60s"\n'


class Sink:
    """Postfix's smtp-sink (C): accepts everything, stores nothing."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(["smtp-sink", "-u", "postfix", f"127.0.0.1:{self.port}",
                                      "1024"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port("127.0.0.1", self.port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def load(port: int, messages: int, sessions: int, size: int,
         rate: float | None = None) -> dict:
    """mailhop's pipelining load generator in its own process; its JSON result."""
    cmd = [sys.executable, "-m", "mailhop.tools.loadgen", f"127.0.0.1:{port}", "-m",
           str(messages), "-s", str(sessions), "-l", str(size), "--json"]
    if rate:
        cmd += ["--rate", str(rate)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    result = json.loads(out.stdout)
    if result["acked"] != messages:
        raise SystemExit(f"only {result['acked']} of {messages} accepted: {result['errors']}")
    return result


def wait_sent(log: Path, messages: int, timeout: float = 3600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and log.read_bytes().count(b"status=sent") >= messages:
            return
        time.sleep(0.05)
    raise SystemExit(f"timed out: {log} has fewer than {messages} sent")


_TICK = os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: int) -> tuple[int, float]:
    """(parent pid, CPU seconds of the process and of its reaped children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[1]), sum(int(f) for f in fields[11:15]) / _TICK


def tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` and every live descendant (dead ones are in cutime)."""
    parents: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError):
                parents[int(entry)] = _proc_stat(int(entry))
    total, frontier = 0.0, {root}
    while frontier:
        total += sum(parents[p][1] for p in frontier if p in parents)
        frontier = {p for p, (ppid, _) in parents.items() if ppid in frontier}
    return total


@dataclass
class Chain:
    name: str
    entry_port: int
    last_log: Path
    roots: list[int]
    stops: list[Callable[[], None]]

    def cpu(self) -> float:
        return sum(tree_cpu(pid) for pid in self.roots)

    def stop(self) -> None:
        for stop in self.stops:
            with contextlib.suppress(Exception):
                stop()


def _in_a_row(hops: int, sink_port: int, link: Link | None,
              start: Callable[[int, int], T]) -> list[T]:
    """``start(i, next_port)`` for the last hop first; ``link`` goes after the first hop.

    Returned last hop first, so ``[0]`` is the one whose log counts deliveries.
    """
    relays: list[T] = []
    port = sink_port
    for i in reversed(range(hops)):
        if i == 0 and link is not None and hops > 1:
            port = link(port)
        relays.append(start(i, port))
        port = relays[-1].port  # type: ignore[attr-defined]
    return relays


def mailhop_chain(work: Path, hops: int, sink_port: int, sessions: int,
                  link: Link | None = None) -> Chain:
    hop = f'tls = "none"\nmax_connections = {sessions}\n'
    listen = "max_connections_per_ip = 1000\n"
    nodes = _in_a_row(hops, sink_port, link, lambda i, port: MailhopNode(
        work / f"node{i}", name=f"node{i}", relay=f"[127.0.0.1]:{port}", hop=hop,
        listen=listen, queue=QUEUE).start())
    assert all(n.proc is not None for n in nodes)
    return Chain("mailhop", nodes[-1].port, nodes[0].maillog,
                 [n.proc.pid for n in nodes], [n.stop for n in nodes])  # type: ignore[union-attr]


def postfix_chain(work: Path, hops: int, sink_port: int, sessions: int,
                  link: Link | None = None) -> Chain:
    extra = (f"default_destination_concurrency_limit = {sessions}\n"
             "smtpd_client_connection_count_limit = 0\ndefault_process_limit = 200\n"
             "smtp_tls_security_level = none\n")
    instances = _in_a_row(hops, sink_port, link, lambda i, port: PostfixInstance(
        work / f"postfix{i}", relayhost=f"[127.0.0.1]:{port}", main_extra=extra).start())
    roots = [int((pf.dir / "queue" / "pid" / "master.pid").read_text().split()[0])
             for pf in instances]
    return Chain("postfix", instances[-1].port, instances[0].maillog, roots,
                 [pf.stop for pf in instances])


CHAINS = {"mailhop": mailhop_chain, "postfix": postfix_chain}


@contextlib.contextmanager
def running(kind: str, work: Path, hops: int, sink_port: int, sessions: int,
            link: Link | None = None) -> Iterator[Chain]:
    chain = CHAINS[kind](work, hops, sink_port, sessions, link)
    try:
        yield chain
    finally:
        chain.stop()


def throughput(kind: str, hops: int, messages: int, sessions: int, size: int,
               link: Link | None = None) -> tuple[float, float]:
    """Messages per second through a fresh chain, and the relays' CPU seconds per message."""
    sink = Sink()
    try:
        with tempfile.TemporaryDirectory(prefix="mailhop-bench-") as tmp, \
                running(kind, Path(tmp), hops, sink.port, sessions, link) as chain:
            cpu = chain.cpu()
            started = time.perf_counter()
            load(chain.entry_port, messages, sessions, size)
            wait_sent(chain.last_log, messages)
            seconds = time.perf_counter() - started
            cpu = chain.cpu() - cpu
    finally:
        sink.stop()
    return messages / seconds, cpu / messages


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]
