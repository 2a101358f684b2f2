"""CI variants of the fault-injection scenarios (long variants: tests/chaos/run.py)."""

from __future__ import annotations

import re
import smtplib
from pathlib import Path

import pytest
from harness import Chain, FaultyProxy, scenario_kill9, scenario_lossy, scenario_outage
from support import mailhop, wait_for

pytestmark = pytest.mark.chaos


def test_kill9_loop_loses_nothing(tmp_path: Path) -> None:
    result = scenario_kill9(tmp_path, kills=10, seed=7)
    print(f"\n{result}")
    assert result.acked > 100, "the load generator barely got through"
    assert result.lost == 0, result
    assert result.delivered == result.acked
    assert result.duplicate_rate < 0.05, f"duplicates are not rare: {result}"


def test_next_hop_outage_defers_then_drains(tmp_path: Path) -> None:
    result, log = scenario_outage(tmp_path, outage=3.0)
    print(f"\n{result}")
    assert result.lost == 0 and result.acked > 50
    assert re.search(r"dsn=4\.4\.1, status=deferred \(connect to 127\.0\.0\.1\[127\.0\.0\.1\]"
                     r":\d+: Connection refused\)", log)
    assert "delivery temporarily suspended" in log  # the dead hop is not hammered


def test_lossy_link_retries_and_loses_nothing(tmp_path: Path) -> None:
    result = scenario_lossy(tmp_path, seconds=6.0)
    print(f"\n{result}")
    assert result.lost == 0, result
    assert result.acked > 50
    faults = result.faults  # type: ignore[attr-defined]
    for kind in ("greeting", "mid-DATA", "after final dot"):
        assert faults.get(kind, 0) >= 1, f"no {kind} reset happened: {faults}"


def test_black_holed_path_defers_then_recovers(tmp_path: Path) -> None:
    """Connections that open but never answer (a broken international path): defer, retry."""
    proxies: list[FaultyProxy] = []

    def link(egress_port: int) -> int:
        proxies.append(FaultyProxy(egress_port, latency=0.0, fault_every=0).start())
        proxies[0].hang = True
        return proxies[0].port

    chain = Chain(tmp_path, link=link, extra='[delivery]\ngreeting_timeout = "2s"\n').start()
    try:
        with smtplib.SMTP(chain.ingress.host, chain.ingress.port) as s:
            s.sendmail("app@example.com", ["user@example.com"],
                       b"Subject: x\r\nX-Mailhop-Token: hole-1\r\n\r\nx\r\n")
        wait_for(lambda: re.search(r"dsn=4\.4\.2, status=deferred \(conversation with "
                                   r"127\.0\.0\.1\[127\.0\.0\.1\]:\d+ timed out while receiving "
                                   r"the initial server greeting\)", chain.ingress.log()),
                 timeout=20, what="the greeting timeout")
        proxies[0].hang = False
        assert mailhop("queue", "flush", "--spool", str(chain.ingress.spool)).returncode == 0
        wait_for(lambda: chain.sink.tokens().get("hole-1"), timeout=20, what="delivery")
    finally:
        chain.stop()
        for proxy in proxies:
            proxy.stop()
