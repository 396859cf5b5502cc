"""Sequential PyAV decoding of a frame range, downscaled at decode time, with bounded recovery from corrupt stretches."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import av
import numpy as np

from dora_lightning.data.sources import VideoInfo


@dataclass
class DecodeStats:
    """Counters of one worker's decoding; they travel with the emitted samples so the main process can sum them."""

    decoded_frames: int = 0
    decode_errors: int = 0
    missing_frames: int = 0
    substituted_clips: int = 0
    warned: set[tuple[str, str]] = field(default_factory=set)

    def warn_once(self, path: str, kind: str, message: str) -> None:
        """Warn about ``path`` once per kind of problem per worker (the counters keep the totals)."""
        if (path, kind) not in self.warned:
            self.warned.add((path, kind))
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def summary(self) -> str | None:
        """One line with the totals of the problems met, or None when there were none."""
        if not (self.decode_errors or self.missing_frames or self.substituted_clips):
            return None
        files = ", ".join(sorted({f"'{path}'" for path, _ in self.warned}))
        return (
            f"clip stream: {self.decode_errors} decode errors, {self.missing_frames} missing frames, "
            f"{self.substituted_clips} clips replaced by the previous good clip this epoch ({files})"
        )


def to_pixels(frame: np.ndarray | av.VideoFrame, pixel_format: str) -> np.ndarray:
    """A decoded frame as an (H, W, C) uint8 array in ``pixel_format`` (a compact YUV frame is converted here)."""
    if isinstance(frame, np.ndarray):
        return frame
    return frame.to_ndarray(format=pixel_format, threads=1)


class RangeReader:
    """Decodes frames ``[first, stop)`` of one video once, in order, from one open container.

    Iterating yields ``(index, frame)`` for every decoded index in range; ``frame`` is an (H, W, 3) uint8 array at
    ``size`` (``pixel_format="rgba"``: (H, W, 4), alpha 255) when ``wanted(index)`` is true and None otherwise
    (skipping the colour conversion of unneeded frames); with ``compact=True`` the frame is instead a scaled YUV 4:2:0
    ``av.VideoFrame`` (3/8 of the RGBA bytes), which :func:`to_pixels` converts when a clip uses it.
    With one decoding thread, a frame that is not wanted is not even decoded when nothing refers to it
    (``skip_frame="NONREF"`` for its packet: the non-reference B-frames of an H.264 stream, about a third of its
    frames), so a cursor that needs every 4th frame decodes about two thirds of them; such frames are neither yielded
    nor counted.
    On a decode or demux error it reopens the file and seeks past the bad stretch, at most ``max_retries`` times in a
    row; the frames it could not decode are simply not yielded. The end of the file ends the iteration early.
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
    ) -> None:
        if pixel_format not in ("rgb24", "rgba"):
            raise ValueError(f"pixel_format must be 'rgb24' or 'rgba', got {pixel_format!r}")
        self.pixel_format, self.compact = pixel_format, compact
        self.info, self.first, self.stop, self.size = info, first, stop, size
        self.wanted, self.stats, self.max_retries, self.threads = wanted, stats, max_retries, threads
        self._container: av.container.InputContainer | None = None

    def close(self) -> None:
        """Close the container (safe to call twice)."""
        if self._container is not None:
            self._container.close()
            self._container = None

    def _open_at(self, index: int) -> Iterator[av.VideoFrame]:
        self.close()
        self._container = av.open(self.info.path)
        stream = self._container.streams.video[0]
        stream.codec_context.thread_count = self.threads
        if self.threads != 1:
            stream.thread_type = "AUTO"
        if index > 0:
            self._container.seek(self.info.pts_of(index), stream=stream, backward=True, any_frame=False)
        if self.threads != 1:  # frame threads decode ahead: leave every frame to the decoder
            return self._container.decode(stream)
        return self._decode_skipping(stream)

    def _decode_skipping(self, stream: av.video.stream.VideoStream) -> Iterator[av.VideoFrame]:
        """Decode ``stream`` packet by packet, telling the decoder to skip a packet's frame when it is not wanted
        and no other frame refers to it."""
        context = stream.codec_context
        for packet in self._container.demux(stream):
            wanted = True
            if packet.pts is not None:
                index = self.info.index_of(packet.pts)
                wanted = self.first <= index < self.stop and self.wanted(index)
            context.skip_frame = "DEFAULT" if wanted else "NONREF"
            yield from context.decode(packet)

    def _convert(self, frame: av.VideoFrame) -> np.ndarray | av.VideoFrame:
        width, height = self.size
        # compact: scaled but kept as YUV 4:2:0 (1.5 bytes a pixel); to_pixels converts it when it is used
        if self.compact:
            return frame.reformat(width, height, "yuv420p", interpolation="AREA", threads=1)
        # threads=1: swscale's own slice threads would be inherited half-dead by forked dataloader workers and hang them
        return frame.to_ndarray(
            format=self.pixel_format, width=width, height=height, interpolation="AREA", threads=1
        )

    def __iter__(self) -> Iterator[tuple[int, np.ndarray | None]]:
        target, failures, previous = self.first, 0, self.first - 1
        skip = max(1, round(float(self.info.fps)))
        try:
            while target < self.stop:
                try:
                    for frame in self._open_at(target):
                        self.stats.decoded_frames += 1
                        index = previous + 1 if frame.pts is None else self.info.index_of(frame.pts)
                        if index < target:
                            continue
                        if index >= self.stop:
                            return
                        previous, target = index, index + 1
                        failures = 0
                        yield index, (self._convert(frame) if self.wanted(index) else None)
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
