"""Does it learn? Random init vs DINO vs DoRA at the same budget, pretrained and evaluated, in one table.

``make demo`` runs one seed on the bundled video; ``make bench-learning`` three seeds. For every seed, from one base
config (``configs/demo.yaml``): DoRA is pretrained as configured, DINO with the same data, schedule and local crops
(``model.method=dino`` with the two global crops DINO needs), and a randomly initialised backbone of the same
architecture is written for reference. Each backbone is then evaluated with the evaluator plugins (k-NN and linear
probe on the bundled labelled images, DAVIS-style label propagation on generated sequences) through
``dora validate --evaluator``, and checked for collapse (feature rank of its CLS features, the teacher entropy logged
during fit). With ``--curve`` each pretraining also measures k-NN after every epoch (``--eval_during.evaluator knn``,
docs/training.md), and the table is followed by those learning curves. Everything a run writes stays under ``--output_dir``: the generated configs, checkpoints, TensorBoard
logs, ``results_*.json`` of every evaluation and ``comparison.{md,json}``. See docs/quickstart.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Comparison", "format_curves", "main", "method_config", "summarise"]

METHODS = ("random", "dino", "dora")
EVALUATORS = ("knn", "linear", "davis")
# (column title, evaluator, metric key in its results file)
HEADLINE = (
    ("k-NN top-1 (k=20)", "knn", "knn/top1_k20"),
    ("linear top-1 (best)", "linear", "linear/top1_best"),
    ("DAVIS J&F", "davis", "davis/J&F-mean"),
)
CURVE = ("k-NN top-1 (k=20) after each epoch", "eval/knn/top1_k20")  # (title, TensorBoard tag) of --curve
COLLAPSE = (
    ("teacher entropy", "teacher_entropy"),
    ("feature rank", "effective_rank"),
    ("feature std", "feature_std"),
)


def method_config(
    base: dict[str, Any], method: str, seed: int, run_dir: Path, max_epochs: int | None
) -> dict:
    """The fit config of ``method`` ("dora" or "dino") for ``seed``, writing everything under ``run_dir``.

    DoRA keeps the base config's transform (one global view per clip). DINO gets DINO's own augmentation: two global
    views and ``recipe: dino`` (first global view always blurred, the second blurred with p 0.1 and solarised with p
    0.2, local views flipped with p 0.5; see docs/method.md); the base's own values of the arguments the recipe sets
    are DoRA's, so they are dropped. Crop sizes, scales and the colour jitter stay the base config's.
    """
    if method not in ("dora", "dino"):
        raise ValueError(f"method must be 'dora' or 'dino', got {method!r}")
    config = copy.deepcopy(base)
    config["seed_everything"] = seed
    trainer = config.setdefault("trainer", {})
    trainer["default_root_dir"] = str(run_dir)
    if max_epochs is not None:
        trainer["max_epochs"] = max_epochs
    config.setdefault("model", {})["method"] = method
    data = config.setdefault("data", {})
    data["seed"] = seed
    transform = data.setdefault(
        "transform", {"class_path": "dora_lightning.data.augment.multicrop.ClipMultiCrop"}
    )
    init_args = transform.setdefault("init_args", {})
    init_args["num_global_crops"] = 2 if method == "dino" else 1
    if method == "dino":
        from dora_lightning.data.augment.multicrop_args import RECIPES  # the arguments a recipe sets

        for name in RECIPES["dino"]:
            init_args.pop(name, None)
        init_args["recipe"] = "dino"
    return config


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """``{method: {column: (mean, std over seeds, n)}}`` of per-seed rows ``{"method", "seed", column: value}``."""
    columns = [title for title, _, _ in HEADLINE] + [title for title, _ in COLLAPSE]
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        out[method] = {}
        for column in columns:
            values = [float(r[column]) for r in mine if r.get(column) is not None]
            if values:
                out[method][column] = (*_mean_std(values), len(values))
    return out


def format_summary(summary: dict[str, dict[str, tuple[float, float, int]]]) -> str:
    """A Markdown table: one row per method, "mean ± std (n)" per column (just the value for one seed)."""
    columns = [title for title, _, _ in HEADLINE] + [title for title, _ in COLLAPSE]
    columns = [c for c in columns if any(c in cells for cells in summary.values())]
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    names = {"random": "random init", "dino": "DINO", "dora": "DoRA"}
    for method, cells in summary.items():
        row = []
        for column in columns:
            if column not in cells:
                row.append("n/a")
                continue
            mean, std, n = cells[column]
            digits = 3 if column == "feature std" else 2
            row.append(f"{mean:.{digits}f}" if n == 1 else f"{mean:.{digits}f} ± {std:.{digits}f} (n={n})")
        lines.append(f"| {names[method]} | " + " | ".join(row) + " |")
    return "\n".join(lines)


@dataclass
class Comparison:
    """One comparison: settings, then :meth:`run` pretrains, evaluates and tabulates."""

    config: Path
    output_dir: Path
    seeds: list[int]
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    evaluators: list[str] = field(default_factory=lambda: list(EVALUATORS))
    max_epochs: int | None = None
    image_size: int = 64
    linear_epochs: int = 10
    davis_dir: Path | None = None
    davis_short_side: int = 96
    eval_args: list[str] = field(default_factory=list)
    fit_args: list[str] = field(default_factory=list)
    curve: bool = False
    rows: list[dict[str, Any]] = field(default_factory=list)

    def run(self) -> dict[str, Any]:
        """Run every seed and method, write ``comparison.{json,md}``, print and return the summary."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        base = yaml.safe_load(self.config.read_text())
        started = time.monotonic()
        if "davis" in self.evaluators:
            self.davis_dir = self._davis_data()
        for seed in self.seeds:
            checkpoints: dict[str, Path] = {}
            if "random" in self.methods:
                checkpoints["random"] = self._random_backbone(base, seed)
            for method in ("dino", "dora"):
                if method in self.methods:
                    checkpoints[method] = self._pretrain(base, method, seed)
            for method in self.methods:
                self.rows.append(self._evaluate(method, seed, checkpoints[method]))
                self._write()
        report = self._write()
        report["seconds"] = round(time.monotonic() - started, 1)
        (self.output_dir / "comparison.json").write_text(json.dumps(report, indent=2) + "\n")
        print("\n" + report["table"] + "\n", flush=True)
        print(f"written: {self.output_dir / 'comparison.md'} ({report['seconds']} s)", flush=True)
        return report

    # -- steps ---------------------------------------------------------------------------------------------------

    def _run_dir(self, method: str, seed: int) -> Path:
        return self.output_dir / f"seed{seed}" / method

    def _pretrain(self, base: dict[str, Any], method: str, seed: int) -> Path:
        from dora_lightning.cli import main as dora_main

        run_dir = self._run_dir(method, seed)
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path = run_dir / "fit_config.yaml"
        config_text = yaml.safe_dump(method_config(base, method, seed, run_dir, self.max_epochs))
        checkpoint = run_dir / "checkpoints" / "last.ckpt"
        fit_args = [*self._curve_args(), *self.fit_args]
        done, recipe = run_dir / "fit_done.json", {"config": config_text, "fit_args": fit_args}
        if checkpoint.is_file() and done.is_file() and json.loads(done.read_text()) == recipe:
            _banner(
                f"{method.upper()} (seed {seed}) already pretrained with this config: reusing {checkpoint}"
            )
            return checkpoint
        done.unlink(missing_ok=True)
        # what an earlier pretraining left here (another recipe, or a fit that did not finish) is not this one's:
        # its checkpoints (`dora fit` refuses a new run into a folder that holds a run's checkpoints) and its logs
        # (its curves would mix with this run's)
        for stale in ("checkpoints", "lightning_logs"):
            shutil.rmtree(run_dir / stale, ignore_errors=True)
        config_path.write_text(config_text)
        _banner(f"pretraining {method.upper()} (seed {seed}) -> {run_dir}")
        dora_main(["fit", "--config", str(config_path), *fit_args])
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{method} pretraining wrote no '{checkpoint}'; see the log above")
        done.write_text(json.dumps(recipe))  # a finished fit: a rerun with the same recipe reuses it
        return checkpoint

    def _random_backbone(self, base: dict[str, Any], seed: int) -> Path:
        """The DoRA module of the config as it is before its first step (same seed), saved as a checkpoint."""
        import lightning.pytorch as pl
        import torch

        from dora_lightning.checkpoint_formats import PRETRAIN_KIND
        from dora_lightning.module import DoRAModule

        out = self._run_dir("random", seed) / "random_init.ckpt"
        _banner(f"random init (seed {seed}): the config's networks before training -> {out}")
        pl.seed_everything(seed, verbose=False)
        module = DoRAModule(**{**base.get("model", {}), "seed": seed})
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "state_dict": module.state_dict(),
                "hyper_parameters": dict(module.hparams),
                "dora": {"kind": PRETRAIN_KIND, "random_init": True},
            },
            out,
        )
        return out

    def _evaluate(self, method: str, seed: int, checkpoint: Path) -> dict[str, Any]:
        from dora_lightning.cli import main as dora_main

        row: dict[str, Any] = {"method": method, "seed": seed, "checkpoint": str(checkpoint)}
        eval_root = self._run_dir(method, seed) / "eval"
        for title, evaluator, metric in HEADLINE:
            if evaluator not in self.evaluators:
                continue
            out = eval_root / evaluator
            _banner(f"{evaluator} on {method} (seed {seed})")
            dora_main(["validate", *self._evaluator_args(evaluator), "--ckpt_path", str(checkpoint),
                       "--evaluator.output_dir", str(out), *self.eval_args])  # fmt: skip
            metrics = json.loads((out / f"results_{evaluator}.json").read_text())["metrics"]
            row[title] = metrics[metric]
        row.update(self._collapse(method, seed, checkpoint))
        if self.curve and method != "random":
            from dora_lightning.collapse import logged_scalars

            points = logged_scalars(self._run_dir(method, seed), CURVE[1])
            row[CURVE[0]] = [[step, round(value, 4)] for step, value in points]  # TensorBoard stores float32
        return row

    def _curve_args(self) -> list[str]:
        """``dora fit`` arguments for ``--curve``: the headline k-NN after every epoch (the random init is a row)."""
        if not self.curve:
            return []
        return ["--eval_during.evaluator=knn", f"--eval_during.evaluator.image_size={self.image_size}",
                "--eval_during.at_start=false"]  # fmt: skip

    def _evaluator_args(self, evaluator: str) -> list[str]:
        size = ["--evaluator.image_size", str(self.image_size)]
        if evaluator == "knn":
            return ["--config", "configs/eval/knn.yaml", *size]
        if evaluator == "linear":
            return [
                "--config",
                "configs/eval/linear.yaml",
                *size,
                "--evaluator.epochs",
                str(self.linear_epochs),
            ]
        assert self.davis_dir is not None
        return ["--config", "configs/eval/davis.yaml", "--evaluator.data_dir", str(self.davis_dir),
                "--evaluator.short_side", str(self.davis_short_side)]  # fmt: skip

    def _davis_data(self) -> Path:
        from dora_lightning.evaluation.synthetic import make_davis_fixture

        root = self.output_dir / "davis_synthetic"
        if not (root / "ImageSets" / "2017" / "val.txt").is_file():
            _banner(f"generating DAVIS-layout sequences (shapes on frames of the bundled video) -> {root}")
            make_davis_fixture(root)
        return root

    def _collapse(self, method: str, seed: int, checkpoint: Path) -> dict[str, Any]:
        from dora_lightning.checkpoints import load_backbone
        from dora_lightning.collapse import feature_report, last_logged_scalar
        from dora_lightning.evaluation.image_data import ImageFolderDataModule

        backbone, _ = load_backbone(checkpoint, "teacher", self.image_size)
        data = ImageFolderDataModule(
            "assets/fashion_mnist", image_size=self.image_size, batch_size=128, num_workers=0
        )
        data.setup("validate")
        report = feature_report(backbone, data.val_dataloader())
        found = last_logged_scalar(self._run_dir(method, seed), "train/teacher_entropy")
        return {
            "teacher entropy": None if found is None else found[1],
            "feature rank": report["effective_rank"],
            "feature std": report["feature_std"],
            "features": report,
        }

    def _write(self) -> dict[str, Any]:
        summary = summarise(self.rows)
        table = format_summary(summary) + format_curves(self.rows)
        (self.output_dir / "comparison.md").write_text(table + "\n")
        report = {"seeds": self.seeds, "methods": self.methods, "evaluators": self.evaluators,
                  "config": str(self.config), "rows": self.rows, "summary": summary, "table": table}  # fmt: skip
        (self.output_dir / "comparison.json").write_text(json.dumps(report, indent=2) + "\n")
        return report


