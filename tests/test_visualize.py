"""`dora visualize`: files, sizes and frames on a `dora fit` checkpoint, training-identical tracks, bad input."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import BUNDLED_VIDEO, frame_pattern, read_pattern_index, write_video
from PIL import Image
from test_cli import MICRO_ARGS
from torch.utils.tensorboard.summary import image as tensorboard_image

from dora_lightning.checkpoints import export_backbone
from dora_lightning.cli import main as dora_main
from dora_lightning.data.augment.colour_views import normalize_views
from dora_lightning.imagenet import IMAGENET_MEAN, IMAGENET_STD
from dora_lightning.models.backbone import build_vit
from dora_lightning.module import DoRAModule
from dora_lightning.pictures import attention_grid, track_grid, tracks_overlay
from dora_lightning.visualize import visualize
from dora_lightning.visualize_sources import clip_starts, open_source, read_frames

PAD = 2  # white pixels around every tile of a grid
FAST = dict(num_clips=2, clip_length=3, image_size=32)


@pytest.fixture(scope="module")
def fit_ckpt(tmp_path_factory) -> Path:
    """A 2-step `dora fit` of the micro model (3 heads) on the bundled video, tracking k=2 objects, 7 SK iterations."""
    root = tmp_path_factory.mktemp("fit")
    dora_main(
        [
            "fit",
            *MICRO_ARGS,
            f"--data.paths={BUNDLED_VIDEO}",
            "--model.num_objects=2",
            "--model.sk_iterations=7",
            "--trainer.max_steps=2",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={root}",
        ]
    )
    (ckpt,) = root.rglob("*.ckpt")
    return ckpt


@pytest.fixture(scope="module")
def video_run(fit_ckpt, tmp_path_factory) -> tuple[dict, Path]:
    """visualize() on the bundled video into a folder that already holds a user's files."""
    out = tmp_path_factory.mktemp("out")
    (out / "notes.txt").write_text("mine")
    (out / "clip9_tracks.png").write_bytes(b"an older picture")
    return visualize(fit_ckpt, BUNDLED_VIDEO, out, **FAST), out


@pytest.fixture(scope="module")
def frame_folder(tmp_path_factory) -> Path:
    """f0.png ... f11.png (96x64 pattern frames showing their index; unpadded names, so order must be natural)."""
    folder = tmp_path_factory.mktemp("frames")
    for index in range(12):
        Image.fromarray(frame_pattern(index, 96, 64)).save(folder / f"f{index}.png")
    return folder


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def tensorboard_pixels(grid: torch.Tensor) -> np.ndarray:
    """The pixels TensorBoard stores for ``experiment.add_image(tag, grid)`` (its own PNG encoding)."""
    encoded = tensorboard_image("tag", grid, dataformats="CHW").value[0].image.encoded_image_string
    return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))


def grid_size(rows: int, cols: int, height: int, width: int) -> tuple[int, int]:
    """(height, width) of a torchvision make_grid of rows x cols tiles of height x width, padding PAD."""
    return rows * (height + PAD) + PAD, cols * (width + PAD) + PAD


def mp4_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_video_outputs_sizes_and_summary(video_run, fit_ckpt):
    summary, out = video_run
    names = [f"clip{i}_{kind}" for i in (0, 1) for kind in ("attention.png", "tracks.png", "tracks.mp4")]
    assert summary["files"] == [*names, "summary.json"]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (out / "notes.txt").read_text() == "mine" and (
        out / "clip9_tracks.png"
    ).read_bytes() == b"an older picture"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*names, "summary.json", "notes.txt", "clip9_tracks.png"]
    )
    # 384x288 video -> short side 32: 43x32 -> centre crop to whole 8-pixel patches: 40x32 (5x4 patches)
    height, width, frames, heads, objects = 32, 40, 3, 3, 2
    for clip in summary["clips"]:
        assert clip["frame_size"] == [height, width] and clip["patch_grid"] == [4, 5]
        assert len(clip["heads"]) == objects and len(set(clip["heads"])) == objects
        assert png(out / clip["files"][0]).shape[:2] == grid_size(frames, 1 + heads, height, width)
        assert png(out / clip["files"][1]).shape[:2] == grid_size(1 + objects, frames, height, width)
        video = mp4_frames(out / clip["files"][2])
        assert len(video) == frames and all(f.shape == (height, width, 3) for f in video)
    # 795 frames, 10 fps -> stride 10 (1 s); a clip spans 21 frames; two clips centred in halves of the 774-frame room
    assert summary["settings"]["frame_stride"] == 10
    assert [c["frames"] for c in summary["clips"]] == [[194, 204, 214], [580, 590, 600]]
    settings = summary["settings"]
    assert (settings["num_objects"], settings["sk_iterations"], settings["sk_epsilon"]) == (2, 7, 0.05)
    assert (
        settings["from"]["num_objects"] == "checkpoint" and settings["from"]["sk_iterations"] == "checkpoint"
    )
    assert settings["video_codec"] in ("libx264", "mpeg4")
    assert summary["checkpoint"]["sha256"] == hashlib.sha256(fit_ckpt.read_bytes()).hexdigest()
    assert summary["checkpoint"]["kind"] == "lightning" and summary["checkpoint"]["which"] == "teacher"
    assert summary["architecture"]["num_heads"] == heads and summary["architecture"]["embed_dim"] == 48
    assert summary["source"] == {"path": str(BUNDLED_VIDEO), "kind": "video", "num_frames": 795, "fps": 10.0}


