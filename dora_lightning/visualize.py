"""`dora visualize`: a checkpoint's last-layer CLS attention and the DoRA tracker's object tracks on a video, as files.

For ``num_clips`` clips spread evenly over a video (or a folder of frames), the backbone runs on every frame (eval,
no grad) and the tracker runs on the clip exactly as :class:`~dora_lightning.module.DoRAModule` runs it in training
(k heads drawn with a seeded generator, Sinkhorn-Knopp settings and mask threshold from the checkpoint). Per clip it
writes ``clip{i}_attention.png`` (:func:`~dora_lightning.pictures.attention_rows`), ``clip{i}_tracks.png``
(:func:`~dora_lightning.pictures.track_grid`, the image TensorBoard shows during fit) and ``clip{i}_tracks.mp4``; then
``summary.json``. See docs/visualize.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from dora_lightning.checkpoint_formats import Which, read_checkpoint
from dora_lightning.checkpoints import BackboneInfo, load_backbone
from dora_lightning.core.tracker import SK_EPSILON, SK_ITERATIONS, TrackingOptions, sample_heads
from dora_lightning.data.augment.colour_views import normalize_views
from dora_lightning.data.sampling import ClipSpec
from dora_lightning.imagenet import IMAGENET_MEAN, IMAGENET_STD
from dora_lightning.models.backbone import clip_tracker_inputs, forward_with_last_block_taps, patch_size_of
from dora_lightning.pictures import (
    attention_rows,
    save_png,
    track_grid,
    tracks_overlay,
    video_codec,
    write_mp4,
)
from dora_lightning.visualize_sources import FrameSource, clip_starts, open_source, read_frames

DEFAULT_NUM_OBJECTS = 3


# --------------------------------------------------------------------------------------------------- tracker
@dataclass(frozen=True)
class TrackerSettings:
    """How the tracker runs: k objects, Sinkhorn-Knopp settings, official arithmetic; and where each came from."""

    num_objects: int
    sk_epsilon: float
    sk_iterations: int
    official_compat: bool
    sources: dict[str, str]


def checkpoint_hparams(path: Path, info: BackboneInfo) -> dict[str, Any]:
    """The ``hyper_parameters`` of a ``dora fit`` checkpoint (memory-mapped read); ``{}`` for other kinds."""
    if info.kind != "lightning":
        return {}
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (
        Exception
    ):  # torch raises many types: read_checkpoint explains the problem or unpickles our own file
        checkpoint = read_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    return dict(hparams) if isinstance(hparams, dict) else {}


def resolve_tracker_settings(
    hparams: dict[str, Any],
    num_heads: int,
    num_objects: int | None = None,
    sk_epsilon: float | None = None,
    sk_iterations: int | None = None,
    ckpt_name: str = "the checkpoint",
) -> TrackerSettings:
    """Explicit values win, then the checkpoint's hparams, then the defaults (k = 3 at most the heads; spec A.4)."""
    sources: dict[str, str] = {}

    def pick(name: str, given: Any, default: Any) -> Any:
        if given is not None:
            sources[name] = "argument"
            return given
        if hparams.get(name) is not None:
            sources[name] = "checkpoint"
            return hparams[name]
        sources[name] = "default"
        return default

    k = int(pick("num_objects", num_objects, min(DEFAULT_NUM_OBJECTS, num_heads)))
    if not 1 <= k <= num_heads:
        raise ValueError(
            f"--num_objects={k}: {ckpt_name} has {num_heads} heads in its last block and each object is seeded by "
            f"a different head; pick 1 to {num_heads}"
        )
    epsilon = float(pick("sk_epsilon", sk_epsilon, SK_EPSILON))
    iterations = int(pick("sk_iterations", sk_iterations, SK_ITERATIONS))
    if epsilon <= 0 or iterations < 1:
        raise ValueError(f"--sk_epsilon must be > 0 and --sk_iterations >= 1, got {epsilon} and {iterations}")
    official = bool(pick("official_compat", None, False))
    return TrackerSettings(k, epsilon, iterations, official, sources)


