"""The per-file cache of frame timelines (``data.index_cache``): a video is demuxed once, its timeline kept while its
path, size and mtime (and the rate asked for) are unchanged, and the least recently used entries pruned."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import time
import warnings
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np

from dora_lightning.data.timeline import Timeline, build_timeline
from dora_lightning.errors import os_reason

# 2: the main video stream (FFmpeg's best), not the first; 3: seekable, source_fps, displayed width;
# 4: AVI B-frames in output order, rates from timestamps, edit-list lead-in, restarts
INDEX_VERSION = 4
MAX_INDEX_ENTRIES = (
    4096  # ~1 KB each (a few MB for files with off-grid timestamps); the least recently used go first
)
# a temporary file this old is a killed writer's (a write takes well under a second)
STALE_TEMPORARY_NS = 3600 * 10**9


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/dora_lightning/video_index`` (``~/.cache/...`` when XDG_CACHE_HOME is unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "dora_lightning" / "video_index"


def _file_key(path: str, frame_rate: Fraction | None = None) -> dict[str, int | str]:
    status = os.stat(path)
    key: dict[str, int | str] = {
        "path": os.path.abspath(path),
        "size": status.st_size,
        "mtime_ns": status.st_mtime_ns,
    }
    if frame_rate is not None:
        key["frame_rate"] = str(frame_rate)
    return key


def _entry_path(cache_dir: Path, key: dict[str, int | str]) -> Path:
    name = str(key["path"]) + (f"@{key['frame_rate']}" if "frame_rate" in key else "")
    return cache_dir / (hashlib.sha1(name.encode()).hexdigest() + ".npz")


def _to_arrays(timeline: Timeline, key: dict, extra: dict) -> dict[str, np.ndarray]:
    meta = {
        "version": INDEX_VERSION,
        "key": key,
        "fps": [timeline.fps.numerator, timeline.fps.denominator],
        "time_base": [timeline.time_base.numerator, timeline.time_base.denominator],
        "start_pts": timeline.start_pts,
        "num_frames": timeline.num_frames,
        "coded_frames": timeline.coded_frames,
        "header_frames": timeline.header_frames,
        "order_mode": timeline.order_mode,
        "seekable": timeline.seekable,
        "source_fps": None if timeline.source_fps is None else str(timeline.source_fps),
        "restarts": timeline.restarts,
        "extra": extra,
    }
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    for name in ("source_pts", "key_index", "key_pts"):
        value = getattr(timeline, name)
        if value is not None:
            arrays[name] = value
    return arrays


def _from_arrays(arrays: dict[str, np.ndarray]) -> tuple[Timeline, dict, dict]:
    meta = json.loads(bytes(arrays["meta"]).decode())
    if meta["version"] != INDEX_VERSION:
        raise ValueError("old index version")
    timeline = Timeline(
        fps=Fraction(*meta["fps"]),
        time_base=Fraction(*meta["time_base"]),
        start_pts=int(meta["start_pts"]),
        num_frames=int(meta["num_frames"]),
        coded_frames=int(meta["coded_frames"]),
        header_frames=int(meta["header_frames"]),
        order_mode=bool(meta["order_mode"]),
        seekable=bool(meta["seekable"]),
        source_fps=None if meta["source_fps"] is None else Fraction(meta["source_fps"]),
        restarts=int(meta["restarts"]),
        **{
            name: arrays[name].astype(np.int64)
            for name in ("source_pts", "key_index", "key_pts")
            if name in arrays
        },
    )
    return timeline, meta["key"], meta["extra"]


def _temporary_suffix() -> str:
    """A writer's own temporary name: host, process and a random token (processes of two machines sharing a cache
    folder over a network file system may have the same process id)."""
    return f".{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}.tmp.npz"


def prune_cache(folder: Path, keep: int = MAX_INDEX_ENTRIES) -> int:
    """Delete all but the ``keep`` most recently used entries of the index cache ``folder`` (entries are touched
    when read), and temporary files of killed writers (older than an hour: a younger one may be another process's,
    being written); returns how many files were removed."""
    try:
        files = [(p.stat().st_mtime_ns, p) for p in folder.glob("*.npz")]
    except OSError:
        return 0
    files.sort(reverse=True)
    cutoff = time.time_ns() - STALE_TEMPORARY_NS
    stale = [p for mtime, p in files if p.name.endswith(".tmp.npz") and mtime < cutoff]
    entries = [p for _, p in files if not p.name.endswith(".tmp.npz")]
    removed = 0
    for path in stale + entries[keep:]:
        try:
            path.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def load_or_build(
    path: str,
    cache_dir: str | os.PathLike | None = None,
    probe: Callable[[str], dict] | None = None,
    max_entries: int = MAX_INDEX_ENTRIES,
    frame_rate: Fraction | None = None,
) -> tuple[Timeline, dict]:
    """The timeline of ``path`` (at ``frame_rate``, None: its own) and the ``extra`` facts ``probe(path)`` returned,
    from the cache when the file's path, size and mtime_ns (and the rate) match the entry; else built (and ``probe``
    run) and written to the cache.

    ``cache_dir`` None uses :func:`default_cache_dir`. A corrupt or stale entry is rebuilt; a cache folder that cannot
    be written is warned about (once per file) and otherwise ignored: the index is then rebuilt at each start. After
    a write the cache keeps the ``max_entries`` most recently used entries (:func:`prune_cache`).
    """
    key = _file_key(path, frame_rate)
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    entry = _entry_path(folder, key)
    try:
        with np.load(entry, allow_pickle=False) as stored:
            timeline, stored_key, extra = _from_arrays(dict(stored))
        if stored_key == key:
            try:
                os.utime(entry)  # used: the cache keeps the most recently used entries
            except OSError:
                pass
            return timeline, extra
    except Exception:  # no entry, or one that cannot be read (a truncated zip raises BadZipFile): rebuild it
        pass
    timeline = build_timeline(path, frame_rate)
    extra = probe(path) if probe is not None else {}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        temporary = entry.with_suffix(_temporary_suffix())
        with open(temporary, "wb") as fh:
            np.savez(fh, **_to_arrays(timeline, key, extra))
            fh.flush()
            os.fsync(fh.fileno())  # whole on disk before it takes the entry's name (a node may crash)
        os.replace(temporary, entry)
        prune_cache(folder, max_entries)
    except OSError as err:
        # an unwritable cache is not an error, but every start then demuxes the videos again
        warnings.warn(
            f"data.index_cache: cannot write the frame index of '{path}' to '{folder}' ({os_reason(err)}); the "
            "videos are indexed again at every start: give a writable data.index_cache",
            UserWarning,
            stacklevel=2,
        )
    return timeline, extra
