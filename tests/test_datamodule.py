"""VideoClipDataModule: batches, path forms, checkpointed position and every bad input's message."""

from __future__ import annotations

import io
import warnings
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import BUNDLED_VIDEO, write_video

from dora_lightning.data.augment.multicrop import ClipMultiCrop
from dora_lightning.data.datamodule import VideoClipDataModule
from dora_lightning.data.sources import VideoSourceError, probe_videos, resolve_video_paths

SMALL = ClipMultiCrop(global_size=32, local_size=16, num_local_crops=3, pre_crop_size=48)


def make(paths, **kw) -> VideoClipDataModule:
    options = dict(
        clip_length=4,
        frame_stride=5,
        decode_short_side=48,
        batch_size=3,
        num_workers=0,
        start_step=5,
        transform=SMALL,
    )
    return VideoClipDataModule(paths=paths, **(options | kw))


def test_batches_have_the_documented_layout(video_dir):
    dm = make(str(video_dir))
    batch = next(iter(dm.train_dataloader()))
    (global_view,) = batch["global_views"]
    assert global_view.shape == (3, 4, 3, 32, 32) and global_view.dtype == torch.uint8  # the compact hand-off
    assert len(batch["local_views"]) == 3
    assert all(v.shape == (3, 4, 3, 16, 16) and v.dtype == torch.uint8 for v in batch["local_views"])
    assert batch["start"].shape == (3,) and batch["decoded_frames"].shape == (3,)
    # on the training device the data module normalises them (Lightning calls this hook after the transfer)
    ready = dm.on_after_batch_transfer(batch, 0)
    for raw, view in zip(
        batch["global_views"] + batch["local_views"],
        ready["global_views"] + ready["local_views"],
        strict=True,
    ):
        assert view.dtype == torch.float32
        torch.testing.assert_close(view, dm.transform.normalize(raw))
    torch.testing.assert_close(
        ready["global_views"][0][0, 0, :, 0, 0],
        (global_view[0, 0, :, 0, 0] / 255 - torch.tensor([0.485, 0.456, 0.406]))
        / torch.tensor([0.229, 0.224, 0.225]),
    )
    assert torch.equal(ready["start"], batch["start"])


