"""A video's frame timeline as a player shows it, built by demuxing its packets once and cached per file.

Frame ``i`` of the timeline is what a player shows at ``start + i / fps``, ``fps`` being the stream's nominal rate
or, when one is asked for (``data.frame_rate``), that rate: a 30 fps file read at 60 shows each frame twice, a 120 fps
file read at 60 every other frame, so a clip's stride in frames is the same time in every file. The nominal rate is
the header's average rate; without one (a WebM written live, MPEG-1 in MPEG-TS), or when the frames come at more
than twice it (a recording paused for longer than it ran), the rate the packet timestamps show
(:func:`~dora_lightning.data.timestamps.nominal_rate`):

* **Timestamp mode** (``order_mode`` false): the decoder's frames are placed by their presentation timestamps. Frame
  ``i`` shows the latest coded frame whose timestamp is at most half a frame period after ``i``'s time, so a frame
  that is missing (a dropped-frame AVI, a variable-rate phone video) repeats the previous one and surplus frames are
  dropped. A file whose timestamps sit on the nominal grid (nearly every file) keeps the plain
  ``round((pts - start) x time_base x fps)`` arithmetic and stores no per-frame table.
* **Output-order mode** (``order_mode`` true): a stream whose packets carry timestamps in decode order (PTS = DTS,
  or PTS that never go down in demux order: H.264 with B-frames in an AVI, where FFmpeg gives PTS = DTS + 1) while
  the decoder reorders frames. Timestamps are then meaningless, so frames are numbered by the decoder's output order
  counted from the keyframe a seek lands on (the keyframe's position among the packets).
* A file that starts mid-GOP (a live capture, a download cut at its start) starts at its first keyframe, as a player
  does: the packets before it cannot be decoded.
* An edit list that starts mid-GOP (an MP4 trimmed without re-encoding: a phone's "Trim", ``ffmpeg -ss -c copy``):
  FFmpeg keeps the lead-in from the previous keyframe, flagged discard. Those packets are decoded (the first frames
  shown refer to them) but the decoder drops their frames, so they are not frames of the timeline: frame 0 is the
  first frame the edit shows, and the header's count is the edit's duration x rate.
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
import re
from dataclasses import dataclass
from fractions import Fraction

import av
import av.logging
import numpy as np

from dora_lightning.data.timestamps import MISSING, count_restarts, nominal_rate
from dora_lightning.data.video_file import main_video_stream, open_video

ORDER_CHECK_PACKETS = 48  # packets decoded to tell whether a stream with decode-order PTS reorders its frames
AVFMT_NOTIMESTAMPS = 0x80  # FFmpeg's input-format flag of formats without timestamps


def due_tolerance(fps: Fraction, source_fps: Fraction | None) -> float:
    """How early (in frames of ``fps``) a coded frame may come and still count as due: half a frame, or half a frame
    of the file's own rate ``source_fps`` when that is faster (read at a lower rate, frame ``i`` shows the coded frame
    due at its time, not the next one)."""
    return 0.5 if source_fps is None else 0.5 * min(1.0, float(fps / source_fps))


class TimelineError(ValueError):
    """The file has no frame a player could show (no packets, no rate, no decoder for its codec)."""


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
        restarts: how many times the timestamps fall back mid-file in demux order (segments joined end to end; see
            :func:`~dora_lightning.data.timestamps.count_restarts`), to word the note on repeated timestamps.
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
    restarts: int = 0

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
        """Coded frames whose timestamp another coded frame already has (timestamp mode; 0 in output-order mode): a
        few duplicates, or timestamps that restart mid-file (``restarts``: files joined end to end). Only one frame
        of each timestamp can be shown."""
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


@dataclass(frozen=True)
class _Header:
    """What the container says about the main video stream, read before its packets."""

    average_rate: Fraction | None
    stated_rates: tuple[Fraction | None, ...]  # FFmpeg's guessed rate, the codec's, the stream's base rate
    time_base: Fraction | None
    no_timestamps: bool
    frames: int  # the stored frame count (0: none)
    seconds: Fraction | None  # the stream's duration, else the container's

    def frame_count(self, fps: Fraction, edited: bool) -> int:
        """The frame count the header promises at ``fps``: its stored count, else duration x rate (0: none). An
        edit list (``edited``) shows part of the stored frames: its duration says how many."""
        if self.frames and not edited:
            return self.frames
        return 0 if self.seconds is None else round(self.seconds * fps)


def _codec_name(path: str) -> str | None:
    """The name of the undecodable video codec of ``path`` as its container states it (a Matroska CodecID, an AVI
    or MP4 FourCC), read from what FFmpeg logs when it opens the file; None when it says none."""
    level = av.logging.get_level()
    try:
        av.logging.set_level(av.logging.INFO)
        with av.logging.Capture(local=False) as logs, open_video(path) as container:
            dump = container.dumps_format() or ""
    except (av.FFmpegError, OSError):
        return None
    finally:
        av.logging.set_level(level)
    text = "\n".join([message for _, _, message in logs] + [dump])
    found = re.search(r"unsupported AVCodecID (\S+?)\.?\s*$", text, re.MULTILINE) or re.search(
        r"Video: none \((.+?) / 0x", text
    )
    return found.group(1) if found else None


def no_decoder_message(path: str) -> str:
    """One line for a file whose main video stream FFmpeg has no decoder for (an unknown FourCC or CodecID: some
    CCTV and DVR exports), naming the codec as the container states it."""
    codec = _codec_name(path)
    named = f"video codec '{codec}'" if codec else "video codec"
    return (
        f"'{path}' has no decoder for its {named} in this FFmpeg build; convert it, e.g. "
        f"ffmpeg -i '{path}' -c:v libx264 out.mp4"
    )


def _packet_table(path: str) -> tuple[dict[str, np.ndarray], _Header]:
    """Demux every packet of the main video stream (no decoding): timestamps, keyframe and discard flags; plus what
    its header says. An edit list's packets are all kept, those it hides flagged discard."""
    with open_video(path) as container:
        if not container.streams.video:
            raise TimelineError(f"'{path}' has no video stream")
        stream = main_video_stream(container)
        if stream.codec_context is None:
            raise TimelineError(no_decoder_message(path))
        seconds = None
        if stream.duration is not None and stream.time_base is not None:
            seconds = stream.duration * Fraction(stream.time_base)
        elif container.duration is not None:
            seconds = Fraction(container.duration, av.time_base)
        header = _Header(
            average_rate=stream.average_rate,
            stated_rates=(stream.guessed_rate, stream.codec_context.framerate, stream.base_rate),
            time_base=None if stream.time_base is None else Fraction(stream.time_base),
            no_timestamps=_has_no_timestamps(container),
            frames=int(stream.frames or 0),
            seconds=seconds,
        )
        pts, dts, keys, discard = [], [], [], []
        with av.logging.Capture(local=False):
            try:
                for packet in container.demux(stream):
                    if packet.size == 0:
                        continue
                    pts.append(MISSING if packet.pts is None else packet.pts)
                    dts.append(MISSING if packet.dts is None else packet.dts)
                    keys.append(packet.is_keyframe)
                    discard.append(packet.is_discard)
            except (av.FFmpegError, OSError):
                pass  # a truncated or damaged tail: index what could be read
        table = {
            "pts": np.asarray(pts, dtype=np.int64),
            "dts": np.asarray(dts, dtype=np.int64),
            "key": np.asarray(keys, dtype=bool),
            "discard": np.asarray(discard, dtype=bool),
        }
        return table, header


