"""The clip stream on generated videos: the right frames, exact coverage, determinism, resume, damaged files."""

from __future__ import annotations

import warnings
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import frame_pattern, read_pattern_index, write_video
from torch.utils.data import DataLoader

from dora_lightning.data.sampling import ClipSpec
from dora_lightning.data.sources import probe_videos, resolve_video_paths
from dora_lightning.data.stream import VideoClipStream

SPEC = ClipSpec(clip_length=4, frame_stride=5)


def make_stream(paths, num_workers=0, batch_size=2, **kw) -> VideoClipStream:
    videos = probe_videos(resolve_video_paths(paths), SPEC.span)
    options = dict(cursors=4, start_step=5, decode_short_side=32) | kw
    return VideoClipStream(videos, SPEC, None, batch_size=batch_size, num_workers=num_workers, **options)


def reference_frames(path: str, size: tuple[int, int]) -> list[np.ndarray]:
    """A plain decode of every frame, converted the same way, indexed by decode order."""
    with av.open(path) as container:
        return [
            f.to_ndarray(format="rgb24", width=size[0], height=size[1], interpolation="AREA", threads=1)
            for f in container.decode(video=0)
        ]


def test_clips_hold_the_right_frames(video_dir):
    stream = make_stream(str(video_dir))
    references = {i: reference_frames(v.path, v.decode_size(32)) for i, v in enumerate(stream.videos)}
    samples = list(stream)
    assert len(samples) == len(stream) > 0
    for sample in samples:
        frames = sample["frames"].numpy()
        assert frames.shape == (4, 32, 48, 3) and frames.dtype == np.uint8
        expected = SPEC.frames(sample["start"])
        assert [read_pattern_index(f) for f in frames] == expected.tolist()
        reference = references[sample["video"]]
        for frame, index in zip(frames, expected, strict=True):
            np.testing.assert_array_equal(frame, reference[index])


def test_compact_frames_give_the_same_clips(video_dir):
    """compact_frames keeps the cursors' frames as scaled YUV 4:2:0 VideoFrames and converts them per clip: the same
    clips, the right frames, the pixels of a plain decode scaled to YUV 4:2:0 and then converted."""
    plain = make_stream(str(video_dir), seed=2)
    references = {}
    for i, v in enumerate(plain.videos):
        width, height = v.decode_size(32)
        with av.open(v.path) as container:
            references[i] = [
                f.reformat(width, height, "yuv420p", interpolation="AREA").to_ndarray(format="rgb24")
                for f in container.decode(video=0)
            ]
    compact = make_stream(str(video_dir), seed=2, compact_frames=True)
    held = []
    original = compact._gather

    def spy(state, start, stats):
        held.extend(state.frames.values())
        return original(state, start, stats)

    compact._gather = spy
    for a, b in zip(plain, compact, strict=True):
        assert (a["video"], a["start"]) == (b["video"], b["start"])
        assert b["frames"].shape == a["frames"].shape and b["frames"].dtype == torch.uint8
        assert [read_pattern_index(f) for f in b["frames"].numpy()] == SPEC.frames(b["start"]).tolist()
        for frame, index in zip(b["frames"].numpy(), SPEC.frames(b["start"]), strict=True):
            np.testing.assert_array_equal(frame, references[b["video"]][index])
    assert held and all(isinstance(f, av.VideoFrame) and f.format.name == "yuv420p" for f in held)


def test_native_resolution_when_no_downscale(video_dir):
    stream = make_stream(str(video_dir / "a.mp4"), decode_short_side=None)
    sample = next(iter(stream))
    assert sample["frames"].shape == (4, 64, 96, 3)


def test_coverage_across_workers_and_ranks(video_dir):
    """2 ranks x 2 workers through real DataLoader workers: every start at most once, all but the remainder."""
    emitted = []
    for rank in range(2):
        stream = make_stream(str(video_dir), num_workers=2, rank=rank, world_size=2)
        loader = DataLoader(stream, batch_size=2, num_workers=2, drop_last=True)
        batches = list(loader)
        assert len(batches) == len(loader)
        for batch in batches:
            emitted += list(zip(batch["video"].tolist(), batch["start"].tolist(), strict=True))
    total = sum(stream.num_starts)
    assert len(emitted) == len(set(emitted))
    assert len(emitted) == 4 * stream.clips_per_worker
    assert total - len(emitted) < 4 * 2  # at most the remainder and the last partial batch of each shard


