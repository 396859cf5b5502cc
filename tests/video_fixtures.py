"""Small generated videos of the kinds users feed the trainer (PyAV only), each with the frame a player shows at
every frame index: ``Fixture.expected[i]`` is the ``frame_pattern`` index visible at frame ``i`` (None: refused).
This module holds the container, timestamp, stream-layout and damaged-file builders and ``build_all``; the encoder
and ``Fixture`` are in video_encode.py, the pixel-format and HDR builders in video_colour_fixtures.py."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from conftest import frame_pattern
from video_colour_fixtures import hevc_ten_bit, hlg_pattern, sized
from video_encode import X264, Fixture, H, W, _encode, _plain, mux_pattern_frames


def pts_equal_dts(folder: Path, n: int = 120) -> Fixture:
    """H.264 with B-frames, re-muxed with every packet's PTS set to its DTS (as some muxers write)."""
    source = _encode(folder / "bframes_src.mp4", _plain(n), options=X264 | {"bf": "3", "preset": "superfast"})
    path = folder / "pts_eq_dts.mp4"
    with av.open(str(source)) as src, av.open(str(path), "w") as dst:
        ist = src.streams.video[0]
        ost = dst.add_stream_from_template(ist)
        first = None
        for packet in src.demux(ist):
            if packet.size == 0:
                continue
            first = packet.dts if first is None else first
            packet.pts = packet.dts = packet.dts - first
            packet.stream = ost
            dst.mux(packet)
    return Fixture(path, list(range(n)))


