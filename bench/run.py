"""All of mailhop's benchmarks in one run: one table, one JSON file.

    python bench/run.py [--quick] [--json bench/results/latest.json]

Each benchmark runs mailhop and, in the same run on the same machine, the
peer it is compared with (Postfix, fsync on both sides):

* ``chain.py``   relay throughput end to end, two hops and one hop, 4 KiB and
                 100 KiB, 20 sessions; CPU seconds per message of the relays
* ``latency.py`` p50/p99 submit-to-arrival over two hops at 100 and 200 msg/s
* ``rtt.py``     two hops with a 50 ms RTT link between them, 20 connections
* ``receive.py`` durable accept rate of one node (pipelining and smtp-source)
* ``memory.py``  RSS per idle connection, plain and after STARTTLS

``--quick`` is the CI smoke run: tiny sizes, no claims.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("chain", "latency", "rtt", "receive", "memory")


def run(name: str, quick: bool) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, str(HERE / f"{name}.py"), "--json", out.name]
        if quick:
            cmd.append("--quick")
        subprocess.run(cmd, check=True)
        return json.loads(Path(out.name).read_text())


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} cores, {model}, Linux {platform.release()}, " \
           f"Python {platform.python_version()}"


def table(results: dict) -> list[str]:
    rows = [f"| {'benchmark':<44} | {'mailhop':>11} | {'Postfix':>11} | {'ratio':>6} |",
            f"|{'-' * 46}|{'-' * 13}|{'-' * 13}|{'-' * 8}|"]

    def row(label: str, m: str, p: str, ratio: str) -> None:
        rows.append(f"| {label:<44} | {m:>11} | {p:>11} | {ratio:>6} |")

    for r in results["chain"]["rows"]:
        hops = "two-hop" if r["hops"] == 2 else "one-hop"
        row(f"{hops} throughput, {r['size'] // 1024} KiB", f"{r['mailhop_msg_s']:.0f} msg/s",
            f"{r['postfix_msg_s']:.0f} msg/s", f"{r['ratio']:.2f}x")
    for r in results["chain"]["rows"]:
        hops = "two-hop" if r["hops"] == 2 else "one-hop"
        row(f"{hops} CPU per message, {r['size'] // 1024} KiB", f"{r['mailhop_cpu_ms']:.2f} ms",
            f"{r['postfix_cpu_ms']:.2f} ms",
            f"{r['postfix_cpu_ms'] / r['mailhop_cpu_ms']:.2f}x")
    for lat in results["latency"]["runs"]:
        for p in ("p50", "p99"):
            m, q = lat["rows"]["mailhop"][f"{p}_ms"], lat["rows"]["postfix"][f"{p}_ms"]
            row(f"two-hop latency {p} at {lat['rate']:.0f} msg/s", f"{m:.1f} ms",
                f"{q:.1f} ms", f"{q / m:.1f}x")
    rtt = results["rtt"]
    row(f"two-hop, {rtt['rtt_ms']:.0f} ms RTT link, {rtt['connections']} connections",
        f"{rtt['mailhop_msg_s']:.0f} msg/s", f"{rtt['postfix_msg_s']:.0f} msg/s",
        f"{rtt['ratio']:.2f}x")
    for r in results["receive"]["rows"]:
        row(f"durable accept, one node, {r['client']}", f"{r['mailhop_msg_s']:.0f} msg/s",
            f"{r['postfix_msg_s']:.0f} msg/s", f"{r['ratio']:.2f}x")
    for kind, kib in results["memory"]["kib_per_connection"].items():
        row(f"RSS per idle connection, {kind}", f"{kib:.1f} KiB", "", "")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    started = time.time()
    results = {name: run(name, args.quick) for name in names}
    results["machine"] = machine()
    results["date"] = time.strftime("%Y-%m-%d")
    print(f"\nmailhop benchmarks, {results['date']}, {results['machine']}, "
          f"{time.time() - started:.0f}s" + (" (quick: no claims)" if args.quick else ""))
    print("ratio: how many times better mailhop is (throughput, or the inverse for CPU and "
          "latency)")
    if all(name in results for name in BENCHMARKS):
        print("\n".join(table(results)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
