"""Segmentation evaluator benchmark: images/s and peak memory of the linear head's eval and training steps on CPU.

A frozen, randomly initialised ViT-S/16 (``build_vit("vit_small_patch16_224")``, dynamic image size) with the
evaluator's head (``SegmentationHeadModule``, 150 classes as ADE20K) on random 512x512 images, float32, without
Lightning's loop (no Trainer, logging or data loading):

* ``eval``: what one validation batch costs: frozen features of the last block, the 1x1 head, logits upsampled
  (bilinear) to the 512x512 label size, argmax and the torchmetrics confusion-matrix update;
* ``train``: one optimiser step: frozen features (no grad), head, upsampling, cross-entropy (ignore 255),
  backward through the head and the AdamW step.

Each case runs in a fresh interpreter (so its peak RSS, ``ru_maxrss``, is its own) with ``--warmup`` untimed then
``--batches`` timed batches of ``--batch-size`` images; images/s is over the timed batches' median time. Before each
case the script waits (up to ``--quiet-wait`` s) for idle CPUs, and it records the CPU cores other processes used
while the case ran (``other_cpu_cores_during``; the process start and model build included).

    python benchmarks/bench_seg.py --out bench_out/bench_seg.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    CpuSample,
    add_child_args,
    add_quiet_wait_arg,
    base_machine_info,
    cpu_cores_between,
    markdown_table,
    run_child_case,
    run_child_side,
    wait_for_quiet,
    write_json,
)

CASES = ("eval", "train")


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def run_case(case: dict) -> dict:
    """Child side: build the backbone and head, time the case's batches, return the measurements."""
    import torch

    from dora_lightning.models.backbone import build_vit
    from evaluators.segmentation.module import SegmentationHeadModule

    torch.set_num_threads(case["threads"])
    rss_imports = _rss_gb()
    torch.manual_seed(0)
    backbone = build_vit(case["model"], img_size=case["image_size"])
    module = SegmentationHeadModule(backbone, case["classes"], n_last_blocks=1)
    size, batch = case["image_size"], case["batch_size"]
    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, case["classes"], (batch, size, size), dtype=torch.uint8)
    optimizer = torch.optim.AdamW(module.head.parameters(), lr=1e-3, weight_decay=1e-4)

    def eval_batch() -> None:
        module.eval()
        with torch.no_grad():
            predictions = module.predict_labels(list(images), [(size, size)] * batch)
            for prediction, mask in zip(predictions, labels, strict=True):
                module.confmat.update(prediction.flatten(), mask.flatten().long())

    def train_batch() -> None:
        module.train()
        optimizer.zero_grad(set_to_none=True)
        loss = module.training_step((images, labels), 0)
        loss.backward()
        optimizer.step()

    step = eval_batch if case["case"] == "eval" else train_batch
    module.log = lambda *args, **kwargs: None  # no Trainer attached
    rss_built = _rss_gb()
    times = []
    for i in range(case["warmup"] + case["batches"]):
        start = time.perf_counter()
        step()
        if i >= case["warmup"]:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    assert backbone.blocks[0].attn.qkv.weight.grad is None, "the backbone must stay frozen"
    return {
        "batch_s": [round(t, 3) for t in times],
        "batch_median_s": round(median, 3),
        "images_per_s": round(batch / median, 3),
        "rss_after_imports_gb": round(rss_imports, 3),
        "rss_after_build_gb": round(rss_built, 3),
        "peak_rss_gb": round(_rss_gb(), 3),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm ViT name (random init)")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--batches", type=int, default=3, help="timed batches per case")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--case-timeout", type=float, default=300.0)
    parser.add_argument("--out", default=None)
    add_quiet_wait_arg(parser, default=10.0)
    add_child_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if run_child_side(args, run_case):
        return 0
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if any(c not in CASES for c in cases) or args.batches < 1 or args.warmup < 0:
        raise SystemExit(f"--cases must be among {CASES}, --batches >= 1, --warmup >= 0")
    import torch

    started = dt.datetime.now(dt.timezone.utc)
    settings = {
        "model": args.model,
        "image_size": args.image_size,
        "classes": args.classes,
        "batch_size": args.batch_size,
        "batches": args.batches,
        "warmup": args.warmup,
        "threads": args.threads,
    }
    results = []
    for name in cases:
        waited, load = wait_for_quiet(args.quiet_wait, threshold=0.3, include_children=False)
        print(
            f"[bench_seg] {name}: waited {waited:.0f} s for quiet CPUs (other load {load} cores) ...",
            flush=True,
        )
        start = CpuSample.now(include_children=True)
        measured = run_child_case(Path(__file__), {**settings, "case": name}, name, args.case_timeout)
        _, other = cpu_cores_between(start, CpuSample.now(include_children=True))
        results.append(
            {
                "case": name,
                **measured,
                "waited_for_quiet_s": waited,
                "other_cpu_cores_before": load,
                "other_cpu_cores_during": round(other, 2),
            }
        )
    rows = [
        [
            r["case"],
            f"{r['images_per_s']:.2f}",
            f"{r['batch_median_s']:.2f}",
            f"{r['rss_after_build_gb']:.2f}",
            f"{r['peak_rss_gb']:.2f}",
            f"{r['other_cpu_cores_during']:.2f}",
        ]
        for r in results
    ]
    print(
        f"\n{args.model}, {args.image_size}x{args.image_size}, {args.classes} classes, batch {args.batch_size}, "
        f"fp32 CPU, {args.threads} threads\n"
    )
    print(
        markdown_table(
            ["case", "images/s", "median batch (s)", "RSS after build (GB)", "peak RSS (GB)", "other load"],
            rows,
        )
    )
    if args.out:
        machine = {**base_machine_info(), "torch": torch.__version__}
        payload = {
            "benchmark": "segmentation evaluator (bench_seg.py)",
            "date": started.isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": machine,
            "settings": settings,
            "results": results,
        }
        write_json(Path(args.out), payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
