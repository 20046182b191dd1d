"""Is method B better than method A in a benchmark report, or within the noise of the queries?

Reads a ``jobs.benchmark`` report.json (per-query APs per track, method and protocol) and prints, per track and
protocol, the mAP difference B - A with a 95 % paired-bootstrap interval over queries
(:func:`pipeline.evaluation.paired_bootstrap`) and how many queries each method wins.

    python experiments/compare_methods.py runs/bench/report.json rmac rmac_learned
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluation import paired_bootstrap  # noqa: E402


def compare(report: dict, a: str, b: str, protocols: tuple[str, ...] = ("medium", "hard")) -> list[dict]:
    """One row per (track, protocol) where both methods have per-query APs."""
    rows = []
    for track, t in report["tracks"].items():
        m = t["methods"]
        if a not in m or b not in m:
            continue
        for p in protocols:
            ap_a = np.array(m[a][p]["aps"], np.float64)
            ap_b = np.array(m[b][p]["aps"], np.float64)
            if np.all(np.isnan(ap_a)):
                continue
            rows.append({"track": track, "protocol": p, "map_a": 100 * np.nanmean(ap_a),
                         "map_b": 100 * np.nanmean(ap_b), **paired_bootstrap(ap_a, ap_b)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report")
    ap.add_argument("a", help="reference method")
    ap.add_argument("b", help="method compared with it")
    args = ap.parse_args(argv)
    report = json.loads(Path(args.report).read_text())
    rows = compare(report, args.a, args.b)
    if not rows:
        print(f"no track of {args.report} has both {args.a} and {args.b}", file=sys.stderr)
        return 2
    print(f"{'track':10s} {'protocol':8s} {args.a:>20s} {args.b:>20s}   B - A  95% interval    "
          "B wins / loses / queries")
    for r in rows:
        print(f"{r['track']:10s} {r['protocol']:8s} {r['map_a']:20.1f} {r['map_b']:20.1f}  {100 * r['diff']:+5.1f}  "
              f"[{100 * r['low']:+5.1f}, {100 * r['high']:+5.1f}]   {r['better']:3d} / {r['worse']:3d} / {r['n']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
