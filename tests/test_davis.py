"""DAVIS label propagation run: an oracle run on a synthetic fixture (and its random-feature guard), the
evaluator's options, `dora validate --evaluator davis` end to end on a `dora fit` checkpoint, the shipped config, and
the DDP split. The pure propagation is tested in tests/test_davis_propagation.py, the data in tests/test_davis_data.py."""

from __future__ import annotations

import csv
import json
import shutil

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import REPO, micro_vit
from PIL import Image
from test_davis_data import davis_root  # noqa: F401 - fixture
from test_validate_cli import QUIET, fit_checkpoint  # noqa: F401 - fixture

from dora_lightning.cli import main
from dora_lightning.evaluation.contract import EvaluatorSettingError
from dora_lightning.evaluation.synthetic import make_davis_fixture
from dora_lightning.models.backbone import build_vit
from evaluators.davis.checks import check_output_dir, refuse_cut_sequences
from evaluators.davis.data import grid_labels, model_size, scan_davis
from evaluators.davis.evaluator import DavisEvaluator, DavisPropagationModule, metric_name

METRICS = ["J&F-mean", "J-mean", "J-recall", "J-decay", "F-mean", "F-recall", "F-decay"]
TRAINER = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)


# ------------------------------------------------------------------------------------------------ oracle run
class OracleModule(DavisPropagationModule):
    """Features that encode the true object id of each patch (one-hot of the downsampled ground truth)."""

    def frame_features(self, batch):
        height, width = batch["mask"].shape
        size = model_size(height, width, self.short_side, self.patch_size)
        grid = (size[0] // self.patch_size, size[1] // self.patch_size)
        labels = grid_labels(batch["mask"].numpy(), grid).long().reshape(-1)
        # a little noise so that the top-k are not all tied (ties are exact, just slower)
        noise = torch.randn(labels.shape[0], 4, generator=torch.Generator().manual_seed(int(batch["index"])))
        return torch.cat([F.one_hot(labels, int(batch["num_objects"]) + 1).float(), 0.05 * noise], dim=1)


def test_oracle_features_reach_near_perfect_scores(tmp_path):
    """With features that know each patch's object, only the 4-px patch grid limits the masks: J ~0.9, F ~1."""
    root = make_davis_fixture(tmp_path / "data", sequences=2, frames=10, size=(128, 160), seed=3)
    patch4 = build_vit("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1, embed_dim=48, num_heads=3)
    module = OracleModule(patch4, scan_davis(root), tmp_path / "out", short_side=128, num_workers=0)
    pl.Trainer(**TRAINER).validate(module, verbose=False)
    assert set(module.per_sequence) == {"synth-00", "synth-01"}
    assert module.per_sequence["synth-00"][0].shape == (2, 8)  # 2 objects x 8 scored frames
    assert module.metrics["davis/J&F-mean"] > 90
    assert module.metrics["davis/J-mean"] > 85 and module.metrics["davis/F-mean"] > 95
    # the written first frame is the ground truth, the others are palette PNGs of ids 0..2
    out = tmp_path / "out" / "synth-00"
    assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}.png" for i in range(10)]
    truth = np.asarray(Image.open(root / "Annotations" / "480p" / "synth-00" / "00000.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(out / "00000.png")), truth)
    predicted = Image.open(out / "00005.png")
    assert predicted.mode == "P" and predicted.size == (160, 128)
    assert set(np.unique(np.asarray(predicted))) <= {0, 1, 2}


def test_random_features_score_far_below_the_oracle(davis_root, tmp_path):  # noqa: F811
    """Guards the oracle test: features unrelated to the objects do not score near 100."""

    class NoiseModule(OracleModule):
        def frame_features(self, batch):
            n = super().frame_features(batch).shape[0]
            return torch.randn(n, 8, generator=torch.Generator().manual_seed(int(batch["index"])))

    module = NoiseModule(
        micro_vit(depth=1), scan_davis(davis_root), tmp_path / "out", short_side=96, num_workers=0
    )
    pl.Trainer(**TRAINER).validate(module, verbose=False)
    assert module.metrics["davis/J&F-mean"] < 60


# ------------------------------------------------------------------------------------------------ evaluator + CLI
def test_evaluator_refuses_bad_options():
    with pytest.raises(ValueError, match="topk must be >= 1"):
        DavisEvaluator(topk=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        DavisEvaluator(temperature=0.0)
    assert metric_name("J&F-Mean") == "davis/J&F-mean"


def test_validate_davis_end_to_end(fit_checkpoint, davis_root, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "eval"
    main(
        [
            "validate",
            "--evaluator",
            "davis",
            "--ckpt_path",
            str(fit_checkpoint),
            f"--evaluator.data_dir={davis_root}",
            "--evaluator.short_side=64",
            "--evaluator.num_workers=1",
            f"--evaluator.output_dir={out}",
            *QUIET,
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    data = json.loads((out / "results_davis.json").read_text())
    assert list(data["metrics"]) == [f"davis/{m}" for m in METRICS]
    assert all(np.isfinite(v) for v in data["metrics"].values())
    assert 0 <= data["metrics"]["davis/J&F-mean"] <= 100
    protocol = data["protocol"]
    assert protocol["short_side"] == 64 and protocol["n_last_frames"] == 7 and protocol["topk"] == 5
    assert protocol["size_mask_neighborhood"] == 12 and protocol["model_frame_sizes"] == ["64x80"]
    assert protocol["num_objects"] == 4 and set(protocol["per_object"]) == {
        "synth-00_1",
        "synth-00_2",
        "synth-01_1",
        "synth-01_2",
    }
    for seq in ("synth-00", "synth-01"):
        assert len(list((out / seq).glob("*.png"))) == 8
    with (out / "global_results-val.csv").open() as fh:
        (row,) = list(csv.DictReader(fh))
    assert float(row["J&F-Mean"]) == pytest.approx(data["metrics"]["davis/J&F-mean"] / 100, abs=1e-5)
    with (out / "per-sequence_results-val.csv").open() as fh:
        assert [r["Sequence"] for r in csv.DictReader(fh)] == [
            "synth-00_1",
            "synth-00_2",
            "synth-01_1",
            "synth-01_2",
        ]
    assert "davis/J&F-mean" in capsys.readouterr().out


def test_shipped_davis_config_parses(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", "configs/eval/davis.yaml", "--ckpt_path=unused.ckpt", "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["evaluator"]["class_path"] == "evaluators.davis.DavisEvaluator"
    args = config["evaluator"]["init_args"]
    assert (args["n_last_frames"], args["size_mask_neighborhood"], args["topk"]) == (7, 12, 5)
    assert args["temperature"] == 0.1 and args["short_side"] == 480 and args["split"] == "val"


DDP_SCRIPT = """
import json, os, sys
import torch
from dora_lightning.models.backbone import build_vit
from evaluators.davis.evaluator import DavisEvaluator

root, out, devices = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
vit = build_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=48, num_heads=3).eval()
evaluator = DavisEvaluator(data_dir=root, short_side=64, num_workers=0, output_dir=out)
trainer = dict(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
               enable_progress_bar=False, enable_model_summary=False)
metrics = evaluator.evaluate(vit, trainer)
rank = int(os.environ.get("LOCAL_RANK", 0))
with open(os.path.join(out, f"metrics_rank{rank}.json"), "w") as fh:
    json.dump({"metrics": metrics, "objects": evaluator.protocol()["num_objects"]}, fh)
"""


@pytest.mark.slow
def test_two_processes_split_the_sequences_and_agree(davis_root, tmp_path):  # noqa: F811
    """Under DDP each process propagates its share of the sequences; the gathered scores equal one process's."""
    import subprocess
    import sys

    script = tmp_path / "ddp_davis.py"
    script.write_text(DDP_SCRIPT)
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"out{devices}"
        out.mkdir()
        subprocess.run(
            [sys.executable, str(script), str(davis_root), str(out), str(devices)],
            cwd=REPO,
            check=True,
            capture_output=True,
            timeout=600,
        )
        results[devices] = [json.loads(p.read_text()) for p in sorted(out.glob("metrics_rank*.json"))]
        assert len(list(out.glob("synth-0*/*.png"))) == 16  # both sequences written, by whichever process
    (single,) = results[1]
    assert len(results[2]) == 2
    for rank_result in results[2]:
        assert rank_result["objects"] == single["objects"] == 4
        for name, value in single["metrics"].items():
            assert rank_result["metrics"][name] == pytest.approx(value, abs=1e-9)


def test_empty_sequence_list_and_tiny_short_side_are_refused():
    from dora_lightning.evaluation.contract import EvaluationDataError
    from dora_lightning.models.backbone import build_vit
    from evaluators.davis.evaluator import DavisEvaluator

    with pytest.raises(ValueError, match=r"sequences=\[\] selects no sequence"):
        DavisEvaluator(sequences=[])
    backbone = build_vit("vit_tiny_patch16_224", img_size=32, depth=1)
    with pytest.raises(
        EvaluationDataError, match="short_side=8 is smaller than the backbone's patch size 16"
    ):
        DavisEvaluator(short_side=8).evaluate(backbone, {})


# ------------------------------------------------------------------------------------------------ refused up front
def _evaluate(root, out, trainer=None, **options):
    """Run the DAVIS evaluator with ``options`` on a micro ViT (patch 8), ``trainer`` added to the Trainer options."""
    evaluator = DavisEvaluator(data_dir=str(root), num_workers=0, output_dir=str(out), **options)
    return evaluator.evaluate(micro_vit(depth=1), {**TRAINER, **(trainer or {})})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"topk": 100, "short_side": 48},
            "topk=100 exceeds the 48 patch(es) of the smallest frame grid (6x8 patches of 8 px, sequence 'synth-00' "
            "at --evaluator.short_side 48); pass --evaluator.topk between 1 and 48, or a larger --evaluator.short_side",
        ),
        (
            {"short_side": 12},
            "topk=5 exceeds the 1 patch(es) of the smallest frame grid (1x1 patches of 8 px",
        ),
    ],
)
def test_topk_beyond_the_smallest_frame_grid_is_refused_before_the_run(
    davis_root,  # noqa: F811
    tmp_path,
    options,
    message,
):
    """It ended in a ValueError traceback from the propagation at the first propagated frame, after PNGs were
    written."""
    out = tmp_path / "out"
    with pytest.raises(EvaluatorSettingError) as info:
        _evaluate(davis_root, out, **options)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert not out.exists()


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "where",
    [
        "Annotations/480p",
        "Annotations/480p/synth-01",
        "JPEGImages/480p",
        "ImageSets",
        ".",
        "link",
        "seq_link",
    ],
)
def test_output_dir_in_the_data_set_is_refused(davis_root, tmp_path, where):  # noqa: F811
    """An output_dir on the ground truth was accepted: the predictions replaced the masks, and the next run scored
    J&F 100. Symlinks are resolved: a link to the masks, or an output folder whose sequence folder links there."""
    root = tmp_path / "davis"
    shutil.copytree(davis_root, root)
    masks = root / "Annotations" / "480p"
    if where == "link":
        out = tmp_path / "link"
        out.symlink_to(masks, target_is_directory=True)
    elif where == "seq_link":
        out = tmp_path / "preds"
        out.mkdir()
        (out / "synth-00").symlink_to(masks / "synth-00", target_is_directory=True)
    else:
        out = root / where
    before = _files(root)
    with pytest.raises(EvaluatorSettingError) as info:
        _evaluate(root, out, short_side=64)
    message = str(info.value)
    assert message.startswith(
        f"--evaluator.output_dir '{out}' would put the predictions among the files of the DAVIS"
    )
    assert "\n" not in message
    assert _files(root) == before  # nothing written, nothing replaced


def test_output_dir_beside_or_above_the_data_set_is_accepted(davis_root, tmp_path):  # noqa: F811
    sequences = scan_davis(davis_root)
    for out in (davis_root / "eval" / "davis", davis_root.parent, tmp_path / "out"):
        check_output_dir(out, davis_root, sequences)  # the predictions cannot land on a file of the data set


def test_a_batch_limit_that_cuts_the_sequences_is_refused_before_the_run(davis_root, tmp_path):  # noqa: F811
    """A limit stopped the frames mid-sequence and failed with a RuntimeError after the run; now one line before."""
    out = tmp_path / "out"
    with pytest.raises(EvaluatorSettingError) as info:
        _evaluate(davis_root, out, trainer={"limit_val_batches": 15}, short_side=64)
    assert str(info.value) == (
        "--trainer.limit_val_batches 15 would run 15 of the 16 batches (per process) of the 16 frames of 2 "
        "sequence(s) (one batch per frame), and the results would not be those of the data set; remove the limit, "
        "or evaluate fewer sequences (--evaluator.sequences)"
    )
    assert not out.exists()
    sequences = scan_davis(davis_root)
    two = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, limit_val_batches=8)
    refuse_cut_sequences(two, sequences, 64, 8)  # 8 frames per process: not cut
    one = pl.Trainer(**TRAINER, limit_val_batches=16)
    refuse_cut_sequences(one, sequences, 64, 8)
