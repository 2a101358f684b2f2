"""Prometheus metrics and a health endpoint for one node.

``[metrics] address = "127.0.0.1:9125"`` serves ``/metrics`` (prometheus-client's
text format) and ``/healthz``: 200 when the process is up, the spool takes a
commit and at least one next hop is usable; 503 with the reasons otherwise.
Queue depth and the oldest message's age are read from the spool at scrape
time, so they are never stale.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

DELAY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 14400, 86400)
COMMIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class _QueueCollector(Collector):
    """Queue depth by recipient state and the age of the oldest message, from the spool."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("mailhop_queue_recipients", "Recipients in the queue by state",
                                  labels=["state"])
        oldest = GaugeMetricFamily("mailhop_queue_oldest_message_age_seconds",
                                   "Age of the oldest queued message")
        messages = GaugeMetricFamily("mailhop_queue_messages", "Messages in the queue")
        try:
            db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=2)
            try:
                counts = dict(db.execute("SELECT state, count(*) FROM recipient GROUP BY state"))
                first, total = db.execute("SELECT min(arrival), count(*) FROM message").fetchone()
            finally:
                db.close()
        except sqlite3.Error:
            return
        for state in ("queued", "deferred", "sent", "bounced"):
            depth.add_metric([state], counts.get(state, 0))
        oldest.add_metric([], time.time() - first if first else 0.0)
        messages.add_metric([], total)
        yield depth
        yield messages
        yield oldest


class Metrics:
    def __init__(self, db_path: Path) -> None:
        r = self.registry = CollectorRegistry()
        self.received = Counter("mailhop_messages_received_total",
                                "Messages accepted (250 to DATA)", ["listener"], registry=r)
        self.rejected = Counter("mailhop_rejects_total", "Commands refused by policy or limits",
                                ["listener", "stage"], registry=r)
        self.connections = Counter("mailhop_connections_total", "SMTP connections accepted",
                                   ["listener"], registry=r)
        self.refused_connections = Counter("mailhop_connections_refused_total",
                                           "Connections refused with 421", ["listener"],
                                           registry=r)
        self.active = Gauge("mailhop_connections_active", "Open SMTP sessions", ["listener"],
                            registry=r)
        self.deliveries = Counter("mailhop_deliveries_total",
                                  "Recipient delivery attempts by result",
                                  ["hop", "status"], registry=r)
        self.bounces = Counter("mailhop_bounces_generated_total", "DSNs queued to senders",
                               registry=r)
        self.delay = Histogram("mailhop_delivery_delay_seconds",
                               "From arrival to a final result (sent or bounced)", ["hop"],
                               buckets=DELAY_BUCKETS, registry=r)
        self.hop_up = Gauge("mailhop_hop_up", "1 if the next hop is usable, 0 if suspended",
                            ["hop"], registry=r)
        self.rate_wait = Counter("mailhop_rate_limit_wait_seconds_total",
                                 "Time deliveries waited for a hop's max_rate", ["hop"],
                                 registry=r)
        self.commit = Histogram("mailhop_spool_commit_seconds", "Spool group commit latency",
                                buckets=COMMIT_BUCKETS, registry=r)
        r.register(_QueueCollector(db_path))

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def serve(host: str, port: int, metrics: Metrics,
                health: Callable[[], Awaitable[list[str]]]) -> asyncio.AbstractServer:
    """A minimal HTTP/1.0 server for /metrics and /healthz (nothing else is needed)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            path = parts[1] if len(parts) > 1 else "/"
            if path.startswith("/metrics"):
                body = await asyncio.to_thread(metrics.render)
                status, ctype = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
            elif path.startswith("/healthz"):
                problems = await health()
                status = "200 OK" if not problems else "503 Service Unavailable"
                body = ("ok\n" if not problems else "\n".join(problems) + "\n").encode()
                ctype = "text/plain; charset=utf-8"
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"try /metrics or /healthz\n"
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, OSError, UnicodeDecodeError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, reuse_address=True)
