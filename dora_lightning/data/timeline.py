"""A video's frame timeline as a player shows it, built by demuxing its packets once and cached per file.

Frame ``i`` of the timeline is what a player shows at ``start + i / fps``, ``fps`` being the stream's nominal rate
or, when one is asked for (``data.frame_rate``), that rate: a 30 fps file read at 60 shows each frame twice, a 120 fps
file read at 60 every other frame, so a clip's stride in frames is the same time in every file:

* **Timestamp mode** (``order_mode`` false): the decoder's frames are placed by their presentation timestamps. Frame
  ``i`` shows the latest coded frame whose timestamp is at most half a frame period after ``i``'s time, so a frame
  that is missing (a dropped-frame AVI, a variable-rate phone video) repeats the previous one and surplus frames are
  dropped. A file whose timestamps sit on the nominal grid (nearly every file) keeps the plain
  ``round((pts - start) x time_base x fps)`` arithmetic and stores no per-frame table.
* **Output-order mode** (``order_mode`` true): a stream whose packets all carry PTS = DTS while the decoder reorders
  frames (B-frames written by some muxers). Timestamps are then meaningless, so frames are numbered by the decoder's
  output order counted from the keyframe a seek lands on (the keyframe's position among the packets).
* A file that starts mid-GOP (a live capture, a download cut at its start) starts at its first keyframe, as a player
  does: the packets before it cannot be decoded.
* **Not seekable** (``seekable`` false): a stream with no timestamp at all, a raw H.264 / HEVC elementary stream
  with no container (``.h264`` from a Raspberry Pi camera or a dash-cam). FFmpeg cannot seek in it, so it is read in
  output order from its first frame every time, at the rate its bitstream states (the demuxer's own rate is a
  placeholder 25 fps).

Counts come from the packets (never from the header): demuxing reads the file once without decoding (about as long
as reading the file from disk) plus a decode of its first few dozen packets; the result is cached (see
:func:`dora_lightning.data.index_cache.load_or_build`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from dora_lightning.data.video_file import main_video_stream, open_video

ORDER_CHECK_PACKETS = 48  # packets decoded to tell whether a PTS = DTS stream reorders its frames
AVFMT_NOTIMESTAMPS = 0x80  # FFmpeg's input-format flag of formats without timestamps


def due_tolerance(fps: Fraction, source_fps: Fraction | None) -> float:
    """How early (in frames of ``fps``) a coded frame may come and still count as due: half a frame, or half a frame
    of the file's own rate ``source_fps`` when that is faster (read at a lower rate, frame ``i`` shows the coded frame
    due at its time, not the next one)."""
    return 0.5 if source_fps is None else 0.5 * min(1.0, float(fps / source_fps))


class TimelineError(ValueError):
    """The file has no frame a player could show (no packets, no rate, nothing decodable)."""


@dataclass(frozen=True, eq=False)
class Timeline:
    """Where each frame index of a video comes from.

    Attributes:
        fps: the nominal frame rate the index counts in.
        time_base: the stream's timestamp unit, in seconds.
        start_pts: timestamp of frame 0 (the first frame shown).
        num_frames: frames a player shows at ``fps``.
        coded_frames: frames coded in the file (non-empty packets).
        header_frames: the frame count the header promises (its count, else duration x rate; 0: none), only to tell
            the user when a file ends early.
        order_mode: frames are numbered by decoder output order (B-frames with PTS = DTS).
        source_pts: sorted presentation timestamps of the coded frames where they are off the nominal grid (timestamp
            mode only); None when frame ``i`` is simply the coded frame at ``start + i / fps``.
        key_index: frame index of each keyframe (output-order mode only).
        key_pts: timestamp to seek to for each keyframe (output-order mode only).
        seekable: whether a reader may seek (False: no packet has a timestamp; decode from the first frame).
        source_fps: the file's own rate when ``fps`` is another one (``data.frame_rate``), else None.
    """

    fps: Fraction
    time_base: Fraction
    start_pts: int
    num_frames: int
    coded_frames: int
    header_frames: int = 0
    order_mode: bool = False
    source_pts: np.ndarray | None = None
    key_index: np.ndarray | None = None
    key_pts: np.ndarray | None = None
    seekable: bool = True
    source_fps: Fraction | None = None

    def __post_init__(self) -> None:
        if self.source_pts is not None:
            position = (self.source_pts - self.start_pts).astype(np.float64) * float(
                self.time_base * self.fps
            )
            first = np.ceil(position - self.tolerance - 1e-9).astype(np.int64)
            object.__setattr__(self, "_first_index", np.append(np.maximum(first, 0), self.num_frames))

    @property
    def tolerance(self) -> float:
        """See :func:`due_tolerance`."""
        return due_tolerance(self.fps, self.source_fps)

    @property
    def repeated_timestamps(self) -> int:
        """Coded frames whose timestamp another coded frame already has (timestamp mode; 0 in output-order mode):
        timestamps that restart mid-file (files joined end to end). Only one frame of each timestamp can be shown."""
        if self.order_mode:
            return 0
        distinct = len(self.source_pts) if self.source_pts is not None else self.num_frames
        return max(0, self.coded_frames - distinct)

    @property
    def on_grid(self) -> bool:
        """Whether frame ``i`` is the ``i``-th coded frame (timestamps on the nominal grid, or output-order mode)."""
        return self.source_pts is None

    def index_of(self, pts: int) -> int:
        """Frame index of a timestamp on the nominal grid (timestamp mode)."""
        return round((pts - self.start_pts) * self.time_base * self.fps)

    def indices_of(self, pts: int) -> tuple[int, int]:
        """The frame indices ``[lo, hi)`` that show the coded frame with timestamp ``pts`` (empty when a player drops
        it, several when it repeats it); timestamp mode only."""
        if self.source_pts is None:
            index = self.index_of(pts)
            return index, index + 1
        j = int(np.searchsorted(self.source_pts, pts, side="right")) - 1
        if j < 0:
            return 0, 0  # before the first frame shown (an edit list's lead-in)
        first: np.ndarray = self._first_index  # type: ignore[attr-defined]
        return int(first[j]), int(first[j + 1])

    def seek_pts(self, index: int) -> int:
        """A timestamp to seek to (backwards, to a keyframe) before decoding frame ``index``."""
        if self.order_mode:
            return int(self.key_pts[self.key_before(index)])
        if self.source_pts is None:
            return self.start_pts + math.floor(Fraction(index) / self.fps / self.time_base)
        first: np.ndarray = self._first_index  # type: ignore[attr-defined]
        j = max(0, int(np.searchsorted(first[:-1], index, side="right")) - 1)
        return int(self.source_pts[j])

    def key_before(self, index: int) -> int:
        """Position in ``key_index`` of the last keyframe at or before frame ``index`` (output-order mode)."""
        return max(0, int(np.searchsorted(self.key_index, index, side="right")) - 1)

    def key_at_pts(self, pts: int) -> int:
        """Frame index of the keyframe whose seek timestamp is the last at or before ``pts`` (output-order mode)."""
        k = max(0, int(np.searchsorted(self.key_pts, pts, side="right")) - 1)
        return int(self.key_index[k])


def _header_frames(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, fps: Fraction
) -> int:
    if stream.frames:
        return int(stream.frames)
    if stream.duration is not None and stream.time_base is not None:
        return round(stream.duration * stream.time_base * fps)
    if container.duration is not None:
        return round(Fraction(container.duration, av.time_base) * fps)
    return 0


def _packet_table(path: str) -> tuple[dict[str, np.ndarray], Fraction, Fraction, int]:
    """Demux every packet of the main video stream (no decoding): timestamps, keyframe flags; plus fps, time base."""
    with open_video(path) as container:
        if not container.streams.video:
            raise TimelineError(f"'{path}' has no video stream")
        stream = main_video_stream(container)
        fps = stream.average_rate or stream.guessed_rate or stream.base_rate
        if _has_no_timestamps(container):
            fps = stream.guessed_rate or fps  # the bitstream's own timing, not the raw demuxer's placeholder
        if not fps or stream.time_base is None:
            raise TimelineError(
                f"'{path}' has no frame rate or time base in its header; re-mux it (e.g. with ffmpeg -c copy)"
            )
        pts, dts, keys = [], [], []
        missing = np.iinfo(np.int64).min
        with av.logging.Capture(local=False):
            try:
                for packet in container.demux(stream):
                    if packet.size == 0 or packet.is_discard:
                        continue
                    pts.append(missing if packet.pts is None else packet.pts)
                    dts.append(missing if packet.dts is None else packet.dts)
                    keys.append(packet.is_keyframe)
            except (av.FFmpegError, OSError):
                pass  # a truncated or damaged tail: index what could be read
        table = {
            "pts": np.asarray(pts, dtype=np.int64),
            "dts": np.asarray(dts, dtype=np.int64),
            "key": np.asarray(keys, dtype=bool),
        }
        header = _header_frames(container, stream, Fraction(fps))
        return table, Fraction(fps), Fraction(stream.time_base), header


def _has_no_timestamps(container: av.container.InputContainer) -> bool:
    """Whether the container format carries no timestamps (FFmpeg's AVFMT_NOTIMESTAMPS: raw elementary streams)."""
    return bool(int(container.format.flags) & AVFMT_NOTIMESTAMPS)


def _output_reorders(path: str) -> bool:
    """Whether the decoder's output timestamps go backwards over the first packets (B-frames with PTS = DTS)."""
    previous = None
    with open_video(path) as container, av.logging.Capture(local=False):
        stream = main_video_stream(container)
        stream.codec_context.thread_count = 1
        try:
            for n, frame in enumerate(container.decode(stream)):
                if frame.pts is not None:
                    if previous is not None and frame.pts < previous:
                        return True
                    previous = frame.pts
                if n >= ORDER_CHECK_PACKETS:
                    break
        except (av.FFmpegError, OSError):
            pass
    return False


def build_timeline(path: str, frame_rate: Fraction | None = None) -> Timeline:
    """Demux ``path`` and build its timeline at its own rate or at ``frame_rate`` (see the module docstring; a file
    numbered by output order keeps its own rate: its timestamps cannot place frames); raise TimelineError if it has
    no frame."""
    table, native, time_base, header = _packet_table(path)
    pts, dts, keys = table["pts"], table["dts"], table["key"]
    if len(pts) == 0:
        raise TimelineError(f"'{path}' holds no video packet; is the file empty or audio only?")
    if keys.any() and not keys[0]:
        # a file that starts mid-GOP (a live capture, a cut download): nothing before its first keyframe can be
        # decoded, and a player starts there; the header's duration estimate counted those frames too
        lead = int(np.argmax(keys))
        pts, dts, keys = pts[lead:], dts[lead:], keys[lead:]
        header = max(0, header - lead)
    missing = np.iinfo(np.int64).min
    same = bool(np.all((pts == dts) | (pts == missing)))
    pts = np.where(pts == missing, dts, pts)
    if np.any(pts == missing) or (same and len(pts) > 1 and _output_reorders(path)):
        seekable = not np.all(pts == missing)
        seek = np.where(pts == missing, 0, pts)
        key_positions = np.flatnonzero(keys)
        if len(key_positions) == 0 or key_positions[0] != 0:
            key_positions = np.insert(key_positions, 0, 0)
        return Timeline(
            fps=native,
            time_base=time_base,
            start_pts=int(seek[0]),
            num_frames=len(pts),
            coded_frames=len(pts),
            header_frames=header,
            order_mode=True,
            key_index=key_positions.astype(np.int64),
            key_pts=seek[key_positions].astype(np.int64),
            seekable=seekable,
        )
    fps, source_fps = native, None
    if frame_rate is not None and frame_rate != native:
        fps, source_fps, header = frame_rate, native, round(header * frame_rate / native)
    source = np.unique(pts)
    start = int(source[0])
    position = (source - start).astype(np.float64) * float(time_base * fps)
    if source_fps is None and np.array_equal(np.rint(position), np.arange(len(source))):
        return Timeline(fps, time_base, start, len(source), len(pts), header)
    # the frames that start before the last coded frame's display ends (its time plus one frame of its own rate), by
    # at least the tolerance (timestamps rounded to milliseconds must not add a frame)
    own_frame = 1.0 if source_fps is None else float(fps / source_fps)
    count = math.ceil(position[-1] + own_frame - due_tolerance(fps, source_fps) - 1e-9)
    return Timeline(fps, time_base, start, count, len(pts), header, source_pts=source, source_fps=source_fps)
