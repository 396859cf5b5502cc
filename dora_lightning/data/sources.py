"""Find the video files a user named and read what the clip sampler needs to know about each (frames, rate, size)."""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av

from dora_lightning.data.index_cache import load_or_build
from dora_lightning.data.timeline import Timeline, TimelineError, no_decoder_message
from dora_lightning.data.timestamps import timeline_notes
from dora_lightning.data.video_file import main_video_stream, open_video
from dora_lightning.sizes import short_side_size

# what a folder given as data.paths is searched for (any single file is tried whatever its suffix); .mts/.m2ts: AVCHD
# camcorders, .3gp: phones, .mxf: broadcast and some body cameras, .h264/.h265/.hevc: raw streams (Raspberry Pi
# cameras, some dash-cams)
VIDEO_SUFFIXES = (
    ".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts", ".3gp", ".flv", ".wmv",
    ".mxf", ".ogv", ".vob", ".h264", ".264", ".h265", ".265", ".hevc",
)  # fmt: skip


class VideoSourceError(ValueError):
    """A video path or file the data module cannot use; the message names the file and what to do."""


@dataclass(frozen=True, eq=False)
class VideoInfo:
    """What the sampler and decoder need to know about one video file.

    ``num_frames`` is the number of frames a player shows at the nominal rate ``fps``, counted from the file's packets
    (never from its header): frame ``i`` is what a player shows ``i / fps`` seconds after the first frame (see
    :mod:`dora_lightning.data.timeline`). ``width`` and ``height`` are the displayed size: a file with rotation
    metadata (``rotation`` degrees counter-clockwise, a multiple of 90) is decoded and then turned upright; one with
    non-square pixels (HDV's 1440x1080 shown as 1920x1080, DV, DVD) is scaled to its displayed width when decoded.
    """

    path: str
    num_frames: int
    fps: Fraction
    width: int
    height: int
    time_base: Fraction
    start_pts: int
    rotation: int = 0
    timeline: Timeline | None = None

    def __post_init__(self) -> None:
        if self.timeline is None:
            object.__setattr__(
                self,
                "timeline",
                Timeline(self.fps, self.time_base, self.start_pts, self.num_frames, self.num_frames),
            )

    def index_of(self, pts: int) -> int:
        """Frame index of a presentation timestamp on the nominal grid."""
        return self.timeline.index_of(pts)

    def pts_of(self, index: int) -> int:
        """A timestamp to seek to before decoding frame ``index``."""
        return self.timeline.seek_pts(index)

    def decode_size(self, short_side: int | None) -> tuple[int, int]:
        """(width, height) of the upright frame after scaling the short side to ``short_side`` (never upscaling),
        both even."""
        if short_side is None:
            return self.width, self.height
        return short_side_size(self.width, self.height, short_side, multiple=2, upscale=False)


def resolve_video_paths(paths: str | Sequence[str]) -> list[str]:
    """Expand a file, a folder (searched recursively), a glob, or a list of these into a sorted list of video files."""
    entries = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if not entries:
        raise VideoSourceError("data.paths is empty: give a video file, a folder of videos or a glob")
    found: list[str] = []
    for entry in entries:
        entry = os.path.expanduser(str(entry))
        # a path that exists is taken as it is: yt-dlp names files "Title [id].mp4", which is also a glob
        if os.path.isfile(entry):
            found.append(entry)
        elif os.path.isdir(entry):
            matches = _videos_in_folder(entry)
            if not matches:
                raise VideoSourceError(
                    f"data.paths: the folder '{entry}' holds no video file ({', '.join(VIDEO_SUFFIXES)}); "
                    "put the videos there or point data.paths at the files"
                )
            found.extend(matches)
        elif glob.has_magic(entry):
            matches = sorted(p for p in glob.glob(entry, recursive=True) if os.path.isfile(p))
            if not matches:
                raise VideoSourceError(f"data.paths: the glob '{entry}' matches no file; check the pattern")
            found.extend(matches)
        else:
            raise VideoSourceError(
                f"data.paths: '{entry}' does not exist; give a video file, a folder of videos or a glob "
                "(see docs/data.md for getting the Walking Tours videos)"
            )
    # one file reached by two names (a link beside its target, a folder given twice) trains once
    by_file: dict[str, str] = {}
    for path in found:
        by_file.setdefault(os.path.realpath(path), path)
    return list(by_file.values())


def _videos_in_folder(folder: str) -> list[str]:
    """The video files under ``folder``, sorted, following linked sub-folders (a city's videos on another disk,
    linked into the data folder) but never a folder twice, and leaving out hidden files and folders (macOS's ``._*``
    companions of every file copied to an exFAT disk, ``.Trash``, ``.ipynb_checkpoints``)."""
    matches: list[str] = []
    seen: set[str] = set()
    for root, folders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree, or a second link to the same folder
            folders[:] = []
            continue
        seen.add(real)
        folders[:] = [name for name in folders if not name.startswith(".")]
        matches.extend(
            str(Path(root) / name)
            for name in files
            if not name.startswith(".")
            and Path(name).suffix.lower() in VIDEO_SUFFIXES
            and os.path.isfile(os.path.join(root, name))
        )
    return sorted(matches)


def displayed_width(width: int, pixel_aspect: Fraction | None) -> int:
    """A stored width as a player shows it: widened or narrowed by non-square pixels (``pixel_aspect``, None or 0:
    square)."""
    if pixel_aspect and pixel_aspect > 0 and pixel_aspect != 1:
        return max(1, round(width * pixel_aspect))
    return width


