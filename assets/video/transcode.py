"""Re-create the bundled default video from OpenCV's ``vtest.avi`` (Debian package ``opencv-doc``).

Usage::

    apt-get download opencv-doc && dpkg-deb -x opencv-doc_*.deb /tmp/opencv-doc
    python assets/video/transcode.py /tmp/opencv-doc/usr/share/doc/opencv-doc/examples/data/vtest.avi assets/video/vtest.mp4

Halves the resolution (768x576 -> 384x288) and encodes H.264 with a short GOP (10 frames = 1 s) so the file stays small
(about 2 MB) and seeks are cheap.
"""

from __future__ import annotations

import argparse
from fractions import Fraction

import av


def transcode(
    source: str, target: str, width: int = 384, height: int = 288, gop: int = 10, crf: int = 28
) -> None:
    """Decode ``source`` and write it to ``target`` as H.264 at ``width`` x ``height`` with a ``gop``-frame GOP."""
    with av.open(source) as src, av.open(target, "w") as dst:
        in_stream = src.streams.video[0]
        rate = in_stream.average_rate or Fraction(10)
        out = dst.add_stream("libx264", rate=rate)
        out.width, out.height, out.pix_fmt = width, height, "yuv420p"
        out.codec_context.gop_size = gop
        out.options = {
            "crf": str(crf),
            "preset": "slow",
            "g": str(gop),
            "keyint_min": str(gop),
            "sc_threshold": "0",
        }
        dst.metadata["comment"] = (
            "OpenCV samples/data/vtest.avi, transcoded by dora-lightning (Apache-2.0 AND BSD-3-Clause)"
        )
        for frame in src.decode(in_stream):
            small = frame.reformat(width=width, height=height, format="yuv420p")
            small.pts = None
            for packet in out.encode(small):
                dst.mux(packet)
        for packet in out.encode():
            dst.mux(packet)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source")
    parser.add_argument("target")
    args = parser.parse_args()
    transcode(args.source, args.target)


if __name__ == "__main__":
    main()