def test_pictures_are_the_training_tracker_and_tensorboard_images(video_run, fit_ckpt):
    """Same frames through DoRAModule._track (the training code path, same seeded head draws): the PNGs hold exactly
    the pixels TensorBoard stores for track_grid / attention_grid of the module's own masks and attention."""
    summary, out = video_run
    module = DoRAModule.load_from_checkpoint(fit_ckpt, map_location="cpu")
    module.head_generator = torch.Generator().manual_seed(0)
    source = open_source(BUNDLED_VIDEO)
    for clip in summary["clips"]:
        frames = normalize_views(read_frames(source, clip["frames"], 32, 8), IMAGENET_MEAN, IMAGENET_STD)
        _, tracked = module._track(frames[None])
        assert tracked.heads.tolist() == clip["heads"]
        masks = tracked.masks[0]
        tracks = png(out / clip["files"][1])
        assert np.array_equal(tracks, tensorboard_pixels(track_grid(frames, masks)))
        attention, grid = module._last_attention
        first_row = png(out / clip["files"][0])[: frames.shape[-2] + 2 * PAD]
        assert np.array_equal(first_row, tensorboard_pixels(attention_grid(frames[0], attention, grid)))
        # the video shows every object's mask over the frames (lossy codec: close, not equal)
        expected = (tracks_overlay(frames, masks).permute(0, 2, 3, 1).numpy() * 255).astype(np.float32)
        video = np.stack(mp4_frames(out / clip["files"][2])).astype(np.float32)
        assert np.abs(video - expected).mean() < 12


def test_video_frames_are_the_planned_ones(tmp_path):
    video = write_video(tmp_path / "pattern.mp4", 300, width=96, height=64)
    source = open_source(video)
    starts = clip_starts(source.num_frames, 21, 2)
    assert starts == [70, 209]  # 279 frames of room, clips centred in its halves
    indices = list(range(starts[1], starts[1] + 21, 10))
    frames = read_frames(source, indices, 64, 8)
    assert frames.shape == (3, 3, 64, 96) and frames.dtype == torch.uint8
    assert [read_pattern_index(f.permute(1, 2, 0).numpy()) for f in frames] == indices


@pytest.mark.parametrize(
    ("num_frames", "span", "clips"), [(100, 1, 1), (100, 100, 3), (795, 71, 5), (30, 7, 40)]
)
def test_clip_starts_stay_in_the_video(num_frames, span, clips):
    starts = clip_starts(num_frames, span, clips)
    assert len(starts) == clips and starts == sorted(starts)
    assert all(0 <= s <= num_frames - span for s in starts)
    if clips == 1:
        assert starts == [round((num_frames - span) / 2)]


def test_image_folder(fit_ckpt, frame_folder, tmp_path):
    summary = visualize(fit_ckpt, frame_folder, tmp_path, num_clips=2, clip_length=3, image_size=64)
    assert summary["source"]["kind"] == "images" and summary["source"]["num_frames"] == 12
    assert summary["settings"]["frame_stride"] == 1
    assert [c["frames"] for c in summary["clips"]] == [[2, 3, 4], [7, 8, 9]]
    source = open_source(frame_folder)
    for clip in summary["clips"]:  # natural order: position i is f{i}.png (f10 comes after f9, not after f1)
        frames = read_frames(source, clip["frames"], 64, 8)
        assert [read_pattern_index(f.permute(1, 2, 0).numpy()) for f in frames] == clip["frames"]
        assert clip["frame_size"] == [64, 96]
        assert png(tmp_path / clip["files"][0]).shape[:2] == grid_size(3, 4, 64, 96)
        assert png(tmp_path / clip["files"][1]).shape[:2] == grid_size(3, 3, 64, 96)
        assert [f.shape for f in mp4_frames(tmp_path / clip["files"][2])] == [(64, 96, 3)] * 3


def official_checkpoint(path: Path) -> Path:
    """An official DINO/DoRA layout (teacher/student with backbone./module. prefixes) of a 1-block ViT-Tiny/8."""
    torch.manual_seed(0)
    weights = build_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1).state_dict()
    head = {"head.last_layer.weight_g": torch.ones(16, 1)}
    torch.save(
        {
            "teacher": {**{f"backbone.{k}": v for k, v in weights.items()}, **head},
            "student": {**{f"module.backbone.{k}": v for k, v in weights.items()}, **head},
        },
        path,
    )
    return path