@dataclass
class ClipAnalysis:
    """What the pictures of one clip are drawn from (all on the CPU).

    Attributes:
        frames: (T, 3, H, W) ImageNet-normalised frames.
        cls_attention: (T, h, N) last-block CLS->patch attention per head, for every frame.
        grid: (gh, gw) patch grid, N = gh * gw.
        masks: (k, T, gh, gw) bool object masks of the tracker.
        heads: (k,) the heads that seeded the objects.
    """

    frames: Tensor
    cls_attention: Tensor
    grid: tuple[int, int]
    masks: Tensor
    heads: Tensor


@torch.no_grad()
def analyse_clip(
    model: VisionTransformer, frames: Tensor, heads: Tensor, settings: TrackerSettings
) -> ClipAnalysis:
    """Backbone taps of every frame (T, 3, H, W, normalised, on the model's device) and the tracker on the clip."""
    taps = forward_with_last_block_taps(model, frames)
    patch_size = patch_size_of(model)
    options = TrackingOptions(settings.sk_epsilon, settings.sk_iterations, settings.official_compat)
    tracked = options.track(clip_tracker_inputs(taps, 1, frames.shape[0]), heads, frames[None], patch_size)
    return ClipAnalysis(
        frames.cpu(), taps.cls_attention.cpu(), taps.grid, tracked.masks[0].cpu(), tracked.heads.cpu()
    )


# --------------------------------------------------------------------------------------------------- orchestration
def _positive(name: str, value: float | int) -> None:
    if value <= 0:
        raise ValueError(f"--{name} must be positive, got {value}")


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available on this machine; use --device cpu")
    return device


