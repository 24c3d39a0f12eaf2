"""Compare two runs of a kernel benchmark (bench_kernels.py / bench_attention.py JSON), row by row.

    python bench/compare.py before.json after.json [--tolerance 0.03]

Rows are matched by (op, shape, dtype); for each it prints our time in both runs and
after / before. Only runs from the same card in the same device call compare: a freshly
lent machine moves every number by a few percent. Exits 1 if a matched row moved by more
than the tolerance in either direction, or if a row exists in one run only, so a refactor
that must not change any kernel's speed can be checked in one line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys


def rows(path: str) -> tuple[str, dict[tuple[str, str, str], float]]:
    """(card, {(op, shape, dtype): our median time in us}) of one benchmark JSON."""
    with open(path) as f:
        data = json.load(f)
    card = data.get("device") or data.get("card") or "?"
    return card, {(r["op"], r["shape"], r["dtype"]): r["ours_us"] for r in data["results"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--tolerance", type=float, default=0.03, help="largest |after / before - 1| that passes")
    args = ap.parse_args()
    card_a, a = rows(args.before)
    card_b, b = rows(args.after)
    if card_a != card_b:
        print(f"warning: different cards ({card_a} / {card_b}): the ratios mean little")
    ratios = []
    bad = 0
    print(f"{'op':<26} {'shape':<34} {'before us':>10} {'after us':>10} {'after/before':>13}")
    for key in sorted(a.keys() | b.keys()):
        op, shape, _dtype = key
        if key not in a or key not in b:
            print(f"{op:<26} {shape:<34} only in {'after' if key in b else 'before'}")
            bad += 1
            continue
        r = b[key] / a[key]
        ratios.append(r)
        flag = "" if abs(r - 1) <= args.tolerance else "  <-- moved"
        bad += bool(flag)
        print(f"{op:<26} {shape:<34} {a[key]:10.1f} {b[key]:10.1f} {r:13.3f}{flag}")
    if ratios:
        print(f"\n{len(ratios)} rows: after/before median {statistics.median(ratios):.3f}, "
              f"min {min(ratios):.3f}, max {max(ratios):.3f}; {bad} outside +-{args.tolerance:.0%}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
