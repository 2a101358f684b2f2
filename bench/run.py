"""All of mailhop's benchmarks in one run: one table, one JSON file.

    python bench/run.py [--quick] [--json bench/results/latest.json]

Runs, each against a peer measured in the same run where there is one:
durable accept (bench/receive.py), two-hop end to end (bench/chain.py) and
memory per idle connection (bench/memory.py).  ``--quick`` is the CI smoke
run: tiny sizes, no claims.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(script: str, quick: bool) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, str(HERE / script), "--json", out.name]
        if quick:
            cmd.append("--quick")
        subprocess.run(cmd, check=True)
        return json.loads(Path(out.name).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    started = time.time()
    results = {name: run(f"{name}.py", args.quick) for name in ("receive", "chain", "memory")}
    print(f"\nmailhop benchmarks, {time.strftime('%Y-%m-%d')}, "
          f"{time.time() - started:.0f}s" + (" (quick: no claims)" if args.quick else ""))
    print(f"  {'benchmark':<34} {'mailhop':>12} {'postfix':>12} {'ratio':>7}")
    for row in results["receive"]["rows"]:
        print(f"  {'accept, ' + row['client']:<34} {row['mailhop_msg_s']:>8.0f}/s "
              f"{row['postfix_msg_s']:>8.0f}/s {row['ratio']:>6.2f}x")
    for row in results["chain"]["rows"]:
        label = f"two-hop e2e, {row['size'] // 1024} KiB"
        print(f"  {label:<34} {row['mailhop_msg_s']:>8.0f}/s "
              f"{row['postfix_msg_s']:>8.0f}/s {row['ratio']:>6.2f}x")
    for kind, kib in results["memory"]["kib_per_connection"].items():
        print(f"  {'RSS per idle connection, ' + kind:<34} {kib:>7.1f} KiB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
