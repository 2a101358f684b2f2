"""Pacing to a provider's quota, SES-style throttling replies, failover between next hops."""

from __future__ import annotations

import re
import smtplib
import sys
import time
from pathlib import Path

import pytest
from support import MailhopNode, mailhop, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "chaos"))
from harness import CountingSink

from mailhop.tools.loadgen import run_load


def submit_many(node: MailhopNode, n: int) -> None:
    import asyncio

    result = asyncio.run(run_load(node.host, node.port, messages=n, sessions=4, size=512,
                                  prefix=f"pace{time.time_ns():x}"))
    assert len(result.acked) == n


@pytest.mark.parametrize(("sink_rate", "max_rate"), [(0.0, "20/s"), (10.0, "20/s")])
def test_pacing_and_throttling(tmp_path: Path, sink_rate: float, max_rate: str) -> None:
    sink = CountingSink(tmp_path, max_rate=sink_rate).start()
    node = MailhopNode(tmp_path / "node", relay=f"[127.0.0.1]:{sink.port}",
                       hop=f'tls = "none"\nmax_rate = "{max_rate}"\nmax_connections = 4\n',
                       queue='min_backoff = "1s"\nmax_backoff = "2s"\n').start()
    try:
        started = time.monotonic()
        submit_many(node, 60)
        wait_for(lambda: sum(sink.tokens().values()) >= 60, timeout=60, what="60 deliveries")
        elapsed = time.monotonic() - started
        log = node.log()
        throttled = log.count("Throttling failure")
        assert "status=bounced" not in log  # waiting, never refusing or bouncing
        assert elapsed >= 60 / 20 - 0.5, f"not paced: {elapsed:.1f}s"
        if sink_rate:  # the provider allows less than configured: slow down by itself
            assert "is throttling" in log and "pacing at 10/s" in log
            assert throttled <= 20, f"{throttled} throttling replies"
        else:
            assert throttled == 0
        status = mailhop("status", "--spool", str(node.spool), "--json")
        assert status.returncode == 0, status.stderr
    finally:
        node.stop()
        sink.stop()


def test_failover_and_return(tmp_path: Path) -> None:
    primary = MailhopNode(tmp_path / "primary", name="primary", relay=None,
                          extra="[queue]\nhold_delivery = true\n").start()
    backup = MailhopNode(tmp_path / "backup", name="backup", relay=None,
                         extra="[queue]\nhold_delivery = true\n").start()
    node = MailhopNode(tmp_path / "node", relay=f"[127.0.0.1]:{primary.port}",
                       hop='tls = "none"\nfallback = ["backup"]\nfailure_threshold = 1\n'
                           'probe_interval = "1s"\n',
                       extra=f'[nexthop.backup]\nhost = "[127.0.0.1]"\nport = {backup.port}\n'
                             'tls = "none"\n').start()

    def send(tag: str) -> None:
        with smtplib.SMTP(node.host, node.port) as s:
            s.sendmail("app@example.com", ["user@example.com"],
                       f"Subject: {tag}\r\n\r\nx\r\n".encode())

    try:
        send("one")
        wait_for(lambda: len(primary.queue()) == 1, timeout=20, what="delivery to the primary")
        primary.stop()
        started = time.monotonic()
        send("two")
        wait_for(lambda: len(backup.queue()) == 1, timeout=20, what="failover")
        assert time.monotonic() - started < 5
        assert "next hop next is down after 1 failed connection" in node.log()
        assert re.search(r"next hop next is down: 1 job\(s\) go to fallback backup", node.log())
        status = mailhop("status", "--spool", str(node.spool))
        out = status.stdout
        assert status.returncode == 0, status.stderr
        assert re.search(r"^next\s+down\s", out, re.M) and re.search(r"^backup\s+up\s", out, re.M)
        primary.start()  # same port, same spool: it comes back
        wait_for(lambda: "next hop next is up again" in node.log(), timeout=20)
        send("three")
        wait_for(lambda: len(primary.queue()) == 2, timeout=20, what="traffic back on primary")
        assert len(backup.queue()) == 1
    finally:
        node.stop()
        primary.stop()
        backup.stop()
