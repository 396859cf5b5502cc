"""DAVIS label propagation: the pure propagation, an oracle run on a synthetic fixture, the data checks, and
`dora validate --evaluator davis` end to end on a `dora fit` checkpoint."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import REPO, micro_vit
from PIL import Image
from test_validate_cli import QUIET, fit_checkpoint  # noqa: F401 - fixture
from torch.utils.data import DataLoader

from dora_lightning.cli import main
from dora_lightning.evaluation.synthetic import make_davis_fixture
from dora_lightning.models.backbone import build_vit
from evaluators.davis.data import (
    DAVIS_MEAN,
    DAVIS_STD,
    DavisFrames,
    davis_palette,
    grid_labels,
    model_size,
    read_frame,
    scan_davis,
)
from evaluators.davis.evaluator import DavisEvaluator, DavisPropagationModule, metric_name
from evaluators.davis.propagation import (
    LabelPropagator,
    labels_from_soft,
    neighbourhood_mask,
    normalise_channels,
    propagate,
)

METRICS = ["J&F-mean", "J-mean", "J-recall", "J-decay", "F-mean", "F-recall", "F-decay"]
TRAINER = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)


@pytest.fixture(scope="module")
def davis_root(tmp_path_factory) -> Path:
    """2 sequences x 8 frames of 96x128 moving shapes."""
    return make_davis_fixture(tmp_path_factory.mktemp("davis"), sequences=2, frames=8, size=(96, 128), seed=1)


# ------------------------------------------------------------------------------------------------ propagation
def dino_neighbourhood(h: int, w: int, r: int) -> torch.Tensor:
    """DINO's restrict_neighborhood, loop for loop."""
    mask = torch.zeros(h, w, h, w)
    for i in range(h):
        for j in range(w):
            for p in range(2 * r + 1):
                for q in range(2 * r + 1):
                    if 0 <= i - r + p < h and 0 <= j - r + q < w:
                        mask[i, j, i - r + p, j - r + q] = 1
    return mask.reshape(h * w, h * w)


def dino_propagate(target, sources, labels, topk, mask):
    """DINO's label_propagation arithmetic: target (N, d), sources (C, N, d), labels (C, L, N)."""
    contexts, n, _ = sources.shape
    aff = torch.exp(torch.bmm(target.unsqueeze(0).repeat(contexts, 1, 1), sources.transpose(1, 2)) / 0.1)
    if mask is not None:
        aff *= mask.unsqueeze(0)
    aff = aff.transpose(2, 1).reshape(-1, n)
    kth, _ = torch.min(torch.topk(aff, dim=0, k=topk)[0], dim=0)
    aff[aff < kth] = 0
    aff = aff / aff.sum(dim=0, keepdim=True)
    segs = labels.transpose(2, 1).reshape(-1, labels.shape[1]).T
    return segs @ aff


def test_neighbourhood_mask_is_dinos_square_window():
    for grid, radius in [((5, 7), 1), ((6, 4), 2), ((3, 3), 5)]:
        expected = dino_neighbourhood(*grid, radius).bool()
        torch.testing.assert_close(neighbourhood_mask(grid, radius), expected.T)  # [source, target]
        torch.testing.assert_close(neighbourhood_mask(grid, radius), expected)  # symmetric
    assert neighbourhood_mask((4, 4), 0).all()


@pytest.mark.parametrize(
    ("radius", "contexts", "discrete"),
    [(0, 3, False), (2, 3, False), (1, 1, False), (1, 2, True), (0, 2, True)],
)
def test_propagate_equals_dinos_arithmetic(radius, contexts, discrete):
    """Random features, windows with fewer than k sources (radius 1, one context: corners see 4) and features with
    many exact ties (discrete), against DINO's dense arithmetic."""
    generator = torch.Generator().manual_seed(radius + 10 * contexts)
    grid, labels_n = (5, 6), 4
    n = grid[0] * grid[1]
    if discrete:  # 3 distinct feature vectors: lots of exactly equal affinities
        palette = F.normalize(torch.randn(3, 16, generator=generator), dim=1)
        target = palette[torch.randint(0, 3, (n,), generator=generator)]
        sources = palette[torch.randint(0, 3, (contexts, n), generator=generator)]
    else:
        target = F.normalize(torch.randn(n, 16, generator=generator), dim=1)
        sources = F.normalize(torch.randn(contexts, n, 16, generator=generator), dim=2)
    labels = torch.rand(contexts, labels_n, n, generator=generator)
    mask = neighbourhood_mask(grid, radius) if radius else None
    ours = propagate(target, sources, labels, topk=5, temperature=0.1, neighbourhood=mask, chunk_size=7)
    torch.testing.assert_close(ours, dino_propagate(target, sources, labels, 5, mask), rtol=1e-4, atol=1e-6)


