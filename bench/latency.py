"""End-to-end latency at a fixed rate: mailhop vs Postfix, two hops, same run.

The load generator submits messages into the first hop at a steady rate
(100/s and 200/s by default: on a 2-core machine Postfix's two-hop chain tops
out near 200-250/s, so at 200/s its figure is mostly its queue, at 100/s its
path); a sink built on mailhop's engine notes when each message's token
arrives.  Latency is arrival minus the moment the client
began that message's transaction, so it includes the first hop's fsync,
both queues and both deliveries.

    python bench/latency.py [--rates 100,200] [--seconds 20] [--size 4096] [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import load, percentile, running, wait_sent
from harness import CountingSink


def measure(kind: str, messages: int, rate: float, size: int, sessions: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="mailhop-latency-") as tmp:
        sink = CountingSink(Path(tmp) / "sink", timed=True).start()
        try:
            with running(kind, Path(tmp), 2, sink.port, sessions) as chain:
                result = load(chain.entry_port, messages, sessions, size, rate=rate)
                wait_sent(chain.last_log, messages)
                time.sleep(0.2)
                arrived = sink.arrivals()
        finally:
            sink.stop()
    submitted: dict[str, float] = result["submitted"]
    waits = [arrived[t] - s for t, s in submitted.items() if t in arrived]
    if len(waits) != messages:
        missing = sorted(set(submitted) - set(arrived))[:3]
        raise SystemExit(f"{kind}: {len(waits)} of {messages} arrived; missing {missing} "
                         f"of {len(submitted)}; {len(arrived)} arrived")
    return {"p50_ms": round(percentile(waits, 50) * 1000, 2),
            "p99_ms": round(percentile(waits, 99) * 1000, 2),
            "max_ms": round(max(waits) * 1000, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="100,200", help="messages per second, one run each")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run, no claims")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.rates, args.seconds = "50", 2.0
    runs = []
    for rate in (float(r) for r in args.rates.split(",")):
        messages = int(rate * args.seconds)
        rows = {kind: measure(kind, messages, rate, args.size, args.sessions)
                for kind in ("mailhop", "postfix")}
        runs.append({"rate": rate, "messages": messages, "rows": rows})
    print(f"two-hop latency, submit to arrival, {args.seconds:.0f}s at each rate, "
          f"{args.size}-byte messages")
    print(f"  {'rate':>6} {'':<8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for run in runs:
        for kind, r in run["rows"].items():
            print(f"  {run['rate']:>6.0f} {kind:<8} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
                  f"{r['max_ms']:>8.1f}")
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "latency", "date": time.strftime("%Y-%m-%d"),
                                         "size": args.size, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