def test_same_seed_same_clips_other_seed_differs(video_dir):
    first = [(s["video"], s["start"]) for s in make_stream(str(video_dir), seed=3)]
    again = [(s["video"], s["start"]) for s in make_stream(str(video_dir), seed=3)]
    other = [(s["video"], s["start"]) for s in make_stream(str(video_dir), seed=4)]
    assert first == again
    assert first != other


@pytest.mark.parametrize("batches_done", [3, 4])
def test_resume_continues_identically(video_dir, batches_done):
    """Iterating after set_position(epoch, n) gives exactly the batches an uninterrupted epoch gives after batch n."""
    stream = make_stream(str(video_dir), num_workers=2)
    stream.set_position(epoch=1, batches_done=0)
    loader = DataLoader(stream, batch_size=2, num_workers=2, drop_last=True)
    full = [(b["video"].tolist(), b["start"].tolist()) for b in loader]
    stream.set_position(epoch=1, batches_done=batches_done)
    resumed = [(b["video"].tolist(), b["start"].tolist()) for b in loader]
    assert resumed == full[batches_done:]


@pytest.mark.parametrize("start_step", [1, 5])
def test_frames_decoded_per_clip_match_the_cost_model(tmp_path, start_step):
    """Each cursor decodes its stretch once: about start_step + cursors x (span + GOP) / starts frames per clip."""
    path = write_video(tmp_path / "long.mp4", 1200, gop=30)
    stream = make_stream(str(path), cursors=4, start_step=start_step)
    samples = list(stream)
    decoded = sum(s["decoded_frames"] for s in samples)
    starts = stream.num_starts[0]
    bound = start_step + 4 * (SPEC.span + 30) / starts + 0.2
    assert 0.9 <= decoded / len(samples) <= bound