def _first_frame(path: str) -> dict[str, int]:
    """Decode the first frame of ``path``: its displayed size (upright, and widened or narrowed by a non-square pixel
    aspect ratio, as a player shows it) and rotation; raise VideoSourceError when none decodes."""
    try:
        with open_video(path) as container, av.logging.Capture(local=False):
            stream = main_video_stream(container)
            stream.codec_context.thread_count = 1
            first = next(container.decode(stream), None)
            if first is None:
                raise VideoSourceError(f"'{path}' has no decodable frame; is the file empty or corrupt?")
            rotation = int(round((first.rotation or 0) / 90)) % 4 * 90
            pixel_aspect = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    except av.FFmpegError as err:
        raise VideoSourceError(
            f"'{path}' has no decodable frame at its start ({err}); is the file corrupt?"
        ) from err
    width = displayed_width(
        first.width, pixel_aspect
    )  # non-square pixels: HDV's 1440x1080 shown as 1920x1080
    width, height = (first.height, width) if rotation in (90, 270) else (width, first.height)
    return {"width": width, "height": height, "rotation": rotation}


def probe_video(
    path: str, index_cache: str | os.PathLike | None = None, frame_rate: Fraction | None = None
) -> VideoInfo:
    """Index ``path`` (its player timeline, from the packets, at ``frame_rate`` or its own rate; cached in
    ``index_cache``, default :func:`~dora_lightning.data.index_cache.default_cache_dir`) and decode its first frame;
    raise VideoSourceError if it is unusable."""
    try:
        with open_video(path) as container:
            if not container.streams.video:
                raise VideoSourceError(f"'{path}' has no video stream")
            if main_video_stream(container).codec_context is None:
                raise VideoSourceError(no_decoder_message(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise VideoSourceError(f"'{path}' is not a readable video ({err.__class__.__name__}: {err})") from err
    try:
        timeline, facts = load_or_build(path, index_cache, _first_frame, frame_rate=frame_rate)
    except TimelineError as err:
        raise VideoSourceError(str(err)) from err
    except (av.FFmpegError, OSError) as err:
        raise VideoSourceError(f"'{path}' is not a readable video ({err.__class__.__name__}: {err})") from err
    return VideoInfo(
        path=path,
        num_frames=timeline.num_frames,
        fps=timeline.fps,
        width=int(facts["width"]),
        height=int(facts["height"]),
        time_base=timeline.time_base,
        start_pts=timeline.start_pts,
        rotation=int(facts["rotation"]),
        timeline=timeline,
    )


def _file_notes(path: str, info: VideoInfo, frame_rate: Fraction | None = None) -> list[str]:
    """What to tell the user about a file that trains but not as a player would show all of it: a truncated file,
    repeated or jumping timestamps (:func:`~dora_lightning.data.timestamps.timeline_notes`), a rate that cannot be
    applied, a raw stream that cannot be seeked."""
    notes: list[str] = []
    promised = info.timeline.header_frames
    if promised > info.num_frames + max(2, info.num_frames // 100):
        notes.append(
            f"'{path}' ends early (truncated?): its header promises {promised} frames, its packets hold "
            f"{info.num_frames}; training on those {info.num_frames}"
        )
    notes.extend(timeline_notes(path, info.timeline))
    if frame_rate is not None and info.fps != frame_rate:
        notes.append(
            f"'{path}' is read at its own {float(info.fps):g} fps, not data.frame_rate {float(frame_rate):g}: its "
            "frames carry no usable timestamps to place them in time (numbered by decoding order); re-encode it "
            f"at {float(frame_rate):g} fps, or put it in a run of its own"
        )
    if not info.timeline.seekable:
        rate = f"{float(info.fps):g}"
        notes.append(
            f"'{path}' is a raw stream without timestamps (no container): it cannot be seeked, so each read decodes "
            f"it from its first frame (slow for files longer than a few minutes), at the {rate} fps its stream "
            f"states; put it in a container once to train at full speed: ffmpeg -r {rate} -i '{path}' -c copy "
            f"'{Path(path).with_suffix('.mp4')}'"
        )
    return notes


def probe_videos(
    paths: Sequence[str],
    min_frames: int,
    index_cache: str | os.PathLike | None = None,
    frame_rate: Fraction | None = None,
) -> list[VideoInfo]:
    """Probe every file (indexes cached in ``index_cache``; frames counted at ``frame_rate``, None: each file's own
    rate); skip unusable or too-short ones with a warning, and fail only when none is left."""
    usable: list[VideoInfo] = []
    problems: list[str] = []
    notes: list[str] = []
    for path in paths:
        try:
            info = probe_video(path, index_cache, frame_rate)
        except VideoSourceError as err:
            problems.append(str(err))
            continue
        if info.num_frames < min_frames:
            problems.append(
                f"'{path}' has {info.num_frames} frames, fewer than one clip spans ({min_frames}); "
                "lower data.frame_stride or data.clip_length"
            )
            continue
        notes.extend(_file_notes(path, info, frame_rate))
        usable.append(info)
    if not usable:
        raise VideoSourceError(
            problems[0] if len(problems) == 1 else "no usable video: " + " | ".join(problems)
        )
    for problem in problems:
        warnings.warn(f"skipping a video: {problem}", RuntimeWarning, stacklevel=2)
    for note in notes:
        warnings.warn(note, RuntimeWarning, stacklevel=2)
    return usable
