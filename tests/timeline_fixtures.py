"""Generated files (PyAV only, 96x64, a few seconds) whose timestamps or codec the frame timeline has to read as a
player does: H.264 with B-frames in an AVI, an undecodable codec, headers without a frame rate, an MP4 trimmed by an
edit list that starts mid-GOP, a paused recording, scattered duplicate timestamps. Each builder returns a
``Fixture`` (video_encode.py): the file and the ``frame_pattern`` index a player shows at each frame index."""

from __future__ import annotations

import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from conftest import frame_pattern
from video_encode import X264, Fixture, H, W, _encode, _plain, mux_pattern_frames

B_FRAMES = X264 | {"bf": "3", "preset": "superfast"}


def avi_b_frames(folder: Path, n: int = 90) -> Fixture:
    """What ``ffmpeg -i x -c:v libx264 out.avi`` writes (x264's default B-frames): AVI has no presentation
    timestamps, FFmpeg's demuxer gives every packet PTS = DTS + 1 (decode order) while the decoder reorders."""
    return Fixture(_encode(folder / "bframes.avi", _plain(n), options=B_FRAMES), list(range(n)))


def unknown_codec(folder: Path, suffix: str) -> Path:
    """An MKV whose CodecID (or an AVI whose FourCC) no FFmpeg decoder knows: a proprietary CCTV / DVR export."""
    source = _encode(folder / f"known{suffix}", _plain(30), options=X264)
    known, unknown = (b"V_MPEG4/ISO/AVC", b"V_QQQQQ/ISO/AVC") if suffix == ".mkv" else (b"H264", b"QQQQ")
    path = folder / f"unknown_codec{suffix}"
    path.write_bytes(source.read_bytes().replace(known, unknown).replace(known.lower(), unknown.lower()))
    return path


def live_webm_without_rate(folder: Path, n: int = 120) -> Fixture:
    """A WebM written live (a browser's MediaRecorder): millisecond timestamps with jitter around 30 fps, and no frame
    duration in its header, so FFmpeg has no average rate and guesses the 1 kHz time base."""
    rng = np.random.default_rng(5)
    times = np.cumsum([0, *rng.choice([33, 33, 34, 32, 40, 27], size=n - 1)]).tolist()
    source = folder / "recorded.webm"
    with av.open(str(source), "w", format="webm", options={"live": "1"}) as container:
        stream = container.add_stream("libvpx", rate=30)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.options = {"b": "1M", "g": "120", "deadline": "realtime", "cpu-used": "8"}
        for k, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(frame_pattern(k, W, H), format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    path = folder / "no_rate.webm"
    with av.open(str(source)) as src, av.open(str(path), "w", format="webm", options={"live": "1"}) as dst:
        out = dst.add_stream_from_template(src.streams.video[0])  # a template carries no frame duration
        for packet in src.demux(src.streams.video[0]):
            if packet.size:
                packet.stream = out
                dst.mux(packet)
    return Fixture(path, None, {"times_ms": times})


def mpeg1_in_ts(folder: Path, n: int = 100) -> Fixture:
    """MPEG-1 video in MPEG-TS (a VCD remux) at 25 fps: FFmpeg has no average rate and guesses 50."""
    options = {"qscale": "2", "g": "12", "bf": "2"}
    return Fixture(
        _encode(folder / "vcd.ts", _plain(n), codec="mpeg1video", rate=Fraction(25), options=options),
        list(range(n)),
    )


def _box(data: bytes | bytearray, path: list[str], start: int = 0, end: int | None = None) -> int:
    """Offset of the MP4 box at ``path`` (e.g. ["moov", "trak", "edts", "elst"])."""
    end, i = len(data) if end is None else end, start
    while i + 8 <= end:
        size, kind = struct.unpack(">I4s", data[i : i + 8])
        if kind.decode("latin1") == path[0]:
            return i if len(path) == 1 else _box(data, path[1:], i + 8, i + size)
        i += max(size, 8)
    raise ValueError(f"no {path[0]} box")


def _timescale(data: bytearray, path: list[str]) -> int:
    box = _box(data, path)
    return struct.unpack(">I", data[box + (28 if data[box + 8] else 20) :][:4])[0]


def trimmed_mp4(folder: Path, bframes: int, n: int = 100, head: int = 40, tail: int = 20) -> Fixture:
    """An MP4 trimmed without re-encoding (a phone's "Trim", ``ffmpeg -ss T -i x.mp4 -c copy``): its edit list shows
    frames ``head`` to ``n - tail`` (25 fps, keyframes every 30: the edit starts mid-GOP, FFmpeg flags the lead-in
    from keyframe 30 discard)."""
    source = folder / f"untrimmed_bf{bframes}.mp4"
    with av.open(str(source), "w", options={"use_editlist": "1"}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = X264 | {"bf": str(bframes), "preset": "superfast"}
        mux_pattern_frames(container, stream, n)
    data = bytearray(source.read_bytes())
    movie = _timescale(data, ["moov", "mvhd"])
    media = _timescale(data, ["moov", "trak", "mdia", "mdhd"])
    elst = _box(data, ["moov", "trak", "edts", "elst"]) + 8
    assert data[elst] == 0, "a version 0 edit list"
    entry = elst + 8 + 12 * (struct.unpack(">I", data[elst + 4 : elst + 8])[0] - 1)  # the last (media) edit
    _, media_time, rate = struct.unpack(">IiI", data[entry : entry + 12])
    shown = n - head - tail
    data[entry : entry + 12] = struct.pack(">IiI", shown * movie // 25, media_time + head * media // 25, rate)
    path = folder / f"trimmed_bf{bframes}.mp4"
    path.write_bytes(bytes(data))
    return Fixture(path, list(range(head, n - tail)), {"head": head})


def paused(folder: Path, suffix: str, seconds: float = 1.0, pause: float = 60.0) -> Fixture:
    """A 30 fps recording paused and resumed in one file: ``seconds`` of frames, a jump of ``pause`` seconds, and
    ``seconds`` more (millisecond timestamps)."""
    n = round(30 * seconds)
    times = [round(i * 1000 / 30) for i in range(n)]
    times += [round(1000 * (seconds + pause)) + t for t in times]
    path = _encode(
        folder / f"paused_{seconds:g}s_{pause:g}s{suffix}",
        [(t, k) for k, t in enumerate(times)],
        time_base=Fraction(1, 1000),
        options=X264,
    )
    return Fixture(path, None, {"times_ms": times})


def duplicate_timestamps(folder: Path, n: int = 150) -> Fixture:
    """An MKV whose every 10th frame has the timestamp of the frame before it (a capture card's hiccup)."""
    times, t = [], 0
    for i in range(n):
        times.append(t)
        t += 0 if i % 10 == 4 else 33
    path = _encode(
        folder / "duplicates.mkv",
        [(t, k) for k, t in enumerate(times)],
        time_base=Fraction(1, 1000),
        options=X264 | {"bf": "0"},
    )
    return Fixture(path, None, {"times_ms": times, "repeated": n // 10})
