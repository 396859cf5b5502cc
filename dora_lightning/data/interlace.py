"""Interlaced video (broadcast, older camcorders and dash-cams, 1080i/576i/480i): each frame as one moment in time.

An interlaced frame holds two fields, the even and the odd lines, filmed 1/50 or 1/60 s apart: anything that moves
shows twice, combed at full size and as a double image once the frame is scaled down. Players deinterlace; training
on the raw frames teaches the encoder those ghosts. A frame the decoder flags interlaced is replaced by its first
field in display order (FFmpeg's ``field`` filter: a half-height frame over the same pixels, no copy), which the
reader then scales to the decode size as it scales any frame: at the decode sizes of training (short side 320 for
1080 lines) the field's 540 lines lose nothing, and one frame stays one frame (the timeline is unchanged).
"""

from __future__ import annotations

import av
import av.filter

__all__ = ["FirstField", "displays_bottom_first"]

# FFmpeg's AVFieldOrder values whose first displayed field is the bottom one: AV_FIELD_BB, AV_FIELD_TB
_BOTTOM_FIRST = (3, 4)


def displays_bottom_first(stream: av.video.stream.VideoStream) -> bool:
    """Whether ``stream``'s codec says its bottom field is displayed first (most interlaced HD video is top first;
    DV is bottom first)."""
    return int(getattr(stream.codec_context, "field_order", 0) or 0) in _BOTTOM_FIRST


class FirstField:
    """Maps a decoded frame of ``stream`` to what training should see: a progressive frame unchanged, an interlaced
    one to its first displayed field (see the module docstring). One filter graph per frame size and format."""

    def __init__(self, stream: av.video.stream.VideoStream) -> None:
        self.stream = stream
        self._graph: tuple[tuple[int, int, str], av.filter.Graph] | None = None

    def __call__(self, frame: av.VideoFrame) -> av.VideoFrame:
        if not frame.interlaced_frame:
            return frame
        key = (frame.width, frame.height, frame.format.name)
        if self._graph is None or self._graph[0] != key:
            self._graph = (key, self._build(frame))
        graph = self._graph[1]
        graph.push(frame)
        return graph.pull()

    def _build(self, frame: av.VideoFrame) -> av.filter.Graph:
        graph = av.filter.Graph()
        source = graph.add_buffer(
            width=frame.width, height=frame.height, format=frame.format, time_base=self.stream.time_base
        )
        field = "bottom" if displays_bottom_first(self.stream) else "top"
        picker = graph.add("field", f"type={field}")
        sink = graph.add("buffersink")
        source.link_to(picker)
        picker.link_to(sink)
        graph.configure()
        return graph