def _has_no_timestamps(container: av.container.InputContainer) -> bool:
    """Whether the container format carries no timestamps (FFmpeg's AVFMT_NOTIMESTAMPS: raw elementary streams)."""
    return bool(int(container.format.flags) & AVFMT_NOTIMESTAMPS)


def _output_reorders(path: str) -> bool:
    """Whether the decoder's output timestamps go backwards over the first packets (B-frames whose packets carry
    decode-order timestamps)."""
    previous = None
    with open_video(path) as container, av.logging.Capture(local=False):
        stream = main_video_stream(container)
        if stream.codec_context is None:
            raise TimelineError(no_decoder_message(path))
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


def _native_rate(path: str, header: _Header, pts: np.ndarray) -> Fraction:
    """The file's own nominal rate (see :func:`~dora_lightning.data.timestamps.nominal_rate`); a raw stream's is
    the one its bitstream states (its demuxer's is a placeholder)."""
    if header.no_timestamps:
        fps = header.stated_rates[0] or header.average_rate or header.stated_rates[2]
    else:
        presentation = np.unique(pts[pts != MISSING])
        fps = nominal_rate(
            header.average_rate, header.stated_rates, presentation, header.time_base or Fraction(1)
        )
    if not fps or header.time_base is None:
        raise TimelineError(
            f"'{path}' has no frame rate or time base in its header; re-mux it (e.g. with ffmpeg -c copy)"
        )
    return Fraction(fps)