def test_neighbourhood_really_restricts():
    """A 1x20 strip: target patch 19 looks exactly like source patch 0 (label 1); its window neighbours are
    orthogonal to it (label 0). Unrestricted it takes label 1; with radius 2 it can only vote from 17..19."""
    n = 20
    sources = torch.zeros(1, n, 3)
    sources[0, :, 0] = 1.0  # every source looks like feature e0 ...
    sources[0, 0] = torch.tensor([0.0, 1.0, 0.0])  # ... but source 0 looks like e1
    labels = torch.zeros(1, 2, n)
    labels[0, 0] = 1.0
    labels[0, :, 0] = torch.tensor([0.0, 1.0])  # source 0 has label 1, all others label 0
    target = torch.zeros(n, 3)
    target[:, 2] = 1.0  # orthogonal to everything ...
    target[19] = torch.tensor([0.0, 1.0, 0.0])  # ... except target 19, identical to source 0
    free = propagate(target, sources, labels, topk=1, neighbourhood=None)
    window = propagate(target, sources, labels, topk=1, neighbourhood=neighbourhood_mask((1, n), 2))
    assert free[:, 19].argmax() == 1
    assert window[:, 19].argmax() == 0
    assert (window[1, 3:] == 0).all()  # only targets 0..2 have source 0 in their window
    torch.testing.assert_close(window[:, 19], torch.tensor([1.0, 0.0]))


