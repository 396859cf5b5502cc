"""A checkpoint's data identity: what makes its clips the same clips as this run's (the videos, their frame
timelines, the clip geometry, the views made of them), what a resume refuses when it differs, and what it only
says."""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

from dora_lightning.data.sampling import ClipSpec
from dora_lightning.data.sources import VideoInfo

__all__ = ["data_identity", "refuse_other_data", "timeline_note", "view_settings"]

# transform options that change how fast the views are made, not what they are
_SPEED_ONLY = frozenset({"crop_backend", "colour_backend", "output_dtype"})


def data_identity(
    videos: Sequence[VideoInfo],
    spec: ClipSpec,
    frame_rate: Any,
    decode_short_side: int | None,
    transform: Any = None,
) -> dict[str, Any]:
    """What makes a checkpoint's clips the same clips: the videos (file name and size, in order, so a moved folder
    still matches), their frame timelines (frames and rate: the clip plan is drawn from them, and a newer
    dora-lightning may count a file's frames otherwise), the clip geometry (length, stride, rate, decode size) and
    the views made of them (:func:`view_settings` of the transform)."""
    identity: dict[str, Any] = {
        "videos": [[os.path.basename(v.path), os.path.getsize(v.path)] for v in videos],
        "timelines": [[v.num_frames, str(v.fps)] for v in videos],
        "clip_length": spec.clip_length,
        "frame_stride": spec.frame_stride,
        "frame_rate": None if frame_rate is None else str(frame_rate),
        "decode_short_side": decode_short_side,
    }
    if transform is not None:
        identity["transform"] = view_settings(transform)
    return identity


def view_settings(transform: Any) -> dict[str, Any]:
    """The transform's class and the ``__init__`` arguments it keeps as attributes of the same name (crop sizes and
    counts, scales, probabilities, recipe), less those that only change its speed (backends, output dtype); tuples
    as lists, as a checkpoint gives them back."""
    cls = type(transform)
    settings: dict[str, Any] = {"class_path": f"{cls.__module__}.{cls.__qualname__}"}
    for name in inspect.signature(cls.__init__).parameters:
        if name != "self" and name not in _SPEED_ONLY and hasattr(transform, name):
            settings[name] = _plain(getattr(transform, name))
    return settings


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else repr(value)


def _view_changes(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    if saved.get("class_path") != now.get("class_path"):
        return [f"data.transform.class_path {saved.get('class_path')} -> {now.get('class_path')}"]
    return [
        f"data.transform.init_args.{key} {saved[key]} -> {value}"
        for key, value in now.items()
        if key in saved and saved[key] != value
    ]


def refuse_other_data(saved: Mapping[str, Any], now: Mapping[str, Any]) -> None:
    """Raise ValueError naming what differs between the checkpoint's data identity and this run's (what a checkpoint
    written before a part of the identity was saved lacks is not checked)."""
    changed = [
        f"data.{key} {saved[key]} -> {value}"
        for key, value in now.items()
        if key not in ("videos", "timelines", "transform") and key in saved and saved[key] != value
    ]
    if isinstance(saved.get("transform"), Mapping) and "transform" in now:
        changed.extend(_view_changes(saved["transform"], now["transform"]))
    if saved.get("videos") and [list(v) for v in saved["videos"]] != now["videos"]:
        before = {tuple(v) for v in saved["videos"]}
        after = {tuple(v) for v in now["videos"]}
        gone = ", ".join(f"{name} ({size} B)" for name, size in sorted(before - after)) or "none"
        new = ", ".join(f"{name} ({size} B)" for name, size in sorted(after - before)) or "none"
        changed.append(f"data.paths: videos not in this run: {gone}; videos new in this run: {new}")
    if changed:
        raise ValueError(
            "--ckpt_path: the checkpoint belongs to a run on other data ("
            + "; ".join(changed)
            + "); resume with the checkpoint's data.paths, clip and view settings, or start a new run from its "
            "weights with --init_from CKPT"
        )


def timeline_note(saved: Mapping[str, Any], now: Mapping[str, Any]) -> str | None:
    """One line when the checkpoint's videos are this run's but some frame timelines differ (a dora-lightning that
    counts their frames otherwise, e.g. after an index cache version change), else None. Not a refusal: the run
    goes on, but the rest of the interrupted epoch is drawn from the new timelines, so its clips are not the ones
    the epoch planned (some seen twice, some left out until the next epoch). Checkpoints written before the
    timelines were saved (2026-12-06) are not checked."""
    if not saved.get("timelines") or [list(v) for v in saved.get("videos", [])] != now["videos"]:
        return None
    changed = [
        f"{name}: {old[0]} frames at {old[1]} fps -> {new[0]} at {new[1]}"
        for (name, _), old, new in zip(now["videos"], saved["timelines"], now["timelines"], strict=True)
        if list(old) != new
    ]
    if not changed:
        return None
    shown = "; ".join(changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")
    return (
        f"the frame timelines of {len(changed)} of the checkpoint's videos differ from when it was written ({shown}): "
        "the rest of this epoch is drawn from the new timelines, not the clips the epoch planned; from the next "
        "epoch on the run is as any other"
    )
