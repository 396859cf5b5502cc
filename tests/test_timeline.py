"""The per-file index cache: reused while the file is unchanged, rebuilt when stale or corrupt, never an error."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import write_video

from dora_lightning.data import index_cache
from dora_lightning.data import timeline as tl
from dora_lightning.data.sources import probe_video


def entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.npz"))


def test_index_is_cached_and_reused(tmp_path, monkeypatch):
    video = write_video(tmp_path / "v.mp4", 40)
    cache = tmp_path / "cache"
    first = probe_video(str(video), cache)
    (entry,) = entries(cache)
    calls = []
    monkeypatch.setattr(index_cache, "build_timeline", lambda *args: calls.append(args))
    again = probe_video(str(video), cache)
    assert not calls and (again.num_frames, again.fps, again.width) == (
        first.num_frames,
        first.fps,
        first.width,
    )
    assert entries(cache) == [entry]


def test_changed_file_is_reindexed(tmp_path):
    video = write_video(tmp_path / "v.mp4", 40)
    cache = tmp_path / "cache"
    assert probe_video(str(video), cache).num_frames == 40
    write_video(video, 50)
    os.utime(video, ns=(1, 1))  # another mtime as well as another size
    assert probe_video(str(video), cache).num_frames == 50


def test_corrupt_entry_is_rebuilt(tmp_path):
    video = write_video(tmp_path / "v.mp4", 40)
    cache = tmp_path / "cache"
    probe_video(str(video), cache)
    (entry,) = entries(cache)
    entry.write_bytes(b"garbage")
    assert probe_video(str(video), cache).num_frames == 40
    with np.load(entry, allow_pickle=False) as stored:
        assert "meta" in stored


def test_a_truncated_entry_is_rebuilt(tmp_path):
    """A half-written zip (a node that crashed while writing, before entries were synced to disk) raised
    zipfile.BadZipFile, which no except clause took: every start failed in prepare_data."""
    video = write_video(tmp_path / "v.mp4", 40)
    cache = tmp_path / "cache"
    probe_video(str(video), cache)
    (entry,) = entries(cache)
    whole = entry.read_bytes()
    entry.write_bytes(whole[: len(whole) // 2])
    assert probe_video(str(video), cache).num_frames == 40
    assert entry.read_bytes() == whole


def test_a_writers_temporary_file_is_left_alone_while_it_may_be_written(tmp_path):
    """Two machines sharing the cache over a network file system: temporary names carry host, process and a random
    token, and pruning removes only temporary files older than an hour."""
    cache = tmp_path / "cache"
    cache.mkdir()
    fresh, killed = cache / "a.other-host.7.1234abcd.tmp.npz", cache / "b.other-host.7.5678abcd.tmp.npz"
    fresh.write_bytes(b"being written")
    killed.write_bytes(b"left by a killed writer")
    two_hours_ago = (killed.stat().st_mtime_ns - 2 * 3600 * 10**9,) * 2
    os.utime(killed, ns=two_hours_ago)
    assert index_cache.prune_cache(cache) == 1
    assert fresh.exists() and not killed.exists()
    suffixes = {index_cache._temporary_suffix() for _ in range(3)}
    assert len(suffixes) == 3 and all(s.endswith(".tmp.npz") and f".{os.getpid()}." in s for s in suffixes)


def test_unwritable_cache_is_not_an_error_but_is_said(tmp_path):
    video = write_video(tmp_path / "v.mp4", 40)
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder should be")
    with pytest.warns(
        UserWarning, match=r"data.index_cache: cannot write the frame index of .*v.mp4' to .*cache'"
    ):
        assert probe_video(str(video), blocked / "cache").num_frames == 40


def test_default_cache_folder_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert index_cache.default_cache_dir() == tmp_path / "dora_lightning" / "video_index"


def test_clean_file_keeps_the_plain_grid(tmp_path):
    """A file whose timestamps sit on the nominal grid stores no per-frame table: frame i is the i-th coded frame."""
    video = write_video(tmp_path / "v.mp4", 40)
    timeline = tl.build_timeline(str(video))
    assert timeline.on_grid and not timeline.order_mode and timeline.num_frames == timeline.coded_frames == 40
    assert [timeline.indices_of(timeline.seek_pts(i)) for i in (0, 7, 39)] == [(0, 1), (7, 8), (39, 40)]


def test_off_grid_timestamps_map_as_a_player_shows_them():
    """10 fps, timestamps in 1/100 s: 0, 10, 20, 25, 27, 50. At frame i (time i / 10) a player shows the latest frame
    due by then (half a frame of tolerance): 20 is replaced by 25 before it is shown, 27 shows twice, 50 once."""
    from fractions import Fraction

    source = np.array([0, 10, 20, 25, 27, 50], dtype=np.int64)
    timeline = tl.Timeline(Fraction(10), Fraction(1, 100), 0, 6, 6, source_pts=source)
    assert [timeline.indices_of(int(p)) for p in source] == [(0, 1), (1, 2), (2, 2), (2, 3), (3, 5), (5, 6)]
    assert [timeline.seek_pts(i) for i in range(6)] == [0, 10, 25, 27, 27, 50]
    assert timeline.indices_of(-5) == (0, 0)


def test_the_cache_keeps_the_most_recently_used_entries(tmp_path):
    """Old entries (e.g. of deleted videos) and killed writers' temp files go; an entry that was just read stays."""
    video = write_video(tmp_path / "v.mp4", 40)
    cache = tmp_path / "cache"
    cache.mkdir()
    for i in range(6):
        (cache / f"old{i}.npz").write_bytes(b"x")
        os.utime(cache / f"old{i}.npz", (1_000_000 + i, 1_000_000 + i))
    (cache / "abc.123.tmp.npz").write_bytes(b"partial")
    os.utime(cache / "abc.123.tmp.npz", (1_000_000, 1_000_000))  # a killed writer's, long ago
    index_cache.load_or_build(str(video), cache, max_entries=3)
    names = sorted(p.name for p in entries(cache))
    assert len(names) == 3 and "old5.npz" in names and "old4.npz" in names  # the new entry + the 2 newest old
    assert not any(n.startswith("old0") or n.endswith(".tmp.npz") for n in names)
    # reading touched nothing else; keep the newest (the video's)
    assert index_cache.prune_cache(cache, keep=1) == 2
    (entry,) = entries(cache)
    assert "old" not in entry.name
