"""Find the video files a user named and read what the clip sampler needs to know about each (frames, rate, size)."""

from __future__ import annotations

import glob
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ts")


class VideoSourceError(ValueError):
    """A video path or file the data module cannot use; the message names the file and what to do."""


@dataclass(frozen=True)
class VideoInfo:
    """What the sampler and decoder need to know about one video file.

    ``num_frames`` is the header's frame count (or duration x rate when the header has none); frame ``i`` is the one whose
    timestamp is ``start_pts + i / fps`` seconds, so frame indices come from timestamps, not from counting.
    """

    path: str
    num_frames: int
    fps: Fraction
    width: int
    height: int
    time_base: Fraction
    start_pts: int

    def index_of(self, pts: int) -> int:
        """Frame index of a presentation timestamp."""
        return round((pts - self.start_pts) * self.time_base * self.fps)

    def pts_of(self, index: int) -> int:
        """Presentation timestamp of frame ``index`` (for seeking)."""
        return self.start_pts + math.floor(Fraction(index) / self.fps / self.time_base)

    def decode_size(self, short_side: int | None) -> tuple[int, int]:
        """(width, height) after scaling the short side to ``short_side`` (never upscaling), both even."""
        if short_side is None or short_side >= min(self.width, self.height):
            return self.width, self.height
        scale = short_side / min(self.width, self.height)
        return max(2, round(self.width * scale / 2) * 2), max(2, round(self.height * scale / 2) * 2)


def resolve_video_paths(paths: str | Sequence[str]) -> list[str]:
    """Expand a file, a folder (searched recursively), a glob, or a list of these into a sorted list of video files."""
    entries = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if not entries:
        raise VideoSourceError("data.paths is empty: give a video file, a folder of videos or a glob")
    found: list[str] = []
    for entry in entries:
        entry = os.path.expanduser(str(entry))
        if glob.has_magic(entry):
            matches = sorted(p for p in glob.glob(entry, recursive=True) if os.path.isfile(p))
            if not matches:
                raise VideoSourceError(f"data.paths: the glob '{entry}' matches no file; check the pattern")
            found.extend(matches)
        elif os.path.isdir(entry):
            matches = sorted(
                str(p) for p in Path(entry).rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()
            )
            if not matches:
                raise VideoSourceError(
                    f"data.paths: the folder '{entry}' holds no video file ({', '.join(VIDEO_SUFFIXES)}); "
                    "put the videos there or point data.paths at the files"
                )
            found.extend(matches)
        elif os.path.isfile(entry):
            found.append(entry)
        else:
            raise VideoSourceError(
                f"data.paths: '{entry}' does not exist; give a video file, a folder of videos or a glob "
                "(see docs/data.md for getting the Walking Tours videos)"
            )
    return list(dict.fromkeys(found))


def probe_video(path: str) -> VideoInfo:
    """Open ``path``, read its first video stream's header and decode its first frame; raise VideoSourceError if unusable."""
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise VideoSourceError(f"'{path}' is not a readable video ({err.__class__.__name__}: {err})") from err
    with container:
        if not container.streams.video:
            raise VideoSourceError(f"'{path}' has no video stream")
        stream = container.streams.video[0]
        fps = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not fps or stream.time_base is None:
            raise VideoSourceError(
                f"'{path}' has no frame rate or time base in its header; re-mux it (e.g. with ffmpeg -c copy)"
            )
        fps = Fraction(fps)
        num_frames = stream.frames
        if not num_frames:
            if stream.duration is not None:
                seconds = stream.duration * stream.time_base
            elif container.duration is not None:
                seconds = Fraction(container.duration, av.time_base)
            else:
                raise VideoSourceError(
                    f"'{path}' has neither a frame count nor a duration in its header; re-mux it"
                )
            num_frames = round(seconds * fps)
        start_pts = stream.start_time or 0
        try:
            first = next(container.decode(stream), None)
        except av.FFmpegError as err:
            raise VideoSourceError(
                f"'{path}' has no decodable frame at its start ({err}); is the file corrupt?"
            ) from err
        if first is None:
            raise VideoSourceError(f"'{path}' has no decodable frame; is the file empty or corrupt?")
        return VideoInfo(
            path=path,
            num_frames=int(num_frames),
            fps=fps,
            width=first.width,
            height=first.height,
            time_base=Fraction(stream.time_base),
            start_pts=int(start_pts),
        )


def probe_videos(paths: Sequence[str], min_frames: int) -> list[VideoInfo]:
    """Probe every file; skip unusable or too-short ones with a warning, and fail only when none is left."""
    usable: list[VideoInfo] = []
    problems: list[str] = []
    for path in paths:
        try:
            info = probe_video(path)
        except VideoSourceError as err:
            problems.append(str(err))
            continue
        if info.num_frames < min_frames:
            problems.append(
                f"'{path}' has {info.num_frames} frames, fewer than one clip spans ({min_frames}); "
                "lower data.frame_stride or data.clip_length"
            )
            continue
        usable.append(info)
    if not usable:
        raise VideoSourceError(
            problems[0] if len(problems) == 1 else "no usable video: " + " | ".join(problems)
        )
    for problem in problems:
        warnings.warn(f"skipping a video: {problem}", RuntimeWarning, stacklevel=2)
    return usable