def _prepare_output_dir(output_dir: Path) -> None:
    """Create ``output_dir`` (and parents) and prove it writable with a temporary file; never touch other files."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir '{output_dir}' is a file, not a folder; choose another --output_dir")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as err:
        raise ValueError(
            f"cannot write to --output_dir '{output_dir}' ({err.strerror or err}); choose a writable folder"
        ) from err


def _write_clip(
    analysis: ClipAnalysis, output_dir: Path, index: int, fps_out: float, codec: str
) -> list[str]:
    names = [f"clip{index}_attention.png", f"clip{index}_tracks.png", f"clip{index}_tracks.mp4"]
    save_png(attention_rows(analysis.frames, analysis.cls_attention, analysis.grid), output_dir / names[0])
    save_png(track_grid(analysis.frames, analysis.masks), output_dir / names[1])
    write_mp4(tracks_overlay(analysis.frames, analysis.masks), output_dir / names[2], fps_out, codec)
    return names


def _write_summary(
    out: Path,
    ckpt: Path,
    info: BackboneInfo,
    num_heads: int,
    src: FrameSource,
    settings: dict[str, Any],
    clips: list[dict[str, Any]],
) -> dict[str, Any]:
    """Write ``summary.json`` (checkpoint, architecture, source, settings, versions, clips, files); return it."""
    architecture = {
        key: getattr(info, key) for key in ("model_name", "model_kwargs", "patch_size", "embed_dim")
    }
    summary = {
        "checkpoint": {
            "path": str(ckpt.resolve()),
            "sha256": info.sha256,
            "kind": info.kind,
            "which": info.which,
        },
        "architecture": {**architecture, "depth": info.depth, "num_heads": num_heads},
        "source": {
            "path": str(src.path.resolve()),
            "kind": src.kind,
            "num_frames": src.num_frames,
            "fps": src.fps,
        },
        "settings": settings,
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "av": av.__version__},
        "output_dir": str(out.resolve()),
        "clips": clips,
        "files": [name for clip in clips for name in clip["files"]] + ["summary.json"],
    }
    partial = out / ".summary.json.partial"
    partial.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(partial, out / "summary.json")
    return summary


def visualize(
    ckpt_path: str | Path,
    source: str | Path,
    output_dir: str | Path,
    which: Which = "teacher",
    num_clips: int = 2,
    clip_length: int = 8,
    frame_stride: int | None = None,
    image_size: int = 224,
    num_objects: int | None = None,
    sk_epsilon: float | None = None,
    sk_iterations: int | None = None,
    seed: int = 0,
    fps_out: float = 4.0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Render a checkpoint's CLS attention per head and the tracker's object tracks on clips of a video; see module doc.

    ``frame_stride`` defaults to one second of video (round(fps) frames) and to 1 for a folder of frames;
    ``num_objects``, ``sk_epsilon`` and ``sk_iterations`` default to the ``dora fit`` checkpoint's settings, else to
    3 (at most the number of heads), 0.05 and 30. Every check runs before anything is written; files already in
    ``output_dir`` are kept (ours are overwritten). Returns the summary also written to ``summary.json``.

    Raises:
        FileNotFoundError: the checkpoint or the source does not exist.
        ValueError: (including ``VideoSourceError``) a bad argument or file; the message says what to do.
    """
    for name, value in (("num_clips", num_clips), ("clip_length", clip_length), ("image_size", image_size)):
        _positive(name, value)
    _positive("fps_out", fps_out)
    if frame_stride is not None:
        _positive("frame_stride", frame_stride)
    ckpt, out = Path(ckpt_path).expanduser(), Path(output_dir).expanduser()
    model, info = load_backbone(ckpt, which=which)
    if image_size < info.patch_size:
        raise ValueError(f"--image_size {image_size} is smaller than the patch size {info.patch_size}")
    num_heads = int(model.blocks[-1].attn.num_heads)
    settings = resolve_tracker_settings(
        checkpoint_hparams(ckpt, info), num_heads, num_objects, sk_epsilon, sk_iterations, f"'{ckpt}'"
    )
    src = open_source(source)
    stride = frame_stride or (max(1, round(src.fps)) if src.fps else 1)
    spec = ClipSpec(clip_length, stride)  # the clip geometry training uses
    span = spec.span
    if span > src.num_frames:
        raise ValueError(
            f"'{src.path}' has {src.num_frames} frames but a clip of {clip_length} frames {stride} "
            f"apart spans {span}; lower --clip_length or --frame_stride"
        )
    run_on = _device(device)
    try:
        codec = video_codec()
    except RuntimeError as err:
        raise ValueError(str(err)) from err
    starts = clip_starts(src.num_frames, span, num_clips)
    clip_frames = [spec.frames(start).tolist() for start in starts]
    decoded = [read_frames(src, indices, image_size, info.patch_size) for indices in clip_frames]
    _prepare_output_dir(out)

    model.to(run_on)
    generator = torch.Generator().manual_seed(seed)
    clips = []
    for index, (indices, pixels) in enumerate(zip(clip_frames, decoded, strict=True)):
        frames = normalize_views(pixels.to(run_on), IMAGENET_MEAN, IMAGENET_STD)
        heads = sample_heads(num_heads, settings.num_objects, generator)
        analysis = analyse_clip(model, frames, heads, settings)
        names = _write_clip(analysis, out, index, fps_out, codec)
        area = analysis.masks.float().mean(dim=(1, 2, 3))
        clips.append(
            {
                "index": index,
                "frames": indices,
                "frame_size": list(pixels.shape[-2:]),
                "patch_grid": list(analysis.grid),
                "heads": analysis.heads.tolist(),
                "mask_area": [round(a, 4) for a in area.tolist()],
                "files": names,
            }
        )
    run_settings = {
        "num_clips": num_clips,
        "clip_length": clip_length,
        "frame_stride": stride,
        "image_size": image_size,
        "num_objects": settings.num_objects,
        "sk_epsilon": settings.sk_epsilon,
        "sk_iterations": settings.sk_iterations,
        "mask_threshold": "batch" if settings.official_compat else "per_sample",
        "log_domain_sinkhorn": not settings.official_compat,
        "from": settings.sources,
        "seed": seed,
        "fps_out": fps_out,
        "device": str(run_on),
        "video_codec": codec,
    }
    return _write_summary(out, ckpt, info, num_heads, src, run_settings, clips)


