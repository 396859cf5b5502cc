"""Shared fixtures: small generated videos whose frames can be identified after lossy compression."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLED_VIDEO = REPO / "assets" / "video" / "vtest.mp4"

# A micro ViT DoRA module (2 blocks, 48 wide, 3 heads, 8-pixel patches at 32 px) for fast CPU tests.
MICRO_MODULE = dict(
    backbone="vit_tiny_patch16_224",
    img_size=32,
    patch_size=8,
    depth=2,
    embed_dim=48,
    num_heads=3,
    out_dim=64,
    head_hidden_dim=32,
    head_bottleneck_dim=16,
)


def frame_pattern(index: int, width: int, height: int) -> np.ndarray:
    """A frame that shows its own index: 12 bars, black or white by the index's bits, over a moving gradient."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[..., 0] = ((x + 3 * index) % 256).astype(np.uint8)
    img[..., 1] = ((y + 5 * index) % 256).astype(np.uint8)
    img[..., 2] = 128
    bar_w = width // 12
    for bit in range(12):
        img[: height // 3, bit * bar_w : (bit + 1) * bar_w] = 255 if (index >> bit) & 1 else 0
    return img


def read_pattern_index(img: np.ndarray) -> int:
    """Inverse of ``frame_pattern`` on a decoded (possibly downscaled) frame."""
    height, width = img.shape[:2]
    bar_w = width / 12
    value = 0
    for bit in range(12):
        x0, x1 = int(bit * bar_w + bar_w * 0.3), int((bit + 1) * bar_w - bar_w * 0.3)
        if img[2 : max(3, height // 3 - 2), x0:x1].mean() > 127:
            value |= 1 << bit
    return value


def write_video(
    path: Path,
    num_frames: int,
    fps: int = 30,
    width: int = 96,
    height: int = 64,
    gop: int = 12,
    codec: str = "libx264",
    faststart: bool = False,
) -> Path:
    """Write a video of ``frame_pattern`` frames (H.264 by default, a keyframe every ``gop`` frames)."""
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "ultrafast", "g": str(gop), "sc_threshold": "0"}
        for index in range(num_frames):
            frame = av.VideoFrame.from_ndarray(frame_pattern(index, width, height), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="session")
def video_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a 300-frame and a 180-frame generated video (30 fps, GOP 12)."""
    folder = tmp_path_factory.mktemp("videos")
    write_video(folder / "a.mp4", 300)
    write_video(folder / "b.mkv", 180)
    return folder


def micro_vit(seed: int = 0, depth: int = 2) -> Any:
    """A seeded micro ViT for evaluator tests (32 px, patch 8, width 48, 3 heads)."""
    import torch

    from dora_lightning.models.backbone import build_vit

    torch.manual_seed(seed)
    return build_vit(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=depth, embed_dim=48, num_heads=3
    )


def cpu_trainer_kwargs(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    """Quiet single-CPU Trainer options for an evaluator's ``evaluate(backbone, trainer_kwargs)``."""
    return {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
        **extra,
    }
