"""Sequential PyAV decoding of a frame range, downscaled at decode time, with bounded recovery from corrupt stretches."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import av
import av.logging
import numpy as np

from dora_lightning.data.decode_stats import DecodeStats
from dora_lightning.data.frame_checks import SeekStart, SizeCheck
from dora_lightning.data.hdr import UNSPECIFIED, ToneMap, tone_map_for
from dora_lightning.data.interlace import FirstField
from dora_lightning.data.sources import VideoInfo
from dora_lightning.data.timeline import Timeline
from dora_lightning.data.video_file import main_video_stream, open_video

# FFmpeg decoders that read ``skip_frame`` at every frame (verified by tests/video_fixtures.py). Others read it once,
# when the decoder opens (libdav1d, FFmpeg's AV1 decoder: a reader opened at an unwanted packet would then never output
# a non-reference frame, wanted or not), or ignore it; they decode every frame.
NONREF_SKIPPING_DECODERS = frozenset({"h264", "hevc", "mpeg1video", "mpeg2video", "mpeg4", "vp8", "vp9"})

_UNSET_TAGS = (0, UNSPECIFIED)  # 0: a "reserved" transfer or primaries tag
ITU709_MATRIX = 1  # FFmpeg's AVCOL_SPC_BT709


def _remuxed_name(path: str) -> str:
    """Where the re-mux command a message suggests writes ``path``'s copy: ``x.remux.mkv`` next to ``x.mkv``."""
    source = Path(path)
    return str(source.with_name(f"{source.stem}.remux{source.suffix or '.mkv'}"))


def to_pixels(frame: np.ndarray | av.VideoFrame, pixel_format: str) -> np.ndarray:
    """A decoded frame as an (H, W, C) uint8 array in ``pixel_format`` (a compact YUV frame is converted here; HDR
    frames are never compact, see :meth:`RangeReader._convert`)."""
    if isinstance(frame, np.ndarray):
        return frame
    return frame.to_ndarray(format=pixel_format, threads=1)


def stream_colour(stream: av.video.stream.VideoStream) -> tuple[int, int]:
    """A video stream's (transfer, primaries) tags, FFmpeg's values (from the container or the codec's headers)."""
    context = stream.codec_context
    return int(context.color_trc), int(context.color_primaries)


def frame_tone_map(frame: av.VideoFrame, stream_tags: tuple[int, int]) -> ToneMap | None:
    """The :class:`~dora_lightning.data.hdr.ToneMap` for ``frame``'s HDR transfer, or None for SDR. Each tag is the
    frame's own (the codec's headers) when set, else its stream's ``stream_tags`` (:func:`stream_colour`): some
    files tag only one of them; a file with no HDR tag is SDR."""
    transfer, primaries = (
        int(own) if int(own) not in _UNSET_TAGS else tag
        for own, tag in zip((frame.color_trc, frame.color_primaries), stream_tags, strict=True)
    )
    return tone_map_for(transfer, primaries)


def assume_hd_matrix(frame: av.VideoFrame) -> None:
    """Tag an HD frame that has no colour-matrix tag as BT.709, the matrix players (mpv, browsers) read it with:
    swscale reads an untagged frame as BT.601 (SD's matrix), which shifts the colours of HD video, made with BT.709
    (a saturated red by 13 levels of 255, a green by 23: tests/test_colour_matrix.py). Wider than 1280 or taller than 576 is HD, as for mpv."""
    if frame.colorspace == UNSPECIFIED and (frame.width >= 1280 or frame.height > 576):
        frame.colorspace = ITU709_MATRIX