def write_bframe_video(path: Path, num_frames: int, gop: int = 30) -> Path:
    """H.264 with B-frames (x264's default pyramid: some B-frames are never referred to), like a YouTube stream."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.options = {"crf": "18", "preset": "superfast", "g": str(gop), "sc_threshold": "0", "bf": "3"}
        for index in range(num_frames):
            for packet in stream.encode(
                av.VideoFrame.from_ndarray(frame_pattern(index, 96, 64), format="rgb24")
            ):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_unwanted_b_frames_are_not_decoded(tmp_path):
    """A cursor wanting every 5th frame of a B-frame stream skips the unreferenced frames it does not want: fewer
    decoded frames per clip than the 5 of a full sequential decode, and every clip still holds the right frames."""
    path = write_bframe_video(tmp_path / "bframes.mp4", 1200)
    with av.open(str(path)) as container:
        assert any(int(f.pict_type) == 3 for f in container.decode(video=0))  # AV_PICTURE_TYPE_B
    stream = make_stream(str(path), cursors=4, start_step=5)
    samples = list(stream)
    for sample in samples:
        assert [read_pattern_index(f) for f in sample["frames"].numpy()] == SPEC.frames(
            sample["start"]
        ).tolist()
    assert sum(s["decoded_frames"] for s in samples) / len(samples) < 4.5


def test_memory_per_cursor_is_a_span_over_the_step(tmp_path):
    """A cursor holds at most the every-start_step-th frames of one clip span, however long the video is; all
    cursors together at most cursors x that."""
    path = write_video(tmp_path / "long.mp4", 1500, gop=30)
    stream = make_stream(str(path), cursors=4, start_step=5)
    held, total = [], []
    original = stream._gather
    states = set()

    def spy(state, start, stats):
        out = original(state, start, stats)
        states.add(state)
        held.append(len(state.frames))
        total.append(sum(len(s.frames) for s in states))
        return out

    stream._gather = spy
    list(stream)
    per_cursor = SPEC.span // 5 + 1
    assert max(held) <= per_cursor
    assert max(total) <= 4 * per_cursor


def damaged(path: Path, how: str) -> Path:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: int(len(data) * 0.6)]))
    else:
        start = len(data) // 3
        data[start : start + 4000] = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
        path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    ("name", "how"), [("cut.mkv", "truncate"), ("cut.mp4", "truncate"), ("bad.mkv", "corrupt")]
)
def test_damaged_video_is_skipped_with_a_warning(tmp_path, name, how):
    path = damaged(write_video(tmp_path / name, 300, faststart=True), how)
    with warnings.catch_warnings(record=True) as probed:
        warnings.simplefilter("always")
        stream = make_stream(str(path), max_decode_retries=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = list(stream)
    assert len(samples) == len(stream), (
        "a damaged stretch must not change the number of clips (DDP ranks stay in step)"
    )
    messages = [str(w.message) for w in caught] + [str(w.message) for w in probed]
    correct = sum(
        [read_pattern_index(f) for f in s["frames"].numpy()] == SPEC.frames(s["start"]).tolist()
        for s in samples
    )
    if how == "truncate" and correct == len(samples):
        # the frame count comes from the packets that are there: a truncated file trains on them, and says so once
        assert any(str(path) in m and "ends early" in m for m in messages), messages
        return
    assert any(str(path) in m and "could not be decoded" in m for m in messages), messages
    (summary,) = [m for m in messages if m.startswith("clip stream:")]
    substituted = int(summary.split(" clips replaced")[0].rsplit(", ", 1)[1])
    assert 0 < correct < len(samples)
    # every counted substitution is a wrong clip; a stretch the decoder conceals (garbage pixels) cannot be counted
    assert 0 < substituted <= len(samples) - correct


def test_good_files_continue_next_to_a_damaged_one(tmp_path, video_dir):
    bad = damaged(write_video(tmp_path / "cut.mkv", 300), "truncate")
    stream = make_stream([str(video_dir / "a.mp4"), str(bad)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples = list(stream)
    good = [s for s in samples if s["video"] == 0]
    assert good and all(
        [read_pattern_index(f) for f in s["frames"].numpy()] == SPEC.frames(s["start"]).tolist() for s in good
    )


def test_worker_count_mismatch_is_an_error(video_dir):
    stream = make_stream(str(video_dir), num_workers=2)
    with pytest.raises(RuntimeError, match="built for 2 workers"):
        next(iter(stream))


def test_transform_gets_a_seeded_generator(video_dir):
    seen = []

    def transform(clip: torch.Tensor, generator: torch.Generator):
        seen.append(torch.randint(0, 1 << 30, (1,), generator=generator).item())
        return {"clip": clip}

    videos = probe_videos(resolve_video_paths(str(video_dir)), SPEC.span)
    for _ in range(2):
        stream = VideoClipStream(videos, SPEC, transform, batch_size=2, num_workers=0, start_step=5)
        samples = [s for _, s in zip(range(5), stream, strict=False)]
    assert "clip" in samples[0]
    assert seen[:5] == seen[5:] and len(set(seen[:5])) == 5


def test_frames_are_decoded_in_the_transforms_frame_format(video_dir):
    """A transform asking for RGBA frames gets (T, H, W, 4) clips with alpha 255; RGB within a few levels of the
    RGB24 decode (swscale rounds the two scaled conversions differently); no transform: RGB24."""
    seen = []

    class RGBATransform:
        frame_format = "rgba"

        def __call__(self, clip: torch.Tensor, generator: torch.Generator):
            seen.append(clip.clone())
            return {}

    videos = probe_videos(resolve_video_paths(str(video_dir)), SPEC.span)
    options = dict(batch_size=2, num_workers=0, start_step=5, seed=3, decode_short_side=32)
    rgba_stream = VideoClipStream(videos, SPEC, RGBATransform(), **options)
    assert rgba_stream.pixel_format == "rgba"
    samples = [s for _, s in zip(range(3), rgba_stream, strict=False)]
    plain = [s for _, s in zip(range(3), VideoClipStream(videos, SPEC, None, **options), strict=False)]
    for clip, sample, reference in zip(seen, samples, plain, strict=True):
        assert (sample["video"], sample["start"]) == (reference["video"], reference["start"])
        assert clip.shape == (*reference["frames"].shape[:3], 4) and bool((clip[..., 3] == 255).all())
        assert (clip[..., :3].int() - reference["frames"].int()).abs().max() <= 8


def test_a_file_named_like_a_url_trains(tmp_path, monkeypatch):
    """FFmpeg reads '10:30.mp4' as protocol "10"; a dash-cam's time-stamped file given by a relative path still
    probes, streams, and is written (dora visualize's MP4s), as the user named it."""
    from dora_lightning.data.datamodule import VideoClipDataModule
    from dora_lightning.evaluation.video_frames import video_frame_count
    from dora_lightning.pictures import write_mp4

    name = "10:30 clip ünï.mp4"
    write_video(tmp_path / name, 40)
    monkeypatch.chdir(tmp_path)
    dm = VideoClipDataModule(
        paths=name, clip_length=2, frame_stride=4, decode_short_side=32, batch_size=2, num_workers=0
    )
    dm.setup("fit")
    assert [video.path for video in dm.videos] == [name]
    batch = next(iter(dm.train_dataloader()))
    assert batch["global_views"][0].shape[:2] == (2, 2)
    assert video_frame_count(name) == 40
    write_mp4(torch.zeros(3, 3, 16, 16, dtype=torch.uint8), "11:45 out.mp4", fps=10)
    assert video_frame_count("11:45 out.mp4") == 3
