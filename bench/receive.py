"""Durable accept rate: mailhop's listener vs Postfix's smtpd, same machine, same run.

Both sides fsync every message before their 250 (mailhop: SQLite WAL with
synchronous=FULL and group commit; Postfix: its queue file fsync).  Neither
delivers onward: mailhop has no next hop configured here, Postfix defers
its smtp transport.  Two clients load both servers the same way:
mailhop's pipelining load generator (one round trip per message, as a
relay's client sends), and Postfix's own ``smtp-source`` (no pipelining:
four round trips per message).

    python bench/receive.py [--messages 20000] [--sessions 20] [--size 4096] [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support import MailhopNode, PostfixInstance


def smtp_source(port: int, messages: int, sessions: int, size: int) -> float:
    started = time.perf_counter()
    subprocess.run(
        ["smtp-source", "-d", "-s", str(sessions), "-m", str(messages), "-l", str(size),
         "-f", "bench@example.org", "-t", "sink@example.com", f"127.0.0.1:{port}"],
        check=True, capture_output=True, timeout=1800)
    return time.perf_counter() - started


def pipelined(port: int, messages: int, sessions: int, size: int) -> float:
    out = subprocess.run(
        [sys.executable, "-m", "mailhop.tools.loadgen", f"127.0.0.1:{port}", "-m", str(messages),
         "-s", str(sessions), "-l", str(size), "--json"],
        check=True, capture_output=True, text=True, timeout=1800)
    result = json.loads(out.stdout)
    if result["acked"] != messages:
        raise SystemExit(f"only {result['acked']} of {messages} acked: {result['errors']}")
    return float(result["seconds"])


CLIENTS = {"pipelining": pipelined, "smtp-source": smtp_source}


def bench_mailhop(work: Path, client: str, messages: int, sessions: int, size: int) -> float:
    node = MailhopNode(work / f"mailhop-{client}", name="bench", relay=None,
                       listen="max_connections_per_ip = 1000\n",
                       extra="[queue]\nhold_delivery = true\n").start()
    try:
        elapsed = CLIENTS[client](node.port, messages, sessions, size)
        queued = len(node.queue())
        if queued != messages:
            raise SystemExit(f"mailhop queued {queued} of {messages}")
        return elapsed
    finally:
        node.stop()


def bench_postfix(work: Path, client: str, messages: int, sessions: int, size: int) -> float:
    pf = PostfixInstance(work / f"postfix-{client}", relayhost="[127.0.0.1]:9",
                         main_extra="defer_transports = smtp\n"
                                    "smtpd_client_connection_count_limit = 0\n"
                                    "default_process_limit = 100\n")
    pf.start()
    try:
        return CLIENTS[client](pf.port, messages, sessions, size)
    finally:
        pf.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run, no claims")
    parser.add_argument("--json", type=Path, help="write results here")
    args = parser.parse_args()
    if args.quick:
        args.messages = 200
    for tool in ("smtp-source", "postfix"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            raise SystemExit(f"{tool} not found: apt-get install postfix")
    rows = []
    with tempfile.TemporaryDirectory(prefix="mailhop-bench-") as tmp:
        work = Path(tmp)
        for client in CLIENTS:
            m = args.messages / bench_mailhop(work, client, args.messages, args.sessions,
                                              args.size)
            p = args.messages / bench_postfix(work, client, args.messages, args.sessions,
                                              args.size)
            rows.append({"client": client, "mailhop_msg_s": round(m, 1),
                         "postfix_msg_s": round(p, 1), "ratio": round(m / p, 2)})
    print(f"durable accept: {args.size} B messages, {args.sessions} sessions, "
          f"{args.messages} messages, fsync before every 250 on both sides")
    print(f"  {'client':<12} {'mailhop msg/s':>14} {'postfix msg/s':>14} {'ratio':>7}")
    for row in rows:
        print(f"  {row['client']:<12} {row['mailhop_msg_s']:>14.1f} {row['postfix_msg_s']:>14.1f}"
              f" {row['ratio']:>6.2f}x")
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "receive", "date": time.strftime("%Y-%m-%d"),
            "messages": args.messages, "sessions": args.sessions, "size": args.size,
            "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