def frame_to_rgb(
    frame: av.VideoFrame, width: int, height: int, pixel_format: str, tone_map: ToneMap | None
) -> np.ndarray:
    """``frame`` scaled to ``width`` x ``height`` (area averaging) as an (H, W, 3) uint8 RGB array (``"rgba"``: 4
    channels, alpha 255), converted by swscale with the frame's colour matrix (:func:`assume_hd_matrix` for an
    untagged HD frame) and range; with ``tone_map`` (an HDR
    file), converted to 16-bit RGB instead and tone-mapped to SDR sRGB (an HDR frame without a matrix tag is read as
    BT.2020's, the HDR matrix)."""
    # threads=1: swscale's own slice threads would be inherited half-dead by forked dataloader workers and hang them
    if tone_map is None:
        assume_hd_matrix(frame)
        return frame.to_ndarray(
            format=pixel_format, width=width, height=height, interpolation="AREA", threads=1
        )
    matrix = "bt2020" if frame.colorspace == UNSPECIFIED else None
    codes = frame.to_ndarray(
        format="rgb48le", width=width, height=height, interpolation="AREA", src_colorspace=matrix, threads=1
    )
    return tone_map(codes, channels=4 if pixel_format == "rgba" else 3)


class _LogWatch:
    """FFmpeg's log, routed through PyAV while at least one reader is open (PyAV's default drops every message, and
    with them the only sign of a damaged frame) and captured there, so nothing reaches the terminal; a log level the
    user set is kept. ``errors()`` counts FFmpeg errors (repeats included), ``messages`` holds their text."""

    users = 0
    restore = False
    capture: av.logging.Capture | None = None
    messages: list[tuple[int, str, str]] = []

    @classmethod
    def start(cls) -> None:
        if cls.users == 0:
            cls.restore = av.logging.get_level() is None
            if cls.restore:
                av.logging.set_level(av.logging.ERROR)
            cls.capture = av.logging.Capture(local=False)
            cls.messages = cls.capture.__enter__()
        cls.users += 1

    @classmethod
    def stop(cls) -> None:
        cls.users -= 1
        if cls.users == 0 and cls.capture is not None:
            cls.capture.__exit__(None, None, None)
            cls.capture, cls.messages = None, []
            if cls.restore:
                av.logging.set_level(None)

    @staticmethod
    def errors() -> int:
        return av.logging.get_last_error()[0]


@dataclass
class _Decoded:
    """One frame out of the decoder and the frame indices ``[lo, hi)`` that show it."""

    frame: av.VideoFrame
    lo: int
    hi: int
    damaged: bool


