"""k-NN benchmark: throughput and peak memory of evaluators.knn.evaluator.knn_classify on CPU.

A bank of 100k x 384 L2-normalised features (ViT-S/16 CLS size) and 10k queries, 1,000 classes, k in {10, 20, 100, 200},
T = 0.07, scored in chunks of ``--chunk-size`` queries (never a full 10k x 100k similarity matrix). Peak memory is the
process's max RSS, measured in a fresh subprocess per chunk size, next to the RSS after the features are built.

    python benchmarks/bench_knn.py --out bench_out/bench_knn.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
import time

import torch


def run_case(bank: int, queries: int, dim: int, classes: int, chunk_size: int, threads: int) -> dict:
    from evaluators.knn.evaluator import knn_classify

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(bank, dim, generator=generator), dim=1)
    labels = torch.randint(0, classes, (bank,), generator=generator)
    query = torch.nn.functional.normalize(torch.randn(queries, dim, generator=generator), dim=1)
    rss_features = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    start = time.perf_counter()
    scores = knn_classify(
        train, labels, query, classes, ks=(10, 20, 100, 200), temperature=0.07, chunk_size=chunk_size
    )
    seconds = time.perf_counter() - start
    assert scores[20].shape == (queries, classes)
    return {
        "chunk_size": chunk_size,
        "seconds": round(seconds, 3),
        "queries_per_s": round(queries / seconds, 1),
        "rss_after_features_gb": round(rss_features, 3),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3),
        "full_matrix_would_be_gb": round(queries * bank * 4 / 1024**3, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bank", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--chunk-sizes", default="256,1024")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case is not None:
        print(
            json.dumps(
                run_case(args.bank, args.queries, args.dim, args.classes, int(args.case), args.threads)
            )
        )
        return 0
    results = []
    for chunk in (int(c) for c in args.chunk_sizes.split(",")):
        cmd = [sys.executable, __file__, "--case", str(chunk)] + [
            f"--{k}={getattr(args, k)}" for k in ("bank", "queries", "dim", "classes", "threads")
        ]
        results.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    report = {
        "benchmark": "k-NN (bench_knn.py)",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "settings": {k: getattr(args, k) for k in ("bank", "queries", "dim", "classes", "threads")},
        "results": results,
    }
    print(
        "| chunk | seconds | queries/s | RSS after features (GB) | peak RSS (GB) | full matrix would be (GB) |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['chunk_size']} | {r['seconds']} | {r['queries_per_s']} | {r['rss_after_features_gb']} | "
            f"{r['peak_rss_gb']} | {r['full_matrix_would_be_gb']} |"
        )
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
