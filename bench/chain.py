"""Relay throughput, end to end: mailhop vs Postfix, one hop and two hops, same run.

    load generator -> ingress [-> egress] -> smtp-sink         (mailhop)
    load generator -> Postfix A [-> Postfix B] -> smtp-sink     (relayhost=[next])

Both fsync every message before each 250 on every hop (mailhop: SQLite WAL
``synchronous=FULL`` with group commit; Postfix: its queue files).  The same
pipelining load generator feeds both, the same ``smtp-sink`` (C) swallows
the output, and the clock stops when the last hop has logged
``status=sent`` for every message.  CPU per message is the relays' user +
system time divided by the messages.

    python bench/chain.py [--messages 20000] [--sessions 20] [--sizes 4096,102400]
                          [--hops 2,1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import throughput


def measure(kind: str, hops: int, messages: int, sessions: int, size: int) -> dict:
    rate, cpu = throughput(kind, hops, messages, sessions, size)
    return {"msg_s": round(rate, 1), "cpu_ms_per_msg": round(cpu * 1000, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--large-messages", type=int, default=20000,
                        help="messages for sizes over 64 KiB")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--sizes", default="4096,102400")
    parser.add_argument("--hops", default="2,1")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run, no claims")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.messages, args.large_messages = 200, 50
    rows = []
    for hops in (int(h) for h in args.hops.split(",")):
        for size in (int(s) for s in args.sizes.split(",")):
            n = args.messages if size <= 65536 else args.large_messages
            m = measure("mailhop", hops, n, args.sessions, size)
            p = measure("postfix", hops, n, args.sessions, size)
            rows.append({"hops": hops, "size": size, "messages": n,
                         "mailhop_msg_s": m["msg_s"], "postfix_msg_s": p["msg_s"],
                         "ratio": round(m["msg_s"] / p["msg_s"], 2),
                         "mailhop_cpu_ms": m["cpu_ms_per_msg"],
                         "postfix_cpu_ms": p["cpu_ms_per_msg"]})
    print(f"relay throughput, {args.sessions} sessions, fsync before every 250 on every hop")
    print(f"  {'hops':>4} {'size':>7} {'messages':>8} {'mailhop msg/s':>14} "
          f"{'postfix msg/s':>14} {'ratio':>7} {'CPU ms/msg mailhop':>19} {'postfix':>8}")
    for r in rows:
        print(f"  {r['hops']:>4} {r['size']:>7} {r['messages']:>8} {r['mailhop_msg_s']:>14.1f} "
              f"{r['postfix_msg_s']:>14.1f} {r['ratio']:>6.2f}x {r['mailhop_cpu_ms']:>19.2f} "
              f"{r['postfix_cpu_ms']:>8.2f}")
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "chain", "date": time.strftime("%Y-%m-%d"),
                                         "sessions": args.sessions, "rows": rows}, indent=2)
                             + "\n")


if __name__ == "__main__":
    main()
