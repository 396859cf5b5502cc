"""Every kind of file in tests/video_fixtures.py trains on the frames a player shows (docs/data.md, "Which files
train"), or is refused as that table says; damaged frames are skipped and counted."""

from __future__ import annotations

import subprocess
import sys
import warnings
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import REPO, read_pattern_index
from video_encode import Fixture
from video_fixtures import build_all, expected_for_times

from dora_lightning.data.decode_stats import DecodeStats
from dora_lightning.data.reader import RangeReader
from dora_lightning.data.sampling import ClipSpec
from dora_lightning.data.sources import VideoInfo, probe_video, probe_videos
from dora_lightning.data.stream import VideoClipStream

SPEC = ClipSpec(clip_length=3, frame_stride=4)


@pytest.fixture(scope="session")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Fixture]:
    return build_all(tmp_path_factory.mktemp("kinds"))


@pytest.fixture(scope="session")
def index_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("index")


def clips(info: VideoInfo, **options) -> tuple[list[dict], list[str]]:
    """Every clip of one epoch of ``info`` (native size, every start), and the warnings raised."""
    stream = VideoClipStream(
        [info], SPEC, None, batch_size=2, num_workers=0, cursors=2, start_step=1, **options
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = list(stream)
    assert len(samples) == len(stream) > 0
    return samples, [str(w.message) for w in caught]


def shown(sample: dict) -> list[int]:
    return [read_pattern_index(frame) for frame in sample["frames"].numpy()]


def expected_of(fixture: Fixture, info: VideoInfo) -> list[int]:
    if "times_ms" in fixture.notes:
        return expected_for_times(fixture.notes["times_ms"], info.fps, info.num_frames)
    return fixture.expected


PLAIN = [
    "mkv_no_count",
    "webm_no_count",
    "starts_late",
    "odd_size",
    "yuv444",
    "ten_bit",
    "open_gop",
    "audio_first",
    "two_video_streams",
    "cover_first",
    "mpeg_ts",
    "av1",
    "hevc_ten_bit",
    "raw_h264",
    "raw_hevc",
    "anamorphic",
    "starts_mid_gop",
    "hlg",
]


@pytest.mark.parametrize("name", [*PLAIN, "pts_eq_dts", "dropped_avi", "variable_rate", "rotated"])
def test_each_kind_trains_on_the_frames_a_player_shows(fixtures, index_cache, name):
    fixture = fixtures[name]
    info = probe_video(str(fixture.path), index_cache)
    expected = expected_of(fixture, info)
    assert info.num_frames == len(expected)
    samples, messages = clips(info)
    assert not messages, messages
    for sample in samples:
        assert shown(sample) == [expected[i] for i in SPEC.frames(sample["start"])], sample["start"]


def test_b_frames_with_pts_equal_dts_are_numbered_by_output_order(fixtures, index_cache):
    """(a): the decoder's output timestamps go 0, 3, 2, ...; the timeline counts frames in output order instead, every
    one of the 120 frames is there once, no frame is reported missing."""
    path = str(fixtures["pts_eq_dts"].path)
    with av.open(path) as container:
        stamps = [f.pts for f in container.decode(video=0)]
    assert stamps != sorted(stamps)
    info = probe_video(path, index_cache)
    assert info.timeline.order_mode and info.num_frames == 120
    stats = DecodeStats()
    reader = RangeReader(info, 37, 120, (info.width, info.height), lambda i: True, stats)
    frames = list(reader)
    assert [i for i, _ in frames] == list(range(37, 120))
    assert [read_pattern_index(f) for _, f in frames] == list(range(37, 120))
    assert stats.summary() is None


def test_dropped_frames_repeat_the_previous_one(fixtures, index_cache):
    """(b): a 15 fps AVI with 27 coded frames over 150 grid times: 150 frames, each the latest coded one due."""
    fixture = fixtures["dropped_avi"]
    info = probe_video(str(fixture.path), index_cache)
    assert (info.num_frames, info.timeline.coded_frames) == (150, fixture.notes["coded"])
    assert info.timeline.header_frames == 150
    stats = DecodeStats()
    frames = list(RangeReader(info, 0, 150, (info.width, info.height), lambda i: True, stats))
    assert [i for i, _ in frames] == list(range(150))
    assert [read_pattern_index(f) for _, f in frames] == fixture.expected
    assert stats.summary() is None


@pytest.mark.parametrize("name", ["raw_h264", "raw_hevc"])
def test_a_raw_stream_is_read_from_its_start_at_the_rate_it_states(fixtures, index_cache, name):
    """No container: no timestamps, FFmpeg cannot seek (every seek failed before, 43 of 82 clips replaced), and the
    demuxer's rate is a placeholder 25 fps. Readers start at frame 0; the rate is the stream's 30; a note says so."""
    path = str(fixtures[name].path)
    info = probe_video(path, index_cache)
    assert (info.fps, info.timeline.seekable, info.num_frames) == (30, False, 120)
    reader = RangeReader(info, 100, 110, (info.width, info.height), lambda i: True, DecodeStats())
    assert [read_pattern_index(f) for _, f in reader] == list(range(100, 110))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe_videos([path], 3, index_cache)
    assert len(caught) == 1 and "raw stream without timestamps" in str(caught[0].message)
    assert f"ffmpeg -r 30 -i '{path}' -c copy" in str(caught[0].message)
    mp4 = probe_video(str(fixtures["mpeg_ts"].path), index_cache)
    assert mp4.timeline.seekable


def test_non_square_pixels_train_at_the_displayed_shape(fixtures, index_cache):
    fixture = fixtures["anamorphic"]
    info = probe_video(str(fixture.path), index_cache)
    assert (info.width, info.height) == fixture.notes["size"] == (128, 64)
    assert info.decode_size(32) == (64, 32)
    samples, _ = clips(info)
    assert samples[0]["frames"].shape == (3, 64, 128, 3)
    assert shown(samples[0]) == SPEC.frames(samples[0]["start"]).tolist()


@pytest.mark.parametrize("rate", [60, 15, 20])
def test_a_video_read_at_another_frame_rate_shows_what_a_player_shows_then(fixtures, index_cache, rate):
    """data.frame_rate: a 30 fps file of 90 frames read at 60 shows each frame twice, at 15 every other one, at 20 two of three;
    a variable-rate file maps its timestamps to the asked rate; each rate has its own index cache entry."""
    fixture = fixtures["mkv_no_count"]  # 90 frames at 30 fps
    info = probe_video(str(fixture.path), index_cache, Fraction(rate))
    times = [round(k * 1000 / 30) for k in range(90)]  # Matroska's millisecond timestamps
    expected = expected_for_times(times, Fraction(rate), info.num_frames, Fraction(30))
    assert info.fps == rate and info.timeline.source_fps == 30
    assert info.num_frames == {60: 180, 15: 45, 20: 60}[rate]
    reader = RangeReader(info, 0, info.num_frames, (info.width, info.height), lambda i: True, DecodeStats())
    assert [read_pattern_index(f) for _, f in reader] == expected
    assert probe_video(str(fixture.path), index_cache).fps == 30  # the native entry is another one
    samples, messages = clips(info)
    assert not messages
    for sample in samples:
        assert shown(sample) == [expected[i] for i in SPEC.frames(sample["start"])]
    variable = fixtures["variable_rate"]
    info = probe_video(str(variable.path), index_cache, Fraction(rate))
    expected = expected_for_times(
        variable.notes["times_ms"], Fraction(rate), info.num_frames, info.timeline.source_fps
    )
    assert shown_all(info) == expected


def shown_all(info: VideoInfo) -> list[int]:
    reader = RangeReader(info, 0, info.num_frames, (info.width, info.height), lambda i: True, DecodeStats())
    return [read_pattern_index(f) for _, f in reader]


def test_a_file_without_usable_timestamps_keeps_its_own_rate(fixtures, index_cache):
    """B-frames with PTS = DTS are numbered by decoding order: nothing places them in time, so data.frame_rate
    cannot apply; the file is read at its own rate, with a note."""
    path = str(fixtures["pts_eq_dts"].path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        [info] = probe_videos([path], 3, index_cache, Fraction(60))
    assert info.fps == 30 and info.timeline.order_mode
    assert len(caught) == 1 and "read at its own 30 fps, not data.frame_rate 60" in str(caught[0].message)


def test_a_file_whose_timestamps_restart_is_named(fixtures, index_cache):
    """Segments joined end to end: the repeated timestamps are counted and the file named (silent before: half of it
    never trained); a clean file gets no such note."""
    fixture = fixtures["joined_segments"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        [info] = probe_videos([str(fixture.path), str(fixtures["mpeg_ts"].path)], 3, index_cache)[:1]
    assert info.timeline.repeated_timestamps == fixture.notes["repeated"] == 60
    assert [str(w.message).split(":")[0] for w in caught] == [f"'{fixture.path}'"]
    assert "60 of its 120 frames repeat timestamps" in str(caught[0].message)


def test_rotated_video_trains_upright(fixtures, index_cache):
    info = probe_video(str(fixtures["rotated"].path), index_cache)
    assert (info.width, info.height, info.rotation) == (72, 96, 270)
    assert info.decode_size(48) == (48, 64)
    samples, _ = clips(info, decode_short_side=48)
    assert samples[0]["frames"].shape == (3, 64, 48, 3)
    for sample in samples:
        assert shown(sample) == SPEC.frames(sample["start"]).tolist()


@pytest.mark.parametrize("threads", [1, 0])
def test_damaged_frames_are_skipped_and_counted(fixtures, index_cache, threads):
    """(c): 400 corrupted bytes in a 60 fps file with long GOPs: the frames FFmpeg reports damaged (and those after
    them up to the next keyframe) never reach a clip; every clip is pixel-identical to the undamaged file's at its
    own frames, except the counted replacements; one line gives the damaged count."""
    fixture = fixtures["corrupt_middle"]
    info = probe_video(str(fixture.path), index_cache)
    with av.open(str(fixture.notes["clean"])) as container:
        reference = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    samples, messages = clips(info, decode_threads=threads)
    damage = [m for m in messages if "damaged frames could not be decoded" in m]
    assert len(damage) == 1 and str(fixture.path) in damage[0], messages
    count = int(damage[0].split("': ")[1].split(" damaged")[0])
    assert count > 0
    (summary,) = [m for m in messages if m.startswith("clip stream:")]
    assert f"{count} damaged frames" in summary
    substituted = int(summary.split(" clips replaced")[0].rsplit(", ", 1)[1])
    own = 0
    for sample in samples:
        frames, indices = sample["frames"].numpy(), SPEC.frames(sample["start"])
        own += all(np.array_equal(f, reference[i]) for f, i in zip(frames, indices, strict=True))
    # the others are replacements by the previous good clip: the count says how many
    assert 0 < substituted and own == len(samples) - substituted
    # a plain sequential read: the damaged indices form a stretch ending at a keyframe, the rest match the clean file
    stats = DecodeStats()
    reader = RangeReader(
        info, 0, info.num_frames, (info.width, info.height), lambda i: True, stats, threads=threads
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        good = {i: f for i, f in reader if f is not None}
    assert reader.damaged and stats.damaged_frames == {str(fixture.path): reader.damaged}
    if (
        threads == 1
    ):  # frame threads log in the background: which frames count as damaged varies a little per read
        assert count <= len(reader.damaged)  # a frame met by several reads of the epoch counts once
    assert max(reader.damaged) + 1 in (info.num_frames, *range(0, info.num_frames, 120))
    for index, frame in good.items():
        np.testing.assert_array_equal(frame, reference[index])
    assert len(good) + len(reader.damaged) <= info.num_frames


def test_truncated_file_trains_on_what_it_holds(fixtures, index_cache):
    fixture = fixtures["truncated"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (info,) = probe_videos([str(fixture.path)], SPEC.span, index_cache)
    assert 0 < info.num_frames < 150
    assert any("ends early" in str(w.message) and str(fixture.path) in str(w.message) for w in caught)
    samples, _ = clips(info)
    for sample in samples:
        assert shown(sample) == SPEC.frames(sample["start"]).tolist()


@pytest.mark.parametrize(
    ("content", "cause"),
    [(b"", "not a readable video"), (b"hello, not a video\n" * 50, "not a readable video")],
)
def test_unreadable_files_are_refused(tmp_path, index_cache, content, cause):
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=cause):
        probe_video(str(path), index_cache)


@pytest.mark.parametrize("name", ["pts_eq_dts", "dropped_avi", "variable_rate", "open_gop"])
def test_frame_threads_give_the_same_clips(fixtures, index_cache, name):
    """decode_threads=0 (FFmpeg's frame threads, no NONREF skipping) delivers the same clips as one thread."""
    info = probe_video(str(fixtures[name].path), index_cache)
    one, _ = clips(info)
    many, _ = clips(info, decode_threads=0)
    for a, b in zip(one, many, strict=True):
        assert (a["video"], a["start"]) == (b["video"], b["start"])
        assert shown(a) == shown(b)


# Readers with frame threads abandoned mid-range on the damaged file (their threads still decoding and logging errors).
ABANDON_THREADED_READERS = """
import random, sys
from dora_lightning.data.decode_stats import DecodeStats
from dora_lightning.data.reader import RangeReader
from dora_lightning.data.sources import probe_video
info = probe_video(sys.argv[1], sys.argv[2])
rng = random.Random(0)
for _ in range(40):
    first = rng.randrange(0, info.num_frames - 20)
    stop = min(info.num_frames, first + rng.randrange(5, 200))
    reader = RangeReader(info, first, stop, (64, 64), lambda i: True, DecodeStats(), 3, 4, "rgb24", False)
    frames = iter(reader)
    for _ in range(rng.randrange(1, 60)):
        if next(frames, None) is None:
            break
    frames.close()
print("closed all")
"""


def test_closing_threaded_readers_on_a_damaged_file_never_deadlocks(fixtures, index_cache):
    """A frame thread that logs an FFmpeg error needs the GIL, and freeing the decoder holds it while waiting for the
    threads: without the flush in RangeReader.close this hangs at the first or second reader."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            ABANDON_THREADED_READERS,
            str(fixtures["corrupt_middle"].path),
            str(index_cache),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "closed all" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("workers", [0, 2])
def test_the_three_reported_files_train_together(fixtures, index_cache, workers):
    """(a), (b) and (c) through the data module: every batch comes, the only warnings are the damaged-frame line of
    (c) and the totals, once per epoch whatever the number of workers (their counters are summed); nothing is
    reported missing."""
    from dora_lightning.data.augment.multicrop import ClipMultiCrop
    from dora_lightning.data.datamodule import VideoClipDataModule

    paths = [str(fixtures[name].path) for name in ("pts_eq_dts", "dropped_avi", "corrupt_middle")]
    dm = VideoClipDataModule(
        paths=paths,
        clip_length=3,
        frame_stride=4,
        decode_short_side=32,
        batch_size=8,
        num_workers=workers,
        start_step=2,
        transform=ClipMultiCrop(
            global_size=16,
            local_size=8,
            num_local_crops=1,
            pre_crop_size=24,
            colour_backend="fused",
            global_blur_prob=0.0,
            local_blur_prob=0.0,
        ),
        pin_memory=False,
        index_cache=str(index_cache),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
        loader = dm.train_dataloader()
        batches = list(loader)
    assert len(batches) == len(loader) > 0
    assert [v.num_frames for v in dm.videos] == [120, 150, 300]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    damage = [m for m in messages if "damaged frames could not be decoded" in m]
    assert len(damage) == 1 and paths[2] in damage[0]
    assert len([m for m in messages if m.startswith("clip stream:")]) == 1
    assert not any("missing" in m and not m.startswith("clip stream:") for m in messages), messages
    assert all(" 0 missing frames" in m for m in messages if m.startswith("clip stream:"))


def test_unwanted_frames_are_skipped_only_by_decoders_that_can(fixtures, index_cache):
    """With one thread, H.264's non-reference frames that no clip wants are not decoded (the decode loop's main
    saving); libdav1d reads skip_frame only when it opens, so AV1 decodes every frame and still yields all wanted ones."""
    counts = {}
    for name in ("open_gop", "av1"):
        info = probe_video(str(fixtures[name].path), index_cache)
        stats = DecodeStats()
        wanted = lambda i: i % 4 == 0  # noqa: E731
        frames = list(RangeReader(info, 0, info.num_frames, (info.width, info.height), wanted, stats))
        shown_wanted = [read_pattern_index(f) for i, f in frames if wanted(i)]
        assert shown_wanted == [fixtures[name].expected[i] for i in range(0, info.num_frames, 4)]
        counts[name] = (stats.decoded_frames, info.num_frames)
    decoded, total = counts["open_gop"]
    assert decoded < 0.85 * total, counts
    assert counts["av1"][0] == counts["av1"][1], counts