def test_normalise_channels_and_labels_from_soft():
    soft = torch.tensor([[[0.2, 0.4], [0.6, 1.0]], [[0.0, 0.0], [0.0, 0.0]], [[0.5, 0.5], [0.5, 0.5]]])
    out = normalise_channels(soft.clone())
    torch.testing.assert_close(out[0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    torch.testing.assert_close(out[1], soft[1])  # max not > 0: untouched
    torch.testing.assert_close(out[2], torch.ones(2, 2))  # constant positive channel (DINO: NaN)
    # 2 labels on a 1x2 grid, patch 4: left patch label 0, right patch label 1 -> left/right halves after upsampling
    labels = labels_from_soft(torch.tensor([[0.9, 0.1], [0.1, 0.9]]), (1, 2), 4)
    assert labels.shape == (4, 8)
    assert (labels[:, :4] == 0).all() and (labels[:, 4:] == 1).all()


def test_propagator_keeps_only_the_last_frames():
    first = torch.randn(12, 8)
    propagator = LabelPropagator(first, torch.zeros(3, 4, dtype=torch.long), 2, n_last_frames=3, radius=1)
    for _ in range(6):
        soft = propagator.step(torch.randn(12, 8))
        assert soft.shape == (2, 12)
        torch.testing.assert_close(soft.sum(dim=0), torch.ones(12))
    assert len(propagator.recent) == 3


# ------------------------------------------------------------------------------------------------ data
def test_model_size_floors_to_the_patch_size():
    assert model_size(480, 854, 480, 16) == (480, 848)  # DINO (multiple of 64) would give 832
    assert model_size(854, 480, 480, 16) == (848, 480)
    assert model_size(480, 640, 64, 8) == (64, 80)
    assert model_size(480, 854, 480, 14) == (476, 840)


def test_read_frame_uses_dinos_normalisation(tmp_path):
    path = tmp_path / "grey.jpg"
    Image.fromarray(np.full((32, 48, 3), 128, dtype=np.uint8)).save(path, quality=100)
    frame = read_frame(path, (16, 24))
    assert frame.shape == (3, 16, 24)
    expected = [(128 / 255 - m) / s for m, s in zip(DAVIS_MEAN, DAVIS_STD, strict=True)]
    torch.testing.assert_close(frame.mean(dim=(1, 2)), torch.tensor(expected), atol=0.02, rtol=0)
    assert DAVIS_STD[0] == 0.228  # DINO's value, on purpose


def broken_copy(root: Path, tmp_path: Path, case: str) -> tuple[Path, str]:
    """A copy of the fixture broken in one way, and the message expected from scan_davis."""
    bad = tmp_path / case
    shutil.copytree(root, bad)
    seq = "synth-00"
    masks, frames = bad / "Annotations" / "480p", bad / "JPEGImages" / "480p"
    if case == "no_list":
        (bad / "ImageSets" / "2017" / "val.txt").unlink()
        return bad, "val.txt' not found"
    if case == "absent_sequence":
        (bad / "ImageSets" / "2017" / "val.txt").write_text("synth-00\nmissing-seq\n")
        return bad, "sequence 'missing-seq' is listed in"
    if case == "no_annotations":
        shutil.rmtree(bad / "Annotations")
        return bad, "Annotations/480p' not found"
    if case == "no_sequence_masks":
        shutil.rmtree(masks / seq)
        return bad, f"Annotations/480p/{seq}' not found"
    if case == "missing_mask":
        (masks / seq / "00003.png").unlink()
        return bad, "00003.png' not found"
    if case == "empty_sequence":
        for frame in (frames / seq).iterdir():
            frame.unlink()
        return bad, "holds no .jpg frame"
    if case == "size_mismatch":
        Image.open(masks / seq / "00002.png").resize((64, 48)).save(masks / seq / "00002.png")
        return bad, "00002.png' is 64x48 but its frame"
    if case == "not_palette":
        Image.open(masks / seq / "00001.png").convert("RGB").save(masks / seq / "00001.png")
        return bad, "00001.png' is a RGB image; DAVIS masks must be palette"
    if case == "out_of_range":
        labels = np.asarray(Image.open(masks / seq / "00004.png")).copy()
        labels[0, 0] = 7
        image = Image.fromarray(labels, mode="P")
        image.putpalette(davis_palette())
        image.save(masks / seq / "00004.png")
        return bad, "00004.png' holds object id(s) [7] but the first frame has 2 object(s)"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "no_list",
        "absent_sequence",
        "no_annotations",
        "no_sequence_masks",
        "missing_mask",
        "empty_sequence",
        "size_mismatch",
        "not_palette",
        "out_of_range",
    ],
)
def test_malformed_folders_are_one_line_errors(case, davis_root, tmp_path):
    bad, message = broken_copy(davis_root, tmp_path, case)
    with pytest.raises((FileNotFoundError, ValueError)) as info:
        scan_davis(bad)
    text = str(info.value)
    assert message in text and "\n" not in text
    assert str(bad) in text  # names the file or folder


def test_scan_selects_sequences_and_refuses_unknown_ones(davis_root):
    (only,) = scan_davis(davis_root, sequences=["synth-01"])
    assert only.name == "synth-01" and len(only) == 8 and only.num_objects == 2 and only.size == (96, 128)
    with pytest.raises(ValueError, match="'nope'.*not listed in"):
        scan_davis(davis_root, sequences=["nope"])
    with pytest.raises(FileNotFoundError, match="python -m dora_lightning.evaluation.synthetic davis"):
        scan_davis(davis_root / "nowhere")


def test_frames_are_split_over_processes_and_workers_in_order(davis_root):
    sequences = scan_davis(davis_root)
    ranks = [DavisFrames(sequences, 64, 8, rank=r, world_size=2) for r in (0, 1)]
    assert [[s.name for s in d.own_sequences()] for d in ranks] == [["synth-00"], ["synth-01"]]
    assert [len(d) for d in ranks] == [8, 8]
    loader = DataLoader(DavisFrames(sequences, 64, 8), batch_size=None, num_workers=2)
    seen: dict[str, list[int]] = {}
    for item in loader:
        seen.setdefault(item["sequence"], []).append(item["index"])
        assert item["image"].shape == (3, 64, 80) and item["mask"].shape == (96, 128)
        assert ("grid_labels" in item) == (item["index"] == 0)
        assert item["num_objects"] == 2 and item["num_frames"] == 8
    assert seen == {"synth-00": list(range(8)), "synth-01": list(range(8))}


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


def test_random_features_score_far_below_the_oracle(davis_root, tmp_path):
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
def test_two_processes_split_the_sequences_and_agree(davis_root, tmp_path):
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