def format_curves(rows: list[dict[str, Any]]) -> str:
    """The ``--curve`` rows' learning curves, one line per method and seed ("" when there are none)."""
    names = {"dino": "DINO", "dora": "DoRA"}
    lines = [
        f"- {names[row['method']]} seed {row['seed']}: "
        + ", ".join(f"{value:.2f}" for _, value in row[CURVE[0]])
        + f" (steps {', '.join(str(step) for step, _ in row[CURVE[0]])})"
        for row in rows
        if row.get(CURVE[0])
    ]
    return f"\n\n{CURVE[0]}:\n" + "\n".join(lines) if lines else ""


def _banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dora compare",
        description="Pretrain DINO and DoRA from one config at the same budget, evaluate them and a random init "
        "with the evaluator plugins, and print one table (make demo / make bench-learning).",
    )
    p.add_argument(
        "--config", type=Path, default=Path("configs/demo.yaml"), help="base `dora fit` config (DoRA)"
    )
    p.add_argument("--output_dir", type=Path, default=Path("runs/demo"), help="where everything is written")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one full comparison per seed")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--evaluators", nargs="+", choices=EVALUATORS, default=list(EVALUATORS))
    p.add_argument("--max_epochs", type=int, default=None, help="override the config's trainer.max_epochs")
    p.add_argument("--image_size", type=int, default=64, help="k-NN / linear probe image size")
    p.add_argument("--linear_epochs", type=int, default=10, help="linear probe epochs")
    p.add_argument("--davis_short_side", type=int, default=96, help="DAVIS frames' short side")
    p.add_argument(
        "--curve",
        action="store_true",
        help="also k-NN after every epoch of each pretraining (a learning curve)",
    )
    p.add_argument(
        "--fit_arg", action="append", default=[], help="extra argument for every `dora fit`, e.g. "
        "--fit_arg=--trainer.max_steps=20 (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--eval_arg", action="append", default=[], help="extra argument for every `dora validate`, e.g. "
        "--eval_arg=--trainer.enable_progress_bar=false (repeatable)",
    )  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point: ``python -m dora_lightning.compare [options]``."""
    args = build_parser().parse_args(argv)
    from dora_lightning.lightning_output import quiet_lightning

    quiet_lightning()
    if not args.config.is_file():
        from dora_lightning.errors import exit_with_error

        exit_with_error(
            "dora compare", f"--config '{args.config}' does not exist; give a `dora fit` YAML config"
        )
    comparison = Comparison(
        config=args.config,
        output_dir=args.output_dir,
        seeds=args.seeds,
        methods=args.methods,
        evaluators=args.evaluators,
        max_epochs=args.max_epochs,
        image_size=args.image_size,
        linear_epochs=args.linear_epochs,
        davis_short_side=args.davis_short_side,
        eval_args=args.eval_arg,
        fit_args=args.fit_arg,
        curve=args.curve,
    )
    return comparison.run()


if __name__ == "__main__":
    main(sys.argv[1:])