def test_batches_carry_their_clip_index_as_planned():
    """clip_index is an int64 (B, 2) tensor of (video, first frame): on real batches from worker processes it matches
    the video/start fields and the plan (batch n from worker n % workers), and no clip comes twice in an epoch."""
    dm = make(
        str(BUNDLED_VIDEO), num_workers=2, frame_stride=10, decode_short_side=48, batch_size=4, cursors=8
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    got = [b["clip_index"] for b in loader]
    assert len(got) == len(loader) > 2
    assert all(index.dtype == torch.int64 and index.shape == (4, 2) for index in got)
    plans = [dm.dataset.shard_plan(worker) for worker in range(2)]
    for n, index in enumerate(got):
        plan, row = plans[n % 2], (n // 2) * 4
        assert index[:, 0].tolist() == plan.videos[row : row + 4].tolist()
        assert index[:, 1].tolist() == plan.starts[row : row + 4].tolist()
    clips = [tuple(row) for index in got for row in index.tolist()]
    assert len(clips) == len(set(clips))
    batch = next(iter(dm.train_dataloader()))
    assert torch.equal(batch["clip_index"], torch.stack([batch["video"], batch["start"]], dim=1))


@pytest.mark.parametrize(("stride", "step"), [(60, 4), (10, 2), (5, 1), (9, 3)])
def test_default_start_step_divides_the_stride(stride, step):
    assert make("unused", frame_stride=stride, start_step=None).start_step == step


def test_compact_frames_reach_the_stream(video_dir):
    dm = make(str(video_dir), compact_frames=True)
    dm.setup("fit")
    assert dm.dataset.compact_frames
    batch = next(iter(dm.train_dataloader()))
    assert batch["global_views"][0].shape == (3, 4, 3, 32, 32)


def test_bundled_video_with_workers():
    dm = make(str(BUNDLED_VIDEO), num_workers=2, frame_stride=10, decode_short_side=64)
    loader = dm.train_dataloader()
    assert len(loader) == 2 * dm.dataset.clips_per_worker // 3
    batch = next(iter(loader))
    assert batch["global_views"][0].shape == (3, 4, 3, 32, 32)


@pytest.mark.parametrize("form", ["file", "folder", "glob", "list"])
def test_path_forms(video_dir, form):
    paths = {
        "file": str(video_dir / "a.mp4"),
        "folder": str(video_dir),
        "glob": str(video_dir / "*.m*"),
        "list": [str(video_dir / "a.mp4"), str(video_dir / "b.mkv")],
    }[form]
    dm = make(paths)
    dm.setup("fit")
    assert len(dm.videos) == (1 if form == "file" else 2)


def test_epochs_differ_and_repeat_with_the_seed(video_dir):
    def epoch_starts(dm):
        return [(b["video"].tolist(), b["start"].tolist()) for b in islice(dm.train_dataloader(), 8)]

    dm = make(str(video_dir))
    first, second = epoch_starts(dm), epoch_starts(dm)
    assert first != second
    assert epoch_starts(make(str(video_dir))) == first


def test_state_dict_roundtrip_resumes_mid_epoch(video_dir):
    dm = make(str(video_dir))
    full = [b["start"].tolist() for b in islice(dm.train_dataloader(), 12)]
    resumed = make(str(video_dir))
    resumed.load_state_dict(dm.state_dict() | {"epoch": 0, "batches_done": 5})
    assert [b["start"].tolist() for b in islice(resumed.train_dataloader(), 7)] == full[5:]


def test_a_resume_with_other_views_is_refused_naming_the_option(video_dir):
    """Crops of another size or number change what the model is trained on mid-run: refused like other data (a resume
    took them silently); options that only change the speed (backends) are not part of it."""
    dm = make(str(video_dir))
    dm.setup("fit")
    state = torch.load(_saved(dm.state_dict()), weights_only=True)  # as a checkpoint gives it back
    assert state["transform"]["num_local_crops"] == 3 and state["transform"]["local_scale"] == [0.05, 0.4]
    other = make(
        str(video_dir),
        transform=ClipMultiCrop(global_size=32, local_size=24, num_local_crops=2, pre_crop_size=48),
    )
    other.setup("fit")
    with pytest.raises(ValueError) as refused:
        other.load_state_dict(state)
    assert "data.transform.init_args.local_size 16 -> 24" in str(refused.value)
    assert "data.transform.init_args.num_local_crops 3 -> 2" in str(refused.value)
    faster = make(
        str(video_dir),
        transform=ClipMultiCrop(
            global_size=32, local_size=16, num_local_crops=3, pre_crop_size=48, colour_backend="exact"
        ),
    )
    faster.setup("fit")
    faster.load_state_dict(state)
    del state["transform"]  # a checkpoint written before the views were saved: not checked
    other.load_state_dict(state)


def test_a_resume_on_changed_frame_timelines_says_so_and_goes_on(video_dir, capsys):
    """Frame counts of the same files that differ from the checkpoint's (a newer dora-lightning counts them
    otherwise): the rest of the epoch is not the planned clips, so a line says it (a resume went on without a
    word); a checkpoint written before the timelines were saved is not checked."""
    dm = make(str(video_dir))
    dm.setup("fit")
    state = torch.load(_saved(dm.state_dict()), weights_only=True)
    name = state["videos"][0][0]
    assert state["timelines"][0] == [dm.videos[0].num_frames, str(dm.videos[0].fps)]
    resumed = make(str(video_dir))
    resumed.setup("fit")
    resumed.load_state_dict(state)
    assert "timelines" not in capsys.readouterr().err
    state["timelines"][0][0] += 7
    resumed.load_state_dict(state)
    line = capsys.readouterr().err.strip()
    assert line.startswith("dora fit: the frame timelines of 1 of the checkpoint's videos differ")
    assert f"{name}: {dm.videos[0].num_frames + 7} frames at" in line and "\n" not in line
    del state["timelines"]
    resumed.load_state_dict(state)
    assert capsys.readouterr().err == ""


def _saved(state: dict) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def fake_trainer(current_epoch: int, processed: int = 0, per_epoch: int | None = None) -> SimpleNamespace:
    """What the data module reads of a Trainer during epoch ``current_epoch``: its epoch counters (the epoch is
    started, its end hooks not run), batches processed in the epoch and their number."""
    progress = SimpleNamespace(current=SimpleNamespace(processed=processed))
    epochs = SimpleNamespace(current=SimpleNamespace(started=current_epoch + 1))
    return SimpleNamespace(
        current_epoch=current_epoch,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress), epoch_progress=epochs),
        num_training_batches=per_epoch if per_epoch is not None else float("inf"),
        global_rank=0,
        world_size=1,
    )


