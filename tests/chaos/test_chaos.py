"""CI variants of the fault-injection scenarios (long variants: tests/chaos/run.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from harness import scenario_kill9, scenario_lossy, scenario_outage

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