def _output_order_timeline(
    pts: np.ndarray, keys: np.ndarray, fps: Fraction, time_base: Fraction, header: int
) -> Timeline:
    """The timeline of packets numbered by output order (``pts`` missing ones filled with their DTS)."""
    if keys.any() and not keys[0]:
        # an edit list's hidden lead-in was left out (output order cannot tell its frames from the shown ones):
        # start at the first keyframe shown, as a file that starts mid-GOP
        lead = int(np.argmax(keys))
        pts, keys, header = pts[lead:], keys[lead:], max(0, header - lead)
    seekable = not np.all(pts == MISSING)
    seek = np.where(pts == MISSING, 0, pts)
    key_positions = np.flatnonzero(keys)
    if len(key_positions) == 0 or key_positions[0] != 0:
        key_positions = np.insert(key_positions, 0, 0)
    return Timeline(
        fps=fps,
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


def build_timeline(path: str, frame_rate: Fraction | None = None) -> Timeline:
    """Demux ``path`` and build its timeline at its own rate or at ``frame_rate`` (see the module docstring; a file
    numbered by output order keeps its own rate: its timestamps cannot place frames); raise TimelineError if it has
    no frame."""
    table, facts = _packet_table(path)
    pts, dts, keys, discard = table["pts"], table["dts"], table["key"], table["discard"]
    if not np.any(~discard):
        raise TimelineError(f"'{path}' holds no video packet; is the file empty or audio only?")
    lead = 0
    if keys.any() and not keys[0]:
        # a file that starts mid-GOP (a live capture, a cut download): nothing before its first keyframe can be
        # decoded, and a player starts there; the header's duration estimate counted those frames too. An edit
        # list's hidden lead-in starts at a keyframe (flagged discard, as the rest of the lead-in)
        lead = int(np.argmax(keys))
        pts, dts, keys, discard = pts[lead:], dts[lead:], keys[lead:], discard[lead:]
    # the frames shown: an edit list's hidden packets are decoded (the first frames shown refer to them) but never
    # shown: the decoder drops their frames
    shown = ~discard
    pts, dts, shown_keys = pts[shown], dts[shown], keys[shown]
    native = _native_rate(path, facts, pts)
    time_base = facts.time_base
    header = max(0, facts.frame_count(native, edited=bool(discard.any())) - lead)
    # PTS that never go down in demux order are decode-order timestamps (copied from the DTS, or offset from them:
    # AVI), whatever the decoder's output order; true presentation times of B-frames go up and down
    same = bool(np.all((pts == dts) | (pts == MISSING)))
    monotonic = bool(np.all(np.diff(pts[pts != MISSING]) >= 0))
    filled = np.where(pts == MISSING, dts, pts)
    if np.any(filled == MISSING) or ((same or monotonic) and len(filled) > 1 and _output_reorders(path)):
        return _output_order_timeline(filled, shown_keys, native, time_base, header)
    restarts = count_restarts(pts, dts, time_base)
    fps, source_fps = native, None
    if frame_rate is not None and frame_rate != native:
        fps, source_fps, header = frame_rate, native, round(header * frame_rate / native)
    source = np.unique(filled)
    start = int(source[0])
    position = (source - start).astype(np.float64) * float(time_base * fps)
    if source_fps is None and np.array_equal(np.rint(position), np.arange(len(source))):
        return Timeline(fps, time_base, start, len(source), len(filled), header, restarts=restarts)
    # the frames that start before the last coded frame's display ends (its time plus one frame of its own rate), by
    # at least the tolerance (timestamps rounded to milliseconds must not add a frame)
    own_frame = 1.0 if source_fps is None else float(fps / source_fps)
    count = math.ceil(position[-1] + own_frame - due_tolerance(fps, source_fps) - 1e-9)
    return Timeline(
        fps,
        time_base,
        start,
        count,
        len(filled),
        header,
        source_pts=source,
        source_fps=source_fps,
        restarts=restarts,
    )