def test_state_dict_after_an_epochs_last_batch_is_the_next_epochs_start(video_dir):
    """A checkpoint written at an epoch's end (or on its last batch) saves the next batch's position: (epoch + 1, 0)."""
    dm = make(str(video_dir))
    dm.setup("fit")
    dm.trainer = fake_trainer(2, processed=7, per_epoch=7)
    assert (dm.state_dict()["epoch"], dm.state_dict()["batches_done"]) == (3, 0)


def test_loaded_position_wins_over_the_trainer_epoch_until_a_batch_comes(video_dir):
    """Lightning iterates the loader before it restores current_epoch after an end-of-epoch checkpoint (and may
    iterate it twice): the checkpoint's position holds until its iteration yields a batch, then the trainer leads."""
    plain = make(str(video_dir))
    loader = plain.train_dataloader()
    epochs = [[b["start"].tolist() for b in islice(loader, 3)] for _ in range(3)]  # epochs 0, 1, 2
    dm = make(str(video_dir))
    dm.trainer = fake_trainer(0)  # a stale counter: the checkpoint is at the start of epoch 1
    dm.load_state_dict(plain.state_dict() | {"epoch": 1, "batches_done": 0})
    loader = dm.train_dataloader()
    iter(loader)  # an iteration that yields nothing does not use up the checkpoint's position
    assert [b["start"].tolist() for b in islice(loader, 3)] == epochs[1]
    dm.trainer.current_epoch = 2
    assert [b["start"].tolist() for b in islice(loader, 3)] == epochs[2]


def test_resume_with_other_workers_is_refused(video_dir):
    """(Without the rebase that DoRAModule's checkpoint loading does first.) 0 workers deal clips as 1 does."""
    dm = make(str(video_dir))
    state = dm.state_dict()
    assert state["num_workers"] == 1
    with pytest.raises(ValueError, match="num_workers 1 -> 2"):
        make(str(video_dir), num_workers=2).load_state_dict(state)
    make(str(video_dir), num_workers=1).load_state_dict(state | {"num_workers": 0})


def test_missing_path():
    with pytest.raises(VideoSourceError, match="'/nowhere/walk.mp4' does not exist"):
        make("/nowhere/walk.mp4").setup("fit")


def test_empty_glob_and_empty_folder(tmp_path):
    with pytest.raises(VideoSourceError, match="matches no file"):
        make(str(tmp_path / "*.mp4")).setup("fit")
    with pytest.raises(VideoSourceError, match="holds no video file"):
        make(str(tmp_path)).setup("fit")


