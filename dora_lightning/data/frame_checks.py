"""Two checks of :class:`~dora_lightning.data.reader.RangeReader` against what a file's headers and index say: where
decoding may start after a seek (:class:`SeekStart`), and frames whose size differs from the probe's
(:class:`SizeCheck`)."""

from __future__ import annotations

from fractions import Fraction

import av

from dora_lightning.data.decode_stats import DecodeStats
from dora_lightning.data.sources import VideoInfo, displayed_width

# demuxers whose timestamps right after a seek are wrong until the next timestamp the file itself carries: FFmpeg's
# MPEG program stream ("mpeg": .mpg .mpeg .vob) gives the pack it lands in a picture fragment and the pack's
# timestamp, so the pictures up to its next timestamp come out one or more frames early (several small pictures share
# a 2 KB pack)
SHIFTED_AFTER_SEEK = frozenset({"mpeg"})
# packets passed over at most while waiting for a keyframe after a seek (this many seconds of the nominal rate, at
# least MIN_PASSED_OVER): a stream whose keyframes no packet flag shows is then decoded from where the seek landed
PASS_OVER_SECONDS = 30
MIN_PASSED_OVER = 300


class SeekStart:
    """After a seek: which packets to pass over, undecoded, before the first one decoding starts from.

    A seek lands on what the container's index calls a keyframe. Some writers flag every packet as one (camera and
    DVR AVI/MKV files): a seek then lands on a P-frame, which decodes into a damaged picture. The packets' own flags
    come from FFmpeg's parser for such containers (the keyframes the frame timeline counted), so packets are passed
    over up to the first one flagged a keyframe, where a player would start. In a file whose index is right the seek
    lands on that packet: nothing is passed over, nothing more is decoded.

    In an MPEG program stream (:data:`SHIFTED_AFTER_SEEK`) a packet's timestamp is the file's own only where FFmpeg
    gives it a position (an "anchor": the first picture starting in a pack); the others are counted on from the last
    anchor. The first anchor after a seek is often the tail of a picture cut by the pack boundary, given the next
    picture's timestamp, so the pictures up to the next anchor are counted from the wrong one; from the second
    anchor on, the timestamps are those a reading from the start gives (the frame timeline's), so decoding starts at
    a keyframe from there. Landing later than the frame asked for is :meth:`RangeReader._open_before`'s to mend (it
    seeks again from further back). At most ``PASS_OVER_SECONDS`` of packets are passed over (keyframes that no flag
    shows): decoding then starts where it is, as it did before this check.
    """

    def __init__(
        self, container: av.container.InputContainer, stream: av.video.stream.VideoStream, fps: Fraction
    ) -> None:
        self.anchors_needed = 2 if container.format.name in SHIFTED_AFTER_SEEK else 0
        self.anchors = 0
        self.passed = 0
        self.limit = max(MIN_PASSED_OVER, round(PASS_OVER_SECONDS * float(fps)))
        self.started = False

    def starts(self, packet: av.Packet) -> bool:
        """Whether ``packet`` (not empty) is decoded: it is the start, or comes after it."""
        if self.started:
            return True
        if self.anchors_needed and packet.pos is not None and packet.pts is not None:
            self.anchors += 1
        if (packet.is_keyframe and self.anchors >= self.anchors_needed) or self.passed >= self.limit:
            self.started = True
            return True
        self.passed += 1
        return False


class SizeCheck:
    """Frames whose size is not the one the file was probed at (its first frame's): a stream that changes resolution
    mid-file (a screen recording of a resized window, recordings or stream downloads joined end to end).

    Such a frame is scaled, with its own displayed aspect, to cover the decode size, and centre-cropped to it: its
    picture keeps its shape (scaling it to the decode size would squash it) and all of a clip's frames keep one size;
    the parts of its edges beyond the decode size's aspect do not train. The first such frame is named once, with the
    sizes, for the file (:meth:`DecodeStats.warn_once`, kind ``"size"``). Frames of the probe's size are untouched.
    """

    def __init__(self, info: VideoInfo, stream: av.video.stream.VideoStream) -> None:
        self.path = info.path
        self.pixel_aspect = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
        # the probe's first frame as shown (pixel aspect applied), before rotation
        self.expected = (info.height, info.width) if info.rotation in (90, 270) else (info.width, info.height)

    def cover(
        self, frame: av.VideoFrame, size: tuple[int, int], index: int, stats: DecodeStats
    ) -> tuple[tuple[int, int], tuple[int, int]] | None:
        """None for a frame of the probe's size; else the size to scale ``frame`` to so that it covers ``size``
        (width, height: the decode size before rotation) with its own aspect, and the top-left corner of the
        centred ``size`` crop of it."""
        shown = (displayed_width(frame.width, self.pixel_aspect), frame.height)
        if shown == self.expected:
            return None
        stats.warn_once(
            self.path,
            "size",
            f"'{self.path}' changes resolution mid-stream: frame {index} is {shown[0]}x{shown[1]}, the file was "
            f"probed at {self.expected[0]}x{self.expected[1]}; such frames are scaled to cover the decode size "
            "with their own aspect and centre-cropped (their edges beyond it do not train); split the file where "
            "its size changes to train on whole frames",
        )
        width, height = size
        aspect = Fraction(shown[0], shown[1])
        if aspect > Fraction(width, height):
            scaled = (max(width, round(height * aspect)), height)
        else:
            scaled = (width, max(height, round(width / aspect)))
        return scaled, ((scaled[0] - width) // 2, (scaled[1] - height) // 2)