class RangeReader:
    """Decodes frames ``[first, stop)`` of one video once, in order, from one open container.

    Iterating yields ``(index, frame)`` for every index in range that the file's timeline shows (a frame that a
    player repeats is yielded at each of its indices, one it drops not at all); ``frame`` is an (H, W, 3) uint8 array
    at ``size`` (``pixel_format="rgba"``: (H, W, 4), alpha 255), turned upright when the file has rotation metadata,
    when ``wanted(index)`` is true and None otherwise (skipping the colour conversion of unneeded frames); with
    ``compact=True`` the frame is instead a scaled YUV 4:2:0 ``av.VideoFrame`` (3/8 of the RGBA bytes), which
    :func:`to_pixels` converts when a clip uses it (rotated and HDR files give arrays). HDR files (PQ or HLG transfer)
    are tone-mapped to SDR sRGB (:mod:`dora_lightning.data.hdr`), and an interlaced frame is its first displayed field
    (:mod:`dora_lightning.data.interlace`; ``first_field=False``: the whole frame, both fields).
    With one decoding thread, a frame that is not wanted is not even decoded when nothing refers to it
    (``skip_frame="NONREF"`` for its packet: the non-reference B-frames of an H.264 stream, about a third of its
    frames), so a cursor that needs every 4th frame decodes about two thirds of them; such frames are neither yielded
    nor counted. Files numbered by output order (B-frames with PTS = DTS) and codecs whose decoder is not in
    :data:`NONREF_SKIPPING_DECODERS` (AV1) decode every frame.
    **Damaged frames** are yielded as None, added to ``damaged`` and counted in ``stats``: a frame the decoder flags
    corrupt, and every frame from a packet whose decoding logged an FFmpeg error (or failed) up to the next keyframe
    decoded cleanly (the frames after a damaged one refer to it). Errors logged while the decoder warms up after a
    seek, before its first frame, are not damage (an open GOP's leading frames), except on the keyframe itself.
    On a demux error it reopens the file and seeks past the bad stretch, at most ``max_retries`` times in a
    row; the frames it could not decode are simply not yielded. The end of the file ends the iteration early.
    **After a seek** decoding starts at the first packet flagged a keyframe (an index that flags every packet lands
    on P-frames) and, in MPEG program streams, only once the timestamps are the file's again
    (:class:`~dora_lightning.data.frame_checks.SeekStart`); the packets before are not decoded. A file FFmpeg cannot
    seek in (EPERM: an MKV whose index marks no keyframe) is read from its first frame from then on, said once.
    **Frames of another size** than the probe's (a resolution change mid-stream) keep their aspect: scaled to cover
    ``size`` and centre-cropped (:class:`~dora_lightning.data.frame_checks.SizeCheck`), said once per file.
    """

    def __init__(
        self,
        info: VideoInfo,
        first: int,
        stop: int,
        size: tuple[int, int],
        wanted: Callable[[int], bool],
        stats: DecodeStats,
        max_retries: int = 3,
        threads: int = 1,
        pixel_format: Literal["rgb24", "rgba"] = "rgb24",
        compact: bool = False,
        first_field: bool = True,
    ) -> None:
        if pixel_format not in ("rgb24", "rgba"):
            raise ValueError(f"pixel_format must be 'rgb24' or 'rgba', got {pixel_format!r}")
        self.pixel_format, self.compact = pixel_format, compact and info.rotation == 0
        self.first_field = first_field
        self.info, self.first, self.stop, self.size = info, first, stop, size
        self.timeline: Timeline = info.timeline
        self.wanted, self.stats, self.max_retries, self.threads = wanted, stats, max_retries, threads
        self.damaged: set[int] = set()
        self._container: av.container.InputContainer | None = None
        self._skips_per_packet = False
        self._stream_colour: tuple[int, int] = (UNSPECIFIED, UNSPECIFIED)
        self._tone_map: ToneMap | None = None
        self._colour_known = False  # _tone_map decided for this open (from its first converted frame)
        self._first_field: FirstField | None = None  # interlaced frames -> their first field, for this open
        self._seek_start: SeekStart | None = None  # after a seek: the packets to pass over, for this open
        self._size_check: SizeCheck | None = None  # frames of another size than the probe's, for this open

    def close(self) -> None:
        """Close the container (safe to call twice).

        With frame threads (``threads`` != 1) the decoder is flushed first: a frame thread still decoding may log an
        error, which PyAV hands to Python under the GIL, and freeing the decoder holds the GIL while it waits for its
        threads: a deadlock. The flush releases the GIL while it waits for the threads to go idle."""
        if self._container is not None:
            if self.threads != 1:
                for stream in self._container.streams.video:
                    stream.codec_context.flush_buffers()
            self._container.close()
            self._container = None
            _LogWatch.stop()

    def _open_at(self, index: int) -> Iterator[_Decoded]:
        self.close()
        self._container = open_video(self.info.path)
        _LogWatch.start()
        stream = main_video_stream(self._container)
        stream.codec_context.thread_count = self.threads
        self._stream_colour, self._colour_known = stream_colour(stream), False
        self._first_field = FirstField(stream) if self.first_field else None
        # skipping unwanted frames needs one thread (frame threads decode ahead), timestamps that say which frame a
        # packet is (not output order) and a decoder that reads skip_frame per frame; fixed for this open
        self._skips_per_packet = (
            self.threads == 1
            and not self.timeline.order_mode
            and stream.codec_context.name in NONREF_SKIPPING_DECODERS
        )
        if self.threads != 1:
            stream.thread_type = "AUTO"
        self._size_check = SizeCheck(self.info, stream)
        timeline, self._seek_start = self.timeline, None
        seek = timeline.seekable and (index > 0 or (timeline.order_mode and timeline.key_before(index) > 0))
        if seek and self.info.path not in self.stats.unseekable:
            try:
                self._container.seek(timeline.seek_pts(index), stream=stream, backward=True, any_frame=False)
            except PermissionError:
                # FFmpeg's "cannot seek here" (EPERM): an index without keyframes (an MKV with no keyframe flag has
                # no Cues); every further seek fails too, so this process reads the file from its start
                self.stats.unseekable.add(self.info.path)
                self.stats.warn_once(
                    self.info.path,
                    "seek",
                    f"'{self.info.path}' cannot be seeked (FFmpeg refuses to seek in it: an index that marks no "
                    "keyframe?): each read decodes it from its first frame, slow for a file longer than a few "
                    f"minutes; re-mux it once to rebuild its index: ffmpeg -i '{self.info.path}' -c copy "
                    f"'{_remuxed_name(self.info.path)}'",
                )
                return self._open_at(0)
            self._seek_start = SeekStart(self._container, stream, self.info.fps)
        return self._decode(stream)

    def _packet_wanted(self, packet: av.Packet) -> bool:
        if not self._skips_per_packet or packet.pts is None:
            return True
        lo, hi = self.timeline.indices_of(packet.pts)
        return any(self.wanted(i) for i in range(max(lo, self.first), min(hi, self.stop)))

    def _decode(self, stream: av.video.stream.VideoStream) -> Iterator[_Decoded]:
        """Decode ``stream`` packet by packet, telling the decoder to skip a packet's frame when it is not wanted
        and no other frame refers to it, and marking damaged frames."""
        context, timeline = stream.codec_context, self.timeline
        damaged, clean_key, warming, first_packet = False, False, True, True
        next_index: int | None = None  # output-order mode: index of the next frame out
        previous_hi = self.first
        packets = self._container.demux(stream)
        single = self.threads == 1
        marks = (_LogWatch.errors(), len(_LogWatch.messages))
        while True:
            # a long run of errors: keep memory bounded (texts only, counts stay)
            if len(_LogWatch.messages) > 10_000:
                _LogWatch.messages.clear()
                marks = (marks[0], 0)
            # one thread: the errors of this step; frame threads log from the background, so every error since
            # this reader's previous step counts (conservative: another reader's error may be counted here too)
            errors_before, seen = (_LogWatch.errors(), len(_LogWatch.messages)) if single else marks
            packet = next(packets, None)  # a demuxer error logged here (lost data) is damage too
            if packet is not None and packet.size == 0:
                continue  # an empty "repeat the previous frame" entry, or the demuxer's end marker
            if packet is not None and self._seek_start is not None and not self._seek_start.starts(packet):
                continue  # a seek that landed before a frame the decoder can start from: not decoded
            if packet is not None and timeline.order_mode and next_index is None and packet.pts is not None:
                next_index = timeline.key_at_pts(packet.pts)
            if packet is not None and self._skips_per_packet:
                context.skip_frame = "DEFAULT" if self._packet_wanted(packet) else "NONREF"
            try:
                frames, failed = context.decode(packet), None
            except av.FFmpegError as err:
                if packet is None:
                    break
                frames, failed = [], str(err)
            marks = (_LogWatch.errors(), len(_LogWatch.messages))
            error = failed is not None or marks[0] > errors_before
            if error and (not warming or first_packet):
                damaged, clean_key = True, False
                messages = [m for _, _, m in _LogWatch.messages[seen:]] + ([failed] if failed else [])
                self.stats.note_damage(self.info.path, messages)
            elif packet is not None and packet.is_keyframe and not error:
                clean_key = True
            first_packet = False
            for frame in frames:
                warming = False
                if frame.key_frame and clean_key:
                    damaged = False
                if timeline.order_mode:
                    next_index = 0 if next_index is None else next_index
                    lo, hi = next_index, next_index + 1
                    next_index += 1
                elif frame.pts is None:
                    lo, hi = previous_hi, previous_hi + 1
                else:
                    lo, hi = timeline.indices_of(frame.pts)
                previous_hi = hi
                yield _Decoded(frame, lo, hi, damaged or bool(frame.is_corrupt))
            if packet is None:
                break

    def _convert(self, frame: av.VideoFrame, index: int) -> np.ndarray | av.VideoFrame:
        width, height = self.size
        quarter_turns = self.info.rotation // 90
        if quarter_turns % 2:
            width, height = height, width
        # a frame of another size than the probe's (a resolution change mid-stream): scaled to cover the decode size
        # with its own aspect, then centre-cropped to it (see SizeCheck)
        cover = self._size_check.cover(frame, (width, height), index, self.stats)
        if self._first_field is not None:
            frame = self._first_field(frame)  # an interlaced frame: its first field (data/interlace.py)
        if not self._colour_known:
            self._tone_map, self._colour_known = frame_tone_map(frame, self._stream_colour), True
        # compact: scaled but kept as YUV 4:2:0 (1.5 bytes a pixel); to_pixels converts it when it is used. HDR files
        # are not kept compact (8-bit YUV would lose their 10 bits before the tone mapping): their frames are
        # tone-mapped here and kept as arrays, which to_pixels passes through; so is a frame of another size (cropped)
        if self.compact and self._tone_map is None and cover is None:
            assume_hd_matrix(frame)  # the compact frame keeps the tag for to_pixels
            return frame.reformat(width, height, "yuv420p", interpolation="AREA", threads=1)
        if cover is None:
            pixels = frame_to_rgb(frame, width, height, self.pixel_format, self._tone_map)
        else:
            (scaled_width, scaled_height), (left, top) = cover
            pixels = frame_to_rgb(frame, scaled_width, scaled_height, self.pixel_format, self._tone_map)
            pixels = np.ascontiguousarray(pixels[top : top + height, left : left + width])
        if quarter_turns:
            pixels = np.ascontiguousarray(np.rot90(pixels, quarter_turns))
        return pixels

    def _open_before(self, target: int, second: int) -> Iterator[_Decoded]:
        """:meth:`_open_at` ``target``, seeking again from further back (``second`` frames, then 4x, then 16x that)
        while the first frame decoded comes after ``target`` (or none comes): seeking in a file without an index
        (MPEG-TS: dash-cams, camcorders) can land past the keyframe asked for, even past the end. Frames before
        ``target`` are decoded and passed over."""
        back = 0
        for attempt in range(4):
            start = max(0, target - back)
            frames = self._open_at(start)
            first = next(frames, None)
            if (first is not None and first.lo <= target) or start == 0 or attempt == 3:
                break
            back = max(back, first.lo - target if first is not None else 0) + second * 4**attempt
        if first is not None:
            yield first
        yield from frames

    def __iter__(self) -> Iterator[tuple[int, np.ndarray | None]]:
        target, failures = self.first, 0
        skip = max(1, round(float(self.info.fps)))
        try:
            while target < self.stop:
                try:
                    for decoded in self._open_before(target, skip):
                        self.stats.decoded_frames += 1
                        lo, hi = max(decoded.lo, target), min(decoded.hi, self.stop)
                        if decoded.lo >= self.stop:
                            return
                        pixels = None
                        for index in range(lo, hi):
                            target, failures = index + 1, 0
                            if decoded.damaged:
                                self.damaged.add(index)
                                self.stats.count_damaged(self.info.path, index)
                                yield index, None
                            elif self.wanted(index):
                                pixels = self._convert(decoded.frame, index) if pixels is None else pixels
                                yield index, pixels
                            else:
                                yield index, None
                    return
                except (av.FFmpegError, OSError) as err:
                    failures += 1
                    self.stats.decode_errors += 1
                    self.stats.warn_once(
                        self.info.path,
                        "decode",
                        f"'{self.info.path}': decode error near frame {target} ({err.__class__.__name__}: {err}); "
                        f"skipping ahead (attempt {failures} of {self.max_retries}); further errors in this file are counted",
                    )
                    if failures > self.max_retries:
                        return
                    target += skip * failures
        finally:
            self.close()
