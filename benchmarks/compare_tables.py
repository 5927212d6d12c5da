"""Compare the winners of two tuned tables (e.g. a one-GPU and a multi-GPU run of one problem).

    python benchmarks/compare_tables.py A.json B.json

Prints one line per (stage, token bucket): whether both tables chose the same config (and tile
order) and, where they differ, each winner's median time and whether the gap is noise: the two
medians within 3% of each other, or either median inside the other's p20-p80 spread. Where a
table's runner-up is the other table's winner, that run timed both configs itself; its own gap
is shown too. Always exits 0 for readable tables: differences are information, not failures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from autotune.cache import BucketEntry, TunedTable

NOISE = 0.03  # relative gap between medians below which two winners count as equally fast


def _entries(path: Path) -> dict[tuple[str, int], BucketEntry]:
    """(stage, bucket) -> bucket entry of a tuned-table file, under any file name."""
    table = TunedTable.from_json(json.loads(path.read_text(encoding="utf-8")), source=path)
    return {(stage, bucket): entry for stage, per in table.entries.items()
            for bucket, entry in per.items()}


def _winner(entry: BucketEntry) -> str:
    return f"{entry.winner.name}@{entry.order}"


def _within_noise(a: BucketEntry, b: BucketEntry) -> bool:
    ma, mb = a.median_ms, b.median_ms
    return (abs(ma - mb) <= NOISE * min(ma, mb) or a.p20_ms <= mb <= a.p80_ms
            or b.p20_ms <= ma <= b.p80_ms)


def _own_gap(entry: BucketEntry, other_winner: str) -> str:
    """This run's own time of the other run's winner, when it was this run's runner-up."""
    if entry.runner_up is None or entry.runner_up.name != other_winner or not entry.runner_up_ms:
        return ""
    return f" (it timed the other's winner {entry.runner_up_ms / entry.median_ms - 1:+.1%})"


def compare(a: dict[tuple[str, int], BucketEntry],
            b: dict[tuple[str, int], BucketEntry]) -> list[str]:
    """The report lines for two tables' entries."""
    lines, counts = [], {"same": 0, "noise": 0, "differ": 0}
    for key in sorted(a.keys() | b.keys()):
        stage, bucket = key
        head = f"{stage:>5} t={bucket:<5}"
        if key not in a or key not in b:
            lines.append(f"{head} only in {'A' if key in a else 'B'}")
            continue
        ea, eb = a[key], b[key]
        if _winner(ea) == _winner(eb):
            counts["same"] += 1
            lines.append(f"{head} same    {_winner(ea)}  {ea.median_ms:.4f} vs "
                         f"{eb.median_ms:.4f} ms")
            continue
        noise = _within_noise(ea, eb)
        counts["noise" if noise else "differ"] += 1
        lines.append(f"{head} {'noise ' if noise else 'DIFFER'}  "
                     f"A {_winner(ea)} {ea.median_ms:.4f} ms{_own_gap(ea, eb.winner.name)}  |  "
                     f"B {_winner(eb)} {eb.median_ms:.4f} ms{_own_gap(eb, ea.winner.name)}  "
                     f"gap {eb.median_ms / ea.median_ms - 1:+.1%}")
    lines.append(f"{counts['same']} same winners, {counts['noise']} different within noise "
                 f"(<= {NOISE:.0%} or inside p20-p80), {counts['differ']} different beyond it")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path, help="tuned table A (JSON)")
    p.add_argument("b", type=Path, help="tuned table B (JSON)")
    args = p.parse_args()
    print(f"A: {args.a}\nB: {args.b}")
    print("\n".join(compare(_entries(args.a), _entries(args.b))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