# --------------------------------------------------------------------------------------------------- command line
_REQUIRED = object()
_OPTIONS: tuple[tuple[str, type, Any, str], ...] = (
    (
        "ckpt_path",
        str,
        _REQUIRED,
        "a `dora fit` .ckpt, a dora-export backbone or an official DINO/DoRA checkpoint",
    ),
    ("source", str, _REQUIRED, "a video file, or a folder of frames (image files, in natural name order)"),
    ("output_dir", str, _REQUIRED, "folder to write into (created if missing; files already there are kept)"),
    ("which", str, "teacher", "backbone of the checkpoint to show"),
    ("num_clips", int, 2, "clips, spread evenly over the source"),
    ("clip_length", int, 8, "frames per clip (T)"),
    (
        "frame_stride",
        int,
        None,
        "frames between consecutive frames of a clip (default: 1 s of video; 1 for a folder)",
    ),
    ("image_size", int, 224, "short side of the frames in pixels, before the centre crop to whole patches"),
    (
        "num_objects",
        int,
        None,
        "objects k to track (default: the `dora fit` checkpoint's model.num_objects, else 3)",
    ),
    ("sk_epsilon", float, None, "Sinkhorn-Knopp epsilon (default: the checkpoint's, else 0.05)"),
    ("sk_iterations", int, None, "Sinkhorn-Knopp iterations (default: the checkpoint's, else 30)"),
    ("seed", int, 0, "seed of the generator that draws the k heads (one draw per clip)"),
    ("fps_out", float, 4.0, "frame rate of the MP4 files"),
    ("device", str, "cpu", "torch device to run the backbone on (cpu, cuda, cuda:1, ...)"),
)


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `dora visualize`."""
    parser = argparse.ArgumentParser(
        prog="dora visualize",
        description=(
            "Show what a checkpoint's ViT attends to and what DoRA's tracker follows: for NUM_CLIPS clips spread "
            "evenly over a video (or a folder of frames), write clip{i}_attention.png (every frame, then each "
            "last-layer head's CLS attention over it, one row per frame), clip{i}_tracks.png (the frames, then one "
            "row per tracked object with its mask; the image TensorBoard shows during `dora fit`), clip{i}_tracks.mp4 "
            "(all objects' masks in their colours) and summary.json. See docs/visualize.md."
        ),
        epilog=(
            "example: dora visualize --ckpt_path runs/demo/seed0/dora/checkpoints/last.ckpt --source assets/video/vtest.mp4 "
            "--output_dir runs/demo/visualize --image_size 64"
        ),
    )
    for flag, kind, default, text in _OPTIONS:
        extra: dict[str, Any] = {"required": True} if default is _REQUIRED else {"default": default}
        if default not in (_REQUIRED, None):
            text = f"{text} (default: {default})"
        if flag == "which":
            extra["choices"] = ("teacher", "student")
        parser.add_argument(f"--{flag}", type=kind, help=text, **extra)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `dora visualize`: prints the files written; on bad input one error line and status 2 (the
    traceback instead with ``DORA_TRACEBACK=1``, docs/troubleshooting.md)."""
    from dora_lightning.errors import report_error, wants_traceback

    args = build_parser().parse_args(argv)
    try:
        summary = visualize(**vars(args))
    except (FileNotFoundError, ValueError) as err:
        if wants_traceback():
            raise
        report_error("dora visualize", str(err))
        return 2
    print(f"wrote {len(summary['files'])} files to {summary['output_dir']}: {', '.join(summary['files'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
