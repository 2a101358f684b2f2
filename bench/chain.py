"""Two-hop end-to-end throughput: mailhop ingress -> egress vs Postfix A -> B, same run.

    load generator -> ingress -> egress -> smtp-sink      (mailhop)
    load generator -> Postfix A (relayhost=[B]) -> Postfix B (relayhost=[sink]) -> smtp-sink

Both chains fsync every message before each 250 (mailhop: SQLite WAL
``synchronous=FULL`` with group commit; Postfix: its queue files).  The
same pipelining load generator feeds both, the same ``smtp-sink`` (from the
postfix package, C) swallows the output, and the clock stops when the last
hop has logged ``status=sent`` for every message.

    python bench/chain.py [--messages 20000] [--sessions 20] [--sizes 4096,102400] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support import MailhopNode, PostfixInstance, free_port, wait_port


class Sink:
    """Postfix's smtp-sink: accepts everything, stores nothing."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(["smtp-sink", "-u", "postfix", f"127.0.0.1:{self.port}",
                                      "1024"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port("127.0.0.1", self.port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def load(port: int, messages: int, sessions: int, size: int) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mailhop.tools.loadgen", f"127.0.0.1:{port}", "-m",
         str(messages), "-s", str(sessions), "-l", str(size), "--json"],
        capture_output=True, text=True, timeout=3600)
    result = json.loads(out.stdout)
    if result["acked"] != messages:
        raise SystemExit(f"only {result['acked']} of {messages} accepted: {result['errors']}")


def wait_sent(log: Path, messages: int, timeout: float = 3600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and log.read_bytes().count(b"status=sent") >= messages:
            return
        time.sleep(0.1)
    raise SystemExit(f"timed out: {log} has fewer than {messages} sent")


def run_mailhop(work: Path, messages: int, sessions: int, size: int) -> float:
    sink = Sink()
    hop = f'tls = "none"\nmax_connections = {sessions}\n'
    listen = "max_connections_per_ip = 1000\n"
    egress = MailhopNode(work / "egress", name="egress", relay=f"[127.0.0.1]:{sink.port}",
                         hop=hop, listen=listen).start()
    ingress = MailhopNode(work / "ingress", name="ingress", relay=f"[127.0.0.1]:{egress.port}",
                          hop=hop, listen=listen).start()
    try:
        started = time.perf_counter()
        load(ingress.port, messages, sessions, size)
        wait_sent(egress.maillog, messages)
        return time.perf_counter() - started
    finally:
        ingress.stop()
        egress.stop()
        sink.stop()


def run_postfix(work: Path, messages: int, sessions: int, size: int) -> float:
    sink = Sink()
    extra = (f"default_destination_concurrency_limit = {sessions}\n"
             "smtpd_client_connection_count_limit = 0\ndefault_process_limit = 200\n"
             "smtp_tls_security_level = none\n")
    b = PostfixInstance(work / "postfix-b", relayhost=f"[127.0.0.1]:{sink.port}",
                        main_extra=extra).start()
    a = PostfixInstance(work / "postfix-a", relayhost=f"[127.0.0.1]:{b.port}",
                        main_extra=extra).start()
    try:
        started = time.perf_counter()
        load(a.port, messages, sessions, size)
        wait_sent(b.maillog, messages)
        return time.perf_counter() - started
    finally:
        a.stop()
        b.stop()
        sink.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--large-messages", type=int, default=5000,
                        help="messages for sizes over 64 KiB")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--sizes", default="4096,102400")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run, no claims")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.messages, args.large_messages = 200, 50
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        n = args.messages if size <= 65536 else args.large_messages
        with tempfile.TemporaryDirectory(prefix="mailhop-chain-") as tmp:
            m = n / run_mailhop(Path(tmp), n, args.sessions, size)
        with tempfile.TemporaryDirectory(prefix="mailhop-chain-") as tmp:
            p = n / run_postfix(Path(tmp), n, args.sessions, size)
        rows.append({"size": size, "messages": n, "mailhop_msg_s": round(m, 1),
                     "postfix_msg_s": round(p, 1), "ratio": round(m / p, 2)})
    print(f"two-hop end to end, {args.sessions} sessions, fsync before every 250 on every hop")
    print(f"  {'size':>8} {'messages':>9} {'mailhop msg/s':>14} {'postfix msg/s':>14} "
          f"{'ratio':>7}")
    for r in rows:
        print(f"  {r['size']:>8} {r['messages']:>9} {r['mailhop_msg_s']:>14.1f} "
              f"{r['postfix_msg_s']:>14.1f} {r['ratio']:>6.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "chain", "date": time.strftime("%Y-%m-%d"),
                                         "sessions": args.sessions, "rows": rows}, indent=2)
                             + "\n")


if __name__ == "__main__":
    main()
