"""Check a comparison (``comparison.json`` of ``python -m dora_lightning.compare``) against issue 13's learning targets.

Targets (per seed-mean of the table): DINO and DoRA above the random init by >= 5 points of k-NN top-1 and >= 2 points
of DAVIS J&F; their teacher entropy <= 0.9 log(out_dim); their feature rank >= half the random network's; DoRA >= DINO
on DAVIS. Prints one line per target (PASS / FAIL / n/a with the numbers) and exits 1 when any measured target fails.

Usage::

    python benchmarks/learning_targets.py bench_out/learning_gpu/comparison.json --out_dim 4096
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

KNN, DAVIS, ENTROPY, RANK = "k-NN top-1 (k=20)", "DAVIS J&F", "teacher entropy", "feature rank"


def check(summary: dict, out_dim: int) -> list[tuple[str, bool | None, str]]:
    """``(target, passed or None when not measured, detail)`` for every target."""

    def value(method: str, column: str) -> float | None:
        cell = summary.get(method, {}).get(column)
        return None if cell is None else float(cell[0])

    results: list[tuple[str, bool | None, str]] = []

    def compare(name: str, left: float | None, right: float | None, margin: float, detail: str) -> None:
        if left is None or right is None:
            results.append((name, None, "not measured"))
        else:
            results.append((name, left >= right + margin, detail.format(left=left, right=right)))

    for method in ("dino", "dora"):
        compare(f"{method} k-NN >= random + 5", value(method, KNN), value("random", KNN), 5.0,
                "{left:.2f} vs random {right:.2f}")  # fmt: skip
        compare(f"{method} DAVIS J&F >= random + 2", value(method, DAVIS), value("random", DAVIS), 2.0,
                "{left:.2f} vs random {right:.2f}")  # fmt: skip
        entropy = value(method, ENTROPY)
        limit = 0.9 * math.log(out_dim)
        compare(f"{method} teacher entropy <= 0.9 log K", limit, entropy, 0.0,
                "limit {left:.3f}, measured {right:.3f}")  # fmt: skip
        rank, random_rank = value(method, RANK), value("random", RANK)
        compare(f"{method} feature rank >= random / 2", rank, None if random_rank is None else random_rank / 2,
                0.0, "{left:.2f} vs half the random's {right:.2f}")  # fmt: skip
    compare(
        "DoRA DAVIS J&F >= DINO", value("dora", DAVIS), value("dino", DAVIS), 0.0, "{left:.2f} vs {right:.2f}"
    )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("comparison", type=Path)
    parser.add_argument("--out_dim", type=int, required=True, help="model.out_dim of the pretrained runs (K)")
    args = parser.parse_args(argv)
    if not args.comparison.is_file():
        print(
            f"error: '{args.comparison}' does not exist; run python -m dora_lightning.compare first",
            file=sys.stderr,
        )
        return 2
    results = check(json.loads(args.comparison.read_text())["summary"], args.out_dim)
    for name, passed, detail in results:
        print(f"{'n/a ' if passed is None else 'PASS' if passed else 'FAIL'}  {name}: {detail}")
    return 1 if any(passed is False for _, passed, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
