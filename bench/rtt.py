"""Throughput over a 50 ms RTT link between the hops: mailhop vs Postfix, same run.

This kernel has no ``netem``, so the link is the reliability harness's
userspace proxy (``tests/chaos/harness.py`` ``FaultyProxy``) with 25 ms each
way and no faults, between the first and the second hop.  Both relays may
open at most 20 connections to the next hop, so what decides the result is
how many round trips a message costs and whether connections are reused.

    python bench/rtt.py [--messages 5000] [--rtt-ms 50] [--connections 20] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import throughput
from harness import FaultyProxy


def measure(kind: str, messages: int, connections: int, size: int, rtt: float) -> float:
    proxies: list[FaultyProxy] = []

    def link(port: int) -> int:
        proxies.append(FaultyProxy(port, latency=rtt / 2, fault_every=0).start())
        return proxies[-1].port

    try:
        return throughput(kind, 2, messages, connections, size, link)[0]
    finally:
        for proxy in proxies:
            proxy.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rtt-ms", type=float, default=50.0)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run, no claims")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.messages = 100
    rtt = args.rtt_ms / 1000
    m = measure("mailhop", args.messages, args.connections, args.size, rtt)
    p = measure("postfix", args.messages, args.connections, args.size, rtt)
    print(f"two hops, {args.rtt_ms:.0f} ms RTT between them, at most {args.connections} "
          f"connections, {args.messages} messages of {args.size} bytes")
    print(f"  mailhop {m:8.1f} msg/s   postfix {p:8.1f} msg/s   ratio {m / p:5.2f}x")
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "rtt", "date": time.strftime("%Y-%m-%d"), "rtt_ms": args.rtt_ms,
            "connections": args.connections, "messages": args.messages, "size": args.size,
            "mailhop_msg_s": round(m, 1), "postfix_msg_s": round(p, 1),
            "ratio": round(m / p, 2)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
