"""Long variants of the fault-injection scenarios, with a summary table.

    python tests/chaos/run.py [--kills 50] [--outage 20] [--seed 1]

Each scenario runs a real ingress -> egress -> sink chain on loopback under
continuous load and reports: messages acked (250 from the ingress),
delivered to the sink, lost (acked but never delivered: must be 0) and
duplicates (at-least-once delivery; should stay rare).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Outcome, scenario_kill9, scenario_lossy, scenario_outage, table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--outage", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    results: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="mailhop-chaos-") as tmp:
        work = Path(tmp)
        results.append(scenario_kill9(work / "kill9", kills=args.kills, seed=args.seed))
        results.append(scenario_outage(work / "outage", outage=args.outage)[0])
        results.append(scenario_lossy(work / "lossy", seconds=30.0))
    print(f"mailhop chaos run, {time.strftime('%Y-%m-%d')}, seed {args.seed}")
    print(table(results))
    return 0 if all(r.lost == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