def dropped_frames_avi(folder: Path, grid: int = 150) -> Fixture:
    """An MPEG-4 AVI at 15 fps whose capture dropped frames: some grid times have no coded frame (the muxer writes
    zero-size entries there); a player repeats the previous frame."""
    rng = np.random.default_rng(7)
    coded = sorted({0, *rng.choice(np.arange(1, grid), size=grid // 6, replace=False).tolist(), grid - 1})
    path = _encode(
        folder / "dropped.avi",
        [(t, t) for t in coded],
        codec="mpeg4",
        rate=Fraction(15),
        options={"qscale": "2", "g": "30"},
    )
    expected = [max(t for t in coded if t <= i) for i in range(grid)]
    return Fixture(path, expected, {"coded": len(coded), "grid": grid})


def variable_rate(folder: Path) -> Fixture:
    """A 30 fps MKV with millisecond timestamps off the grid: jitter, a gap (a player repeats) and a burst of extra
    frames (a player drops some)."""
    times = [round(i * 1000 / 30 + (7 if i % 5 == 2 else 0)) for i in range(60)]
    times += [2000 + k * 100 for k in range(5)]  # 2 s..2.4 s at 10 fps: a gap
    times += [2500 + k * 10 for k in range(10)]  # a burst at 100 fps
    times += [round(2600 + i * 1000 / 30) for i in range(60)]
    path = _encode(folder / "vfr.mkv", [(t, k) for k, t in enumerate(times)], time_base=Fraction(1, 1000))
    return Fixture(path, None, {"times_ms": times})


def expected_for_times(
    times_ms: list[int], fps: Fraction, num_frames: int, source_fps: Fraction | None = None
) -> list[int]:
    """The coded frame a player shows at each frame index: the latest one due by the index's time (half a frame of
    tolerance, of the file's own rate ``source_fps`` when that is faster), counting from the first frame."""
    period = 1000 / float(fps)
    tolerance = 500 / max(float(fps), float(source_fps or fps))
    shown = []
    for i in range(num_frames):
        due = [k for k, t in enumerate(times_ms) if t - times_ms[0] <= i * period + tolerance + 1e-6]
        shown.append(due[-1])
    return shown


def no_frame_count(folder: Path, suffix: str, n: int = 90) -> Fixture:
    """An MKV (H.264) or WebM (VP9) file: Matroska headers carry no frame count."""
    if suffix == ".webm":
        path = _encode(
            folder / "nocount.webm", _plain(n), codec="libvpx-vp9", options={"crf": "20", "g": "30"}
        )
    else:
        path = _encode(folder / "nocount.mkv", _plain(n), options=X264)
    return Fixture(path, list(range(n)))


def starts_late(folder: Path, n: int = 90, offset: int = 15) -> Fixture:
    """An MP4 whose first frame is at 0.5 s (start_time > 0: an edit list / a stream that starts late)."""
    path = _encode(folder / "late.mp4", [(offset + i, i) for i in range(n)], options=X264)
    return Fixture(path, list(range(n)), {"offset": offset})


def _portrait(index: int, width: int, height: int) -> np.ndarray:
    """The stored (landscape) image of an upright portrait ``frame_pattern``: turned 90 degrees counter-clockwise,
    for a player to turn back clockwise."""
    return np.ascontiguousarray(np.rot90(frame_pattern(index, height, width), 1))


def rotated(folder: Path, n: int = 60) -> Fixture:
    """A phone video: a portrait (72 x 96) picture stored landscape (96 x 72) with a display matrix of -90 degrees
    (the "rotate=90" tag): a player turns it clockwise."""
    path = _encode(
        folder / "portrait.mp4", _plain(n), options=X264, size=(96, 72), rotation=-90, image=_portrait
    )
    return Fixture(path, list(range(n)), {"upright": (72, 96)})


def open_gop(folder: Path, n: int = 120) -> Fixture:
    """H.264 with open GOPs (leading B-frames refer to the previous GOP) and B-frames."""
    options = X264 | {"preset": "superfast", "bf": "3", "x264-params": "open-gop=1"}
    return Fixture(_encode(folder / "open_gop.mp4", _plain(n), options=options), list(range(n)))


def _audio_stream(container: av.container.OutputContainer) -> None:
    audio = container.add_stream("aac", rate=48000)
    audio.layout = "mono"


def audio_first(folder: Path, n: int = 90) -> Fixture:
    """An MP4 whose first stream is audio (stream 0) and second the video (audio packets hold no samples here)."""
    return Fixture(
        _encode(folder / "audio_first.mp4", _plain(n), options=X264, before=_audio_stream), list(range(n))
    )


def two_video_streams(folder: Path, n: int = 90) -> Fixture:
    """An MKV with two video streams: the first (our pattern) is used, the second (a flat grey picture) ignored."""
    path = folder / "two_streams.mkv"
    with av.open(str(path), "w") as container:
        streams = []
        for _ in range(2):
            stream = container.add_stream("libx264", rate=30)
            stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
            stream.options = X264
            streams.append(stream)
        for i in range(n):
            images = (frame_pattern(i, W, H), np.full((H, W, 3), 90, dtype=np.uint8))
            for stream, image in zip(streams, images, strict=True):
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = i
                for packet in stream.encode(frame):
                    container.mux(packet)
        for stream in streams:
            for packet in stream.encode():
                container.mux(packet)
    return Fixture(path, list(range(n)))


def cover_first(folder: Path, n: int = 90) -> Fixture:
    """An MKV whose first video stream is a one-frame JPEG picture (a cover or thumbnail track), then the video."""
    path = folder / "cover_first.mkv"
    with av.open(str(path), "w") as container:
        cover = container.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = W, H, "yuvj420p"
        video = container.add_stream("libx264", rate=30)
        video.width, video.height, video.pix_fmt = W, H, "yuv420p"
        video.options = X264
        picture = av.VideoFrame.from_ndarray(np.full((H, W, 3), 200, dtype=np.uint8), format="rgb24")
        picture.pts = 0
        for packet in [*cover.encode(picture.reformat(format="yuvj420p")), *cover.encode(None)]:
            container.mux(packet)
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(frame_pattern(i, W, H), format="rgb24")
            frame.pts = i
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)
    return Fixture(path, list(range(n)))


def mpeg_ts(folder: Path, n: int = 300) -> Fixture:
    """An MPEG-TS file (dash-cams, camcorders' .MTS): no index, so FFmpeg's seeking in it lands past the keyframe."""
    return Fixture(_encode(folder / "dashcam.ts", _plain(n), options=X264), list(range(n)))


def av1(folder: Path, n: int = 90) -> Fixture:
    """AV1 (as YouTube serves many videos, Walking Tours among them), with hidden frames and 3-byte "show an earlier
    frame" packets; decoded by libdav1d, which reads ``skip_frame`` only when it opens."""
    quiet = os.environ.get("SVT_LOG")
    os.environ["SVT_LOG"] = "1"  # the SVT-AV1 encoder's banner otherwise fills the test output
    try:
        path = _encode(
            folder / "youtube_av1.mkv", _plain(n), codec="libsvtav1", options={"preset": "12", "g": "30"}
        )
    finally:
        if quiet is None:
            del os.environ["SVT_LOG"]
        else:
            os.environ["SVT_LOG"] = quiet
    return Fixture(path, list(range(n)))


def starts_mid_gop(folder: Path, n: int = 150) -> Fixture:
    """An MPEG-TS capture that starts mid-GOP (a live stream recorded from an IP camera, a download cut at its start):
    the packets before its first keyframe cannot be decoded; a player starts at that keyframe (frame 30 here)."""
    whole = _encode(folder / "whole.ts", _plain(n), options=X264 | {"bf": "0"})
    with av.open(str(whole)) as container:
        positions = [packet.pos for packet in container.demux(video=0) if packet.size]
    cut = positions[10] // 188 * 188  # inside the first GOP, on a TS packet boundary
    path = folder / "ipcam.ts"
    path.write_bytes(whole.read_bytes()[cut:])
    return Fixture(path, list(range(30, n)))


def joined_segments(folder: Path, n: int = 60) -> Fixture:
    """Two MPEG-TS dash-cam segments joined end to end (``cat a.ts b.ts``): the second's timestamps restart at the
    first's, so half the frames repeat timestamps; only the first segment's can be placed (a warning says so)."""
    first = _encode(folder / "segment1.ts", _plain(n), options=X264)
    second = _encode(folder / "segment2.ts", [(i, n + i) for i in range(n)], options=X264)
    path = folder / "joined.ts"
    path.write_bytes(first.read_bytes() + second.read_bytes())
    return Fixture(path, None, {"repeated": n})


def anamorphic(folder: Path, n: int = 60) -> Fixture:
    """Non-square pixels (sample aspect ratio 4:3, as HDV camcorders' 1440x1080 shown as 1920x1080): stored 96x64,
    shown 128x64."""

    def pixel_aspect(container: av.container.OutputContainer) -> None:
        container.streams.video[0].codec_context.sample_aspect_ratio = Fraction(4, 3)

    path = _encode(folder / "hdv.m2ts", _plain(n), options=X264, after=pixel_aspect)
    return Fixture(path, list(range(n)), {"size": (128, 64)})


def raw_stream(folder: Path, codec: str = "libx264", n: int = 120) -> Fixture:
    """A raw H.264 (or HEVC) elementary stream, no container (Raspberry Pi cameras, some dash-cams): no timestamps,
    FFmpeg cannot seek in it, and its demuxer's rate is a placeholder 25 fps (the stream states 30)."""
    name, muxer = ("pi_camera.h264", "h264") if codec == "libx264" else ("dashcam.h265", "hevc")
    path = folder / name
    with av.open(str(path), "w", format=muxer) as container:
        stream = container.add_stream(codec, rate=30)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = (
            X264 if codec == "libx264" else {"preset": "ultrafast", "x265-params": "log-level=none:keyint=30"}
        )
        mux_pattern_frames(container, stream, n)
    return Fixture(path, list(range(n)))


def corrupt_middle(folder: Path, n: int = 300, fps: int = 60, gop: int = 120) -> Fixture:
    """A 60 fps MP4 with long GOPs and 400 corrupted bytes in its middle; ``notes["clean"]`` is the undamaged file."""
    options = X264 | {"g": str(gop)}
    clean = _encode(folder / "clean60.mp4", _plain(n), rate=Fraction(fps), options=options)
    data = bytearray(clean.read_bytes())
    start = len(data) // 2
    data[start : start + 400] = np.random.default_rng(1).integers(0, 256, 400, dtype=np.uint8).tobytes()
    path = folder / "corrupt60.mp4"
    path.write_bytes(bytes(data))
    return Fixture(path, list(range(n)), {"clean": clean})


def truncated(folder: Path, n: int = 150) -> Fixture:
    """An MKV cut at 60% of its bytes (a download that stopped): trains on the frames it holds."""
    source = _encode(folder / "whole.mkv", _plain(n), options=X264)
    path = folder / "truncated.mkv"
    data = source.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    return Fixture(path, list(range(n)))


def build_all(folder: Path) -> dict[str, Fixture]:
    """Every fixture, generated into ``folder`` (about 2 s on one core)."""
    return {
        "pts_eq_dts": pts_equal_dts(folder),
        "dropped_avi": dropped_frames_avi(folder),
        "variable_rate": variable_rate(folder),
        "mkv_no_count": no_frame_count(folder, ".mkv"),
        "webm_no_count": no_frame_count(folder, ".webm"),
        "starts_late": starts_late(folder),
        "odd_size": sized(folder, "odd.mp4", (641, 479), "yuv444p"),
        "yuv444": sized(folder, "yuv444.mp4", (W, H), "yuv444p"),
        "ten_bit": sized(folder, "tenbit.mp4", (W, H), "yuv420p10le"),
        "rotated": rotated(folder),
        "open_gop": open_gop(folder),
        "audio_first": audio_first(folder),
        "two_video_streams": two_video_streams(folder),
        "cover_first": cover_first(folder),
        "mpeg_ts": mpeg_ts(folder),
        "av1": av1(folder),
        "hevc_ten_bit": hevc_ten_bit(folder),
        "hlg": hlg_pattern(folder),
        "anamorphic": anamorphic(folder),
        "joined_segments": joined_segments(folder),
        "starts_mid_gop": starts_mid_gop(folder),
        "raw_h264": raw_stream(folder),
        "raw_hevc": raw_stream(folder, "libx265"),
        "corrupt_middle": corrupt_middle(folder),
        "truncated": truncated(folder),
    }
