"""Generated test videos of other pixel formats and colour: odd sizes, 4:4:4, 10-bit H.264 and HEVC, and HDR
(HLG, PQ) tagged as phones record it, with ``bt2020_yuv10`` to write an HDR signal as 10-bit BT.2020 YUV."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
from conftest import frame_pattern
from video_encode import X264, Fixture, H, W, _encode, _plain


def sized(folder: Path, name: str, size: tuple[int, int], pix_fmt: str, n: int = 60) -> Fixture:
    """H.264 at an odd size or another pixel format (4:4:4, 10-bit)."""
    path = _encode(folder / name, _plain(n), size=size, pix_fmt=pix_fmt, options=X264 | {"crf": "10"})
    return Fixture(path, list(range(n)), {"size": size})


def hevc_ten_bit(folder: Path, n: int = 60) -> Fixture:
    """HEVC Main 10 in a QuickTime file, as phones record."""
    x265 = {"preset": "ultrafast", "crf": "10", "x265-params": "log-level=none:keyint=30"}
    return Fixture(
        _encode(folder / "phone.mov", _plain(n), codec="libx265", pix_fmt="yuv420p10le", options=x265),
        list(range(n)),
    )


def bt2020_yuv10(signal: np.ndarray) -> np.ndarray:
    """Non-linear R'G'B' signal (H, W, 3) in [0, 1] as a ``yuv420p10le`` array ((3H / 2, W) uint16): the BT.2020
    non-constant-luminance matrix, limited range (Y 64-940, Cb/Cr 64-960), chroma averaged over 2x2 pixels."""
    height, width = signal.shape[:2]
    luma = signal @ [0.2627, 0.6780, 0.0593]
    cb, cr = ((signal[..., c] - luma) / scale for c, scale in ((2, 1.8814), (0, 1.4746)))
    halves = [p.reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3)) for p in (cb, cr)]
    planes = [64 + 876 * luma, *(512 + 896 * p for p in halves)]
    return np.concatenate([np.round(p).astype(np.uint16).ravel() for p in planes]).reshape(-1, width)


HDR_X265 = {"preset": "ultrafast", "crf": "4", "x265-params": "log-level=none:keyint=30"}


def _hdr_tags(transfer: int) -> Callable[[av.container.OutputContainer], None]:
    """Tags the video stream HDR as phones do: ``transfer`` (FFmpeg's 18 HLG, 16 PQ), BT.2020 primaries and
    matrix, limited range."""

    def tag(container: av.container.OutputContainer) -> None:
        context = container.streams.video[0].codec_context
        context.color_trc, context.color_primaries, context.colorspace, context.color_range = (
            transfer,
            9,
            9,
            1,
        )

    return tag


def hlg_pattern(folder: Path, n: int = 60) -> Fixture:
    """An iPhone-style HLG HEVC Main 10 .mov whose frames show their own index (``frame_pattern`` read as the HLG
    signal): tone-mapped, its bars stay black and white, so the frame numbering can be checked as for SDR files."""
    return Fixture(
        _encode(
            folder / "hlg_walk.mov",
            _plain(n),
            codec="libx265",
            pix_fmt="yuv420p10le",
            options=HDR_X265,
            after=_hdr_tags(18),
            image=lambda index, width, height: bt2020_yuv10(frame_pattern(index, width, height) / 255.0),
            image_format="yuv420p10le",
        ),
        list(range(n)),
    )


def hdr(folder: Path, transfer: str, top: tuple, bottom: tuple, n: int = 30) -> Fixture:
    """HEVC Main 10 HDR as phones record it (``transfer`` "hlg": iPhones' ARIB STD-B67 in a .mov; "pq": SMPTE ST 2084,
    some Androids, in an .mp4), BT.2020 primaries and matrix, tagged on the stream; every frame shows the HDR signal
    ``top`` (R'G'B' in [0, 1]) over its top half and ``bottom`` over the bottom half (``notes["signals"]``)."""
    trc, name = {"hlg": (18, "hlg.mov"), "pq": (16, "pq.mp4")}[transfer]
    signal = np.empty((H, W, 3))
    signal[: H // 2], signal[H // 2 :] = top, bottom
    yuv = bt2020_yuv10(signal)
    options = {"codec": "libx265", "pix_fmt": "yuv420p10le", "options": HDR_X265, "after": _hdr_tags(trc)}
    path = _encode(folder / name, _plain(n), **options, image=lambda *_: yuv, image_format="yuv420p10le")
    return Fixture(path, list(range(n)), {"signals": (top, bottom)})
