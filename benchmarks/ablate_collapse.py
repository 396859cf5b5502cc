"""The collapse ablation: one change at a time against the demo recipe, same seed and budget (issue 13, part 2).

Each variant pretrains DINO (or DoRA) with ``python -m dora_lightning.compare``'s own pretraining (so the configs are
exactly what ``make demo`` runs, plus the variant's ``dora fit`` overrides), evaluates the teacher with the k-NN
probe, and reads what shows a collapse:

* the teacher entropy and the loss logged during fit (TensorBoard), as a fraction of log(out_dim), at a few steps;
* the effective rank (RankMe) of the teacher's CLS features on the probe's validation images, for every per-epoch
  checkpoint (the demo config writes one per epoch), i.e. over training.

Usage::

    python benchmarks/ablate_collapse.py --variants baseline stable_head --max_epochs 6
    python benchmarks/ablate_collapse.py --list

Results: ``<output_dir>/ablation.json`` and ``ablation.md`` (one row per variant); each variant's run folder is
``<output_dir>/<variant>/`` (reused when its recipe is unchanged, as ``compare`` does).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import markdown_table, write_json  # noqa: E402

# name -> (what changes, method, `dora fit` overrides)
VARIANTS: dict[str, tuple[str, str, list[str]]] = {
    "baseline": ("make demo's recipe, DINO", "dino", []),
    "dora": ("make demo's recipe, DoRA", "dora", []),
    "stable_head": ("norm_last_layer true (the head's weight-norm gain frozen at 1)", "dino",
                    ["--model.norm_last_layer=true"]),
    "low_lr": ("base_lr 0.005 (4x lower)", "dino", ["--model.base_lr=0.005"]),
    "small_out": ("out_dim 1024", "dino", ["--model.out_dim=1024"]),
    "temp_warmup": ("teacher temperature 0.04 -> 0.07 over the first epochs", "dino",
                    ["--model.warmup_teacher_temp=0.04", "--model.teacher_temp=0.07",
                     "--model.warmup_teacher_temp_epochs=2"]),
    "batch32": ("batch 32 (lr scaled by the rule)", "dino", ["--data.batch_size=32"]),
    "momentum996": ("teacher momentum 0.996", "dino", ["--model.momentum_teacher=0.996"]),
}  # fmt: skip


def scalar_series(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    """All ``(step, value)`` of ``tag`` in the TensorBoard files under ``log_dir``, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[int, float] = {}
    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags().get("scalars", []):
            series.update({int(e.step): float(e.value) for e in accumulator.Scalars(tag)})
    return sorted(series.items())


def at_fractions(series: list[tuple[int, float]], fractions: tuple[float, ...]) -> list[tuple[int, float]]:
    """The logged points nearest to each fraction of the run (by step)."""
    if not series:
        return []
    last = series[-1][0]
    return [min(series, key=lambda point, f=f: abs(point[0] - f * last)) for f in fractions]


def checkpoint_ranks(run_dir: Path, image_size: int) -> list[tuple[str, float]]:
    """Effective rank of the teacher's CLS features on the probe's validation images, per epoch checkpoint."""
    from dora_lightning.checkpoints import load_backbone
    from dora_lightning.collapse import feature_report
    from dora_lightning.evaluation.image_data import ImageFolderDataModule

    data = ImageFolderDataModule("assets/fashion_mnist", image_size=image_size, batch_size=128, num_workers=0)
    data.setup("validate")
    out = []
    for ckpt in sorted((run_dir / "checkpoints").glob("epoch=*.ckpt"), key=lambda p: p.stat().st_mtime):
        backbone, _ = load_backbone(ckpt, "teacher", image_size)
        out.append((ckpt.stem, feature_report(backbone, data.val_dataloader())["effective_rank"]))
    return out


def run_variant(name: str, args: argparse.Namespace) -> dict:
    """Pretrain and probe one variant; return its row."""
    from dora_lightning.compare import Comparison

    what, method, overrides = VARIANTS[name]
    fit_args = overrides + ([f"--data.paths={args.video}"] if args.video else [])
    out_dir = args.output_dir / (f"{name}@{Path(args.video).stem}" if args.video else name)
    started = time.monotonic()
    comparison = Comparison(
        config=args.config,
        output_dir=out_dir,
        seeds=[args.seed],
        methods=[method],
        evaluators=["knn"],
        max_epochs=args.max_epochs,
        fit_args=fit_args,
        eval_args=["--trainer.enable_progress_bar=false"],
    )
    report = comparison.run()
    run_dir = out_dir / f"seed{args.seed}" / method
    row = report["rows"][-1]
    out_dim = int(_model_arg(run_dir, fit_args, "out_dim"))
    log_k = math.log(out_dim)
    entropy = scalar_series(run_dir, "train/teacher_entropy")
    loss = scalar_series(run_dir, "train/loss")
    return {
        "variant": name,
        "change": what,
        "method": method,
        "fit_args": fit_args,
        "seed": args.seed,
        "steps": entropy[-1][0] if entropy else None,
        "entropy_ratio": [
            (s, round(v / log_k, 3)) for s, v in at_fractions(entropy, (0.0, 0.25, 0.5, 0.75, 1.0))
        ],
        "loss": [(s, round(v, 3)) for s, v in at_fractions(loss, (0.0, 0.5, 1.0))],
        "rank_per_epoch": [(n, round(r, 2)) for n, r in checkpoint_ranks(run_dir, args.image_size)],
        "knn_top1": row.get("k-NN top-1 (k=20)"),
        "feature_rank": row.get("feature rank"),
        "seconds": round(time.monotonic() - started, 1),
    }


def _model_arg(run_dir: Path, fit_args: list[str], key: str) -> str:
    """``model.<key>`` as the fit ran it: the last override in ``fit_args``, else the run's config."""
    import yaml

    for arg in reversed(fit_args):
        if arg.startswith(f"--model.{key}="):
            return arg.split("=", 1)[1]
    return str(yaml.safe_load((run_dir / "fit_config.yaml").read_text())["model"][key])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    p.add_argument("--output_dir", type=Path, default=Path("bench_out/ablation"))
    p.add_argument("--variants", nargs="+", default=["baseline"])
    p.add_argument("--video", default=None, help="pretrain on this video instead of the config's")
    p.add_argument("--max_epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--list", action="store_true", help="list the variants and exit")
    args = p.parse_args(argv)
    if args.list:
        for name, (what, method, overrides) in VARIANTS.items():
            print(f"{name:14s} {method:5s} {what}  {' '.join(overrides)}")
        return
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variant(s) {unknown}; see --list")
    results_path = args.output_dir / "ablation.json"
    rows = json.loads(results_path.read_text())["rows"] if results_path.is_file() else []
    for name in args.variants:
        row = run_variant(name, args)
        rows = [r for r in rows if (r["variant"], r.get("video")) != (name, args.video)] + [
            {**row, "video": args.video}
        ]
        write_json(results_path, {"rows": rows})
        table = markdown_table(
            ["variant", "video", "steps", "entropy/logK (start, 25%, 50%, 75%, end)", "loss end",
             "rank per epoch", "k-NN top-1"],
            [[str(c) for c in (r["variant"], r.get("video") or "config", r["steps"],
              " ".join(f"{v:.3f}" for _, v in r["entropy_ratio"]), r["loss"][-1][1] if r["loss"] else None,
              " ".join(f"{v:.1f}" for _, v in r["rank_per_epoch"]), r["knn_top1"])] for r in rows],
        )  # fmt: skip
        (args.output_dir / "ablation.md").write_text(table + "\n")
        print(table, flush=True)


if __name__ == "__main__":
    main()