@pytest.mark.parametrize("kind", ["exported", "official"])
def test_backbone_files_use_the_default_tracker_settings(kind, fit_ckpt, tmp_path):
    if kind == "exported":
        ckpt = export_backbone(fit_ckpt, tmp_path / "teacher.pth")
    else:
        ckpt = official_checkpoint(tmp_path / "checkpoint.pth")
    summary = visualize(ckpt, BUNDLED_VIDEO, tmp_path / "out", **FAST)
    settings = summary["settings"]
    assert summary["checkpoint"]["kind"] == kind
    assert (settings["num_objects"], settings["sk_iterations"], settings["sk_epsilon"]) == (3, 30, 0.05)
    assert set(settings["from"].values()) == {"default"}
    tracks = png(tmp_path / "out" / "clip0_tracks.png")
    assert tracks.shape[:2] == grid_size(1 + 3, 3, 32, 40)


def test_arguments_override_the_checkpoint(fit_ckpt, tmp_path):
    summary = visualize(
        fit_ckpt, BUNDLED_VIDEO, tmp_path, num_objects=1, sk_iterations=3, frame_stride=2, **FAST
    )
    settings = summary["settings"]
    assert (settings["num_objects"], settings["sk_iterations"], settings["frame_stride"]) == (1, 3, 2)
    assert settings["from"]["num_objects"] == "argument" and settings["from"]["sk_epsilon"] == "checkpoint"
    assert png(tmp_path / "clip1_tracks.png").shape[:2] == grid_size(2, 3, 32, 40)


def test_help_through_dora_main(capsys):
    with pytest.raises(SystemExit) as exit_info:
        dora_main(["visualize", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--ckpt_path", "--source", "--output_dir", "--num_objects", "--frame_stride", "--fps_out"):
        assert option in out
    assert "clip{i}_tracks.mp4" in out and "docs/visualize.md" in out
    with pytest.raises(SystemExit) as exit_info:
        dora_main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "dora SUBCOMMAND --help" in out
    assert all(sub in out for sub in ("fit", "validate", "visualize", "compare", "export"))


def test_run_through_dora_main(fit_ckpt, tmp_path, capsys):
    dora_main(
        ["visualize", f"--ckpt_path={fit_ckpt}", "--source", str(BUNDLED_VIDEO), f"--output_dir={tmp_path}"]
        + ["--num_clips=1", "--clip_length=2", "--image_size=32", "--fps_out=2"]
    )
    assert f"wrote 4 files to {tmp_path}" in capsys.readouterr().out
    with av.open(str(tmp_path / "clip0_tracks.mp4")) as container:
        assert container.streams.video[0].average_rate == 2
        assert sum(1 for _ in container.decode(video=0)) == 2


BAD_INPUT = {
    "missing_ckpt": (
        "--ckpt_path={tmp}/none.ckpt",
        "none.ckpt' does not exist; give a checkpoint from `dora fit`",
    ),
    "wrong_kind": ("--ckpt_path={tmp}/empty.ckpt", "holds no DoRA/DINO backbone weights"),
    "not_a_checkpoint": ("--ckpt_path={tmp}/notes.txt", "notes.txt' is not a PyTorch checkpoint"),
    "missing_video": (
        "--source={tmp}/none.mp4",
        "none.mp4' does not exist; give a video file or a folder of frames",
    ),
    "corrupt_video": ("--source={tmp}/corrupt.mp4", "corrupt.mp4' is not a readable video"),
    # a truncated file holds the frames before the cut (counted from its packets): too few here for one clip
    "truncated_video": ("--source={tmp}/truncated.mp4", "truncated.mp4' has "),
    "no_images": ("--source={tmp}/empty_folder", "empty_folder' holds no images (.png"),
    "clip_too_long": (
        "--clip_length=100",
        "has 795 frames but a clip of 100 frames 10 apart spans 991; lower",
    ),
    "too_many_objects": ("--num_objects=4", "--num_objects=4: '"),
    "output_under_a_file": ("--output_dir={tmp}/notes.txt/out", "cannot write to --output_dir '"),
    "output_is_a_file": ("--output_dir={tmp}/notes.txt", "notes.txt' is a file, not a folder"),
    "zero_clips": ("--num_clips=0", "--num_clips must be positive, got 0"),
    "image_below_patch": ("--image_size=4", "--image_size 4 is smaller than the patch size 8"),
    "bad_device": ("--device=gpu0", "--device 'gpu0' is not a torch device"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_clear_line(case, fit_ckpt, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "empty_folder" / "readme.txt").write_text("no frames here")
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x01 definitely not a video" * 100)
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}}, tmp_path / "empty.ckpt")
    if case == "truncated_video":
        full = write_video(tmp_path / "full.mp4", 300, faststart=True).read_bytes()
        (tmp_path / "truncated.mp4").write_bytes(full[: len(full) // 10])
    override, message = BAD_INPUT[case]
    argv = [f"--ckpt_path={fit_ckpt}", f"--source={BUNDLED_VIDEO}", f"--output_dir={tmp_path / 'out'}"]
    # the last value of a flag wins, so the case's override comes last
    argv += ["--image_size=32", "--clip_length=3", override.format(tmp=tmp_path)]
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        dora_main(["visualize", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("dora visualize: error: ") and err.count("\n") == 1, err
    assert message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing may be written on bad input"
