"""Where RangeReader starts decoding after a seek, and frames of another size: files whose index flags every packet
as a keyframe or none, MPEG program streams (whose timestamps right after a seek are shifted), and a stream that
changes resolution mid-file. Every generated frame shows its index as bars (conftest.frame_pattern)."""

from __future__ import annotations

import warnings
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import frame_pattern, read_pattern_index
from video_encode import X264, _encode, _plain

from dora_lightning.data import frame_checks
from dora_lightning.data.decode_stats import DecodeStats
from dora_lightning.data.reader import RangeReader
from dora_lightning.data.sampling import ClipSpec
from dora_lightning.data.sources import VideoInfo, probe_video
from dora_lightning.data.stream import VideoClipStream

SPEC = ClipSpec(clip_length=3, frame_stride=4)


def clips(info: VideoInfo, **options) -> tuple[list[dict], list[str]]:
    """Every clip of one epoch of ``info`` (every start, 4 cursors: each run begins with a seek), and the warnings."""
    options = dict(cursors=4, start_step=1, decode_short_side=48) | options
    stream = VideoClipStream([info], SPEC, None, batch_size=2, num_workers=0, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = list(stream)
    return samples, [str(w.message) for w in caught]


def wrong_clips(samples: list[dict]) -> list[tuple[int, list[int]]]:
    """The clips whose frames do not show the indices they should (replaced clips included)."""
    shown = [(s["start"], [read_pattern_index(f) for f in s["frames"].numpy()]) for s in samples]
    return [(start, got) for start, got in shown if got != SPEC.frames(start).tolist()]


def remux(source: Path, path: Path, fmt: str, keyframe: bool) -> Path:
    """``source``'s video packets written again with every keyframe flag set to ``keyframe`` (the index of a
    camera/DVR writer that flags every packet, or one that flags none)."""
    with av.open(str(source)) as src, av.open(str(path), "w", format=fmt) as dst:
        ist = src.streams.video[0]
        ost = dst.add_stream_from_template(ist)
        for packet in src.demux(ist):
            if packet.size == 0:
                continue
            packet.is_keyframe, packet.stream = keyframe, ost
            dst.mux(packet)
    return path


@pytest.fixture(scope="module")
def mpeg4_avi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MPEG-4 Part 2 (Xvid/DivX-like) in an AVI, 150 frames, a keyframe every 30."""
    folder = tmp_path_factory.mktemp("keyflags")
    return _encode(folder / "src.avi", _plain(150), codec="mpeg4", options={"qscale": "3", "g": "30"})


@pytest.mark.parametrize(("fmt", "suffix"), [("avi", ".avi"), ("matroska", ".mkv")])
def test_an_index_that_flags_every_packet_a_keyframe_trains_every_frame(tmp_path, mpeg4_avi, fmt, suffix):
    """A seek lands on a P-frame there (the old reader decoded it: "first frame is no keyframe", 27 of 142 clips
    replaced as damaged); decoding starts at the keyframe the parser's flags show, seeking further back if needed."""
    path = remux(mpeg4_avi, tmp_path / f"allkey{suffix}", fmt, keyframe=True)
    info = probe_video(str(path), tmp_path / "index")
    samples, messages = clips(info)
    assert len(samples) == info.num_frames - SPEC.span + 1 == 142
    assert wrong_clips(samples) == []
    assert messages == []


def test_an_index_without_keyframes_is_read_from_the_start_and_said_once(tmp_path, mpeg4_avi):
    """An MKV whose blocks flag no keyframe has no Cues: every seek fails (EPERM). The old reader retried it as a
    decode error ("PermissionError: Operation not permitted"), skipped ahead and replaced half the clips; the file
    is now read from its first frame, without retrying the seek, and one line says why, naming no permission."""
    path = remux(mpeg4_avi, tmp_path / "nokey.mkv", "matroska", keyframe=False)
    info = probe_video(str(path), tmp_path / "index")
    samples, messages = clips(info)
    assert wrong_clips(samples) == []
    (message,) = messages
    assert str(path) in message and "cannot be seeked" in message and "-c copy" in message
    assert "ermission" not in message and "not permitted" not in message
    # a reader reads it from its first frame, no decode error; the worker's next readers of the epoch (the same
    # counters) do not try the seek again
    stats = DecodeStats()
    for _ in range(2):
        reader = RangeReader(info, 100, 104, info.decode_size(48), lambda i: True, stats)
        assert [index for index, _ in reader] == [100, 101, 102, 103]
        assert stats.unseekable == {str(path)}
    assert stats.decode_errors == 0 and stats.decoded_frames > 200  # twice from frame 0


def test_a_seek_in_an_indexed_file_passes_over_no_packet(tmp_path, monkeypatch):
    """Files whose index is right (MP4, MKV, with B-frames) land on the keyframe: not one packet is passed over, so
    their seeks and decoded frames are those of the plain seek-and-decode."""
    passed = []
    original = frame_checks.SeekStart.starts

    def spy(self, packet):
        started = original(self, packet)
        passed.append(not started)
        return started

    monkeypatch.setattr(frame_checks.SeekStart, "starts", spy)
    for name in ("plain.mp4", "bframes.mkv"):
        options = X264 | ({"bf": "3", "preset": "superfast"} if name.startswith("b") else {})
        path = _encode(tmp_path / name, _plain(150), options=options)
        samples, messages = clips(probe_video(str(path), tmp_path / "index"))
        assert wrong_clips(samples) == [] and messages == []
    assert passed and not any(passed)


@pytest.mark.parametrize(
    ("codec", "fmt", "n"),
    [("mpeg1video", "mpeg", 60), ("mpeg1video", "vob", 60), ("mpeg2video", "mpeg", 150)],
)
def test_mpeg_program_stream_reads_match_a_read_from_the_start(tmp_path, codec, fmt, n):
    """MPEG-1/2 in an MPEG program stream (.mpg, .vob), several small pictures to a 2 KB pack: right after a seek
    FFmpeg gives the pack's timestamp to the tail of a picture the pack boundary cut, and counts the next pictures
    on from it; the old reader placed them by those timestamps (3 of 52 clips wrong and 4 replaced in the MPEG-1
    file, 3 replaced in the MPEG-2 one). Every read, from any frame, now gives the frames a read from frame 0 gives
    (the timestamps the timeline holds), and every clip is right."""
    path = _encode(
        tmp_path / f"ps_{codec}.mpg",
        _plain(n),
        codec=codec,
        rate=Fraction(25),
        options={"qscale": "2", "g": "12", "bf": "2"},
    )
    if fmt == "vob":  # the same stream written by the VOB muxer (DVD-style packs)
        path = _vob(path, tmp_path / f"ps_{codec}.vob")
    info = probe_video(str(path), tmp_path / "index")
    assert info.num_frames == n

    def read(first: int, stop: int, wanted=lambda i: True) -> dict[int, int]:
        reader = RangeReader(info, first, stop, info.decode_size(48), wanted, DecodeStats())
        return {index: read_pattern_index(frame) for index, frame in reader if frame is not None}

    assert read(0, n) == {i: i for i in range(n)}
    for first in range(1, n - 8):
        assert read(first, first + 8, lambda i, first=first: i % 4 == first % 4) == {
            i: i for i in range(first, first + 8) if i % 4 == first % 4
        }, first
    samples, messages = clips(info)
    assert wrong_clips(samples) == [] and messages == []


def _vob(source: Path, path: Path) -> Path:
    with av.open(str(source)) as src, av.open(str(path), "w", format="vob") as dst:
        ist = src.streams.video[0]
        ost = dst.add_stream_from_template(ist)
        for packet in src.demux(ist):
            if packet.size:
                packet.stream = ost
                dst.mux(packet)
    return path


def _wide(index: int, width: int, height: int) -> np.ndarray:
    """A 3:1 picture whose middle 3:2 part is ``frame_pattern`` (index as bars), its sides flat grey."""
    image = np.full((height, width, 3), 90, dtype=np.uint8)
    middle = height * 3 // 2
    left = (width - middle) // 2
    image[:, left : left + middle] = frame_pattern(index, middle, height)
    return image


def resolution_change(folder: Path, n: int = 75) -> Path:
    """One H.264 stream in an MKV: n frames at 96x64 (3:2), then n at 192x64 (3:1), timestamps continuing (a
    screen recording of a resized window, recordings joined without re-encoding)."""
    first = _encode(folder / "first.ts", _plain(n), options=X264)
    second = _encode(
        folder / "second.ts", [(n + i, n + i) for i in range(n)], options=X264, size=(192, 64), image=_wide
    )
    path = folder / "resized.mkv"
    with av.open(str(path), "w") as dst:
        ost = None
        for source in (first, second):
            with av.open(str(source)) as src:
                ist = src.streams.video[0]
                ost = ost or dst.add_stream_from_template(ist)
                for packet in src.demux(ist):
                    if packet.size:
                        packet.stream = ost
                        dst.mux(packet)
    return path


@pytest.mark.parametrize("compact", [False, True])
def test_frames_after_a_resolution_change_keep_their_aspect(tmp_path, compact):
    """Frames of another size than the probe's are scaled to cover the decode size with their own aspect and
    centre-cropped (the old reader squashed the 3:1 frames into 3:2: the bars, in their middle, read wrong), and
    one line names the file, both sizes and the first such frame."""
    path = resolution_change(tmp_path)
    info = probe_video(str(path), tmp_path / "index")
    assert (info.width, info.height, info.num_frames) == (96, 64, 150)
    samples, messages = clips(info, compact_frames=compact)
    assert samples and all(s["frames"].shape == (3, 48, 72, 3) for s in samples)
    assert wrong_clips(samples) == []
    late = [s["frames"].numpy()[-1] for s in samples if SPEC.frames(s["start"])[-1] >= 75]
    # their left edge is the pattern's (blue 128), not the grey side (90) that squashing would put there
    assert late and all(frame[16:, :6, 2].mean() > 110 for frame in late)
    (message,) = messages
    assert str(path) in message and "192x64" in message and "96x64" in message and "frame " in message


def test_a_frame_of_the_probe_size_is_untouched(tmp_path):
    """The size check returns nothing for frames of the probe's size (no other conversion path), also for
    non-square pixels (the probe's displayed width)."""
    path = _encode(tmp_path / "plain.mp4", _plain(10), options=X264)
    info = probe_video(str(path), tmp_path / "index")
    stats = DecodeStats()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        check = frame_checks.SizeCheck(info, stream)
        for frame in container.decode(stream):
            assert check.cover(frame, (72, 48), 0, stats) is None
    wide = VideoInfo(str(path), 10, Fraction(30), 128, 64, Fraction(1, 30), 0)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        check = frame_checks.SizeCheck(wide, stream)
        check.pixel_aspect = Fraction(4, 3)  # as an HDV file's 96 stored columns shown as 128
        frame = next(container.decode(stream))
        assert check.cover(frame, (96, 48), 0, stats) is None
    assert not stats.warned