def test_non_video_file_alone_is_an_error(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(VideoSourceError, match="notes.mp4' is not a readable video"):
        make(str(text)).setup("fit")


def test_bad_file_among_good_ones_is_skipped_with_a_warning(tmp_path, video_dir):
    junk = tmp_path / "junk.mkv"
    junk.write_bytes(b"\x00" * 5000)
    dm = make([str(video_dir / "a.mp4"), str(junk)])
    with pytest.warns(RuntimeWarning, match="skipping a video: .*junk.mkv"):
        dm.setup("fit")
    assert [Path(v.path).name for v in dm.videos] == ["a.mp4"]
    next(iter(dm.train_dataloader()))


def test_video_shorter_than_one_clip(tmp_path):
    short = write_video(tmp_path / "short.mp4", 10)
    with pytest.raises(
        VideoSourceError, match="short.mp4' has 10 frames, fewer than one clip spans \\(16\\)"
    ):
        make(str(short)).setup("fit")


def test_video_with_nothing_decodable(tmp_path):
    good = write_video(tmp_path / "x.mkv", 60)
    data = bytearray(good.read_bytes())
    cut = 700  # keep the container header, zero every frame after it
    data[cut:] = bytes(len(data) - cut)
    broken = tmp_path / "broken.mkv"
    broken.write_bytes(bytes(data))
    with pytest.raises(VideoSourceError, match="broken.mkv' has no decodable frame"):
        make(str(broken)).setup("fit")


def test_too_few_clips_for_a_batch(video_dir):
    with pytest.raises(ValueError, match="not enough for one batch of data.batch_size=400"):
        make(str(video_dir / "b.mkv"), batch_size=400).setup("fit")


@pytest.mark.parametrize(
    ("key", "value"),
    [("batch_size", 0), ("start_step", 0), ("start_step", 3), ("cursors", 2), ("clip_length", 0)],
)
def test_bad_options_name_the_key(key, value):
    with pytest.raises(ValueError, match=f"data.{key}"):
        make("unused", **{key: value})


def test_damaged_file_warning_reaches_the_user(tmp_path):
    path = write_video(tmp_path / "cut.mkv", 200)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    dm = make(str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(dm.train_dataloader())
    assert len(batches) == len(dm.train_dataloader())
    assert any("cut.mkv" in str(w.message) for w in caught)


def test_a_folder_of_camcorder_and_phone_files_is_found(tmp_path):
    """A folder holds AVCHD camcorder (.MTS, upper case as the cameras write it) and phone (.3gp) files: both found."""
    from dora_lightning.data.sources import resolve_video_paths

    for name in ("00001.MTS", "clip.3gp", "notes.txt", "pi.h264"):
        (tmp_path / name).write_bytes(b"x")
    found = resolve_video_paths(str(tmp_path))
    assert [Path(p).name for p in found] == ["00001.MTS", "clip.3gp", "pi.h264"]


def test_folders_are_searched_as_users_lay_them_out(tmp_path):
    """A city's folder linked in from another disk is searched (Python's rglob did not enter linked folders); a link
    back up the tree is not followed round; macOS's ._ companions and hidden folders are left out; a file reached
    by two names trains once."""
    other_disk, root = tmp_path / "disk2" / "Venice", tmp_path / "WalkingTours"
    other_disk.mkdir(parents=True)
    (root / "Amsterdam").mkdir(parents=True)
    (other_disk / "venice.mp4").write_bytes(b"x")
    (root / "Amsterdam" / "amsterdam.mp4").write_bytes(b"x")
    (root / "Amsterdam" / "._amsterdam.mp4").write_bytes(b"x")  # AppleDouble, as copied by a Mac to exFAT
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "old.mp4").write_bytes(b"x")
    (root / "Venice").symlink_to(other_disk)
    (root / "Venice" / "loop").symlink_to(root)  # a link back up the tree
    (root / "Amsterdam" / "same.mp4").symlink_to(root / "Amsterdam" / "amsterdam.mp4")
    found = resolve_video_paths(str(root))
    assert [str(Path(p).relative_to(root)) for p in found] == ["Amsterdam/amsterdam.mp4", "Venice/venice.mp4"]
    assert resolve_video_paths([str(root / "Venice" / "venice.mp4"), str(root)]) == [
        str(root / "Venice" / "venice.mp4"),
        str(root / "Amsterdam" / "amsterdam.mp4"),
    ]


def test_an_existing_name_with_brackets_is_that_file_not_a_glob(tmp_path):
    """yt-dlp names downloads "Title [id].mp4": refused as a glob that matched nothing; and "clip[1].mp4" was read
    as a glob that matched clip1.mp4, another file."""
    download = tmp_path / "Tours [4K]" / "Venice Walking Tour [fGX0Te6pFvk].mp4"
    download.parent.mkdir()
    download.write_bytes(b"x")
    (tmp_path / "clip[1].mp4").write_bytes(b"x")
    (tmp_path / "clip1.mp4").write_bytes(b"x")
    assert resolve_video_paths(str(download)) == [str(download)]
    assert resolve_video_paths(str(download.parent)) == [str(download)]
    assert resolve_video_paths(str(tmp_path / "clip[1].mp4")) == [str(tmp_path / "clip[1].mp4")]
    assert resolve_video_paths(str(tmp_path / "clip[0-9].mp4")) == [
        str(tmp_path / "clip1.mp4")
    ]  # still a glob


def test_a_video_codec_without_a_decoder_is_skipped_in_one_line(tmp_path):
    """An unknown codec id (some CCTV/DVR exports) crashed the run with an AttributeError, even beside good files."""
    good = write_video(tmp_path / "good.mkv", 40)
    unknown = tmp_path / "cctv.mkv"
    unknown.write_bytes(good.read_bytes().replace(b"V_MPEG4/ISO/AVC", b"V_QQQQQ/ISO/AVC"))
    with pytest.warns(
        RuntimeWarning,
        match=r"skipping a video: '.*cctv.mkv' has no decoder for its video codec 'V_QQQQQ/ISO/AVC' in this FFmpeg",
    ):
        usable = probe_videos([str(good), str(unknown)], min_frames=2, index_cache=tmp_path / "cache")
    assert [info.path for info in usable] == [str(good)]


def test_frame_rate_counts_mixed_rate_videos_at_one_rate(tmp_path):
    """A 30 fps and a 60 fps file read at data.frame_rate 60: both counted in 60ths of a second (which frames they
    show: tests/test_video_fixtures.py); the rate is part of the data's identity, so resuming at another is refused."""
    slow = write_video(tmp_path / "dashcam30.mp4", 40, fps=30)
    fast = write_video(tmp_path / "walk60.mp4", 80, fps=60)
    dm = make([str(slow), str(fast)], frame_rate=60, clip_length=3, frame_stride=10, start_step=2)
    dm.setup("fit")
    assert [(v.fps, v.num_frames) for v in dm.videos] == [(60, 80), (60, 80)]
    assert len(list(islice(dm.train_dataloader(), 2))) == 2
    state = dm.state_dict()
    assert state["frame_rate"] == "60"
    other = make([str(slow), str(fast)], clip_length=3, frame_stride=10, start_step=2)
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="data.frame_rate 60 -> None"):
        other.setup("fit")
    with pytest.raises(ValueError, match="data.frame_rate must be in"):
        make(str(slow), frame_rate=0)


def test_prepare_data_indexes_once_for_every_process(tmp_path, monkeypatch, video_dir):
    """Lightning runs prepare_data in one process per machine before the others set up: it fills the index cache,
    silently; setup (every process) then reads it back, builds nothing, and is the one that reports."""
    from dora_lightning.data import index_cache

    junk = tmp_path / "junk.mkv"
    junk.write_bytes(b"\x00" * 5000)
    dm = make([str(video_dir / "a.mp4"), str(junk)], index_cache=str(tmp_path / "index"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.prepare_data()
    assert not caught and dm.videos == [] and len(list((tmp_path / "index").glob("*.npz"))) == 1

    def rebuilt(*args):
        raise AssertionError(f"setup rebuilt an index: {args}")

    monkeypatch.setattr(index_cache, "build_timeline", rebuilt)
    with pytest.warns(RuntimeWarning, match="skipping a video: .*junk.mkv"):
        dm.setup("fit")
    assert [Path(v.path).name for v in dm.videos] == ["a.mp4"]
