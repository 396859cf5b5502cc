"""Generate a long H.264 test video that looks like a downloaded walking-tour video, for the data benchmarks.

The content is either a real source video (by default the bundled street scene ``assets/video/vtest.mp4``), played
back at the output frame rate with cross-faded source frames and seen through a slowly panning and zooming window, or,
when no source is available, moving textured shapes on a textured background. Consecutive output frames always differ
(continuous camera-like motion), so the encoder produces ordinary P/B frames rather than skipped duplicates. A fine
luma texture at output resolution, moving with the camera, stands in for the detail of a real recording, so that the
bitrate (about 3 Mbit/s at 720p60, like a YouTube H.264 stream) and the decode cost per frame are realistic.

The stream is H.264 (libx264, yuv420p, High profile with CABAC and B-frames) with a fixed GOP (``keyint = keyint_min =
gop``, no scene-cut keyframes), as in a YouTube download (1280x720, 60 fps, keyframe every 2 s by default).

Generation is cached: a sidecar ``<video>.json`` records the parameters; an existing file whose sidecar matches (and
whose size and stream properties agree) is reused.

Usage::

    python benchmarks/make_long_video.py bench_out/long_720p60_180s.mp4 --seconds 180
    python benchmarks/make_long_video.py out.mp4 --width 640 --height 360 --seconds 30 --source none
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO_ROOT / "assets" / "video" / "vtest.mp4"
FORMAT_VERSION = 2  # bump when the generated content changes, to invalidate caches

__all__ = ["DEFAULT_SOURCE", "make_video", "probe_video", "repeat_video"]


def probe_video(path: str | os.PathLike) -> dict:
    """Width, height, frame rate and frame count (from the container header) of the first video stream."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return {
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "fps": float(stream.average_rate) if stream.average_rate else None,
            "frames": int(stream.frames),
            "codec": stream.codec_context.name,
        }


def _load_source_frames(source: Path, max_frames: int = 4000) -> list[Image.Image]:
    """Decode the source video into a list of RGB PIL images (the bundled video is 795 frames of 384x288)."""
    frames = []
    with av.open(str(source)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_image())
            if len(frames) >= max_frames:
                break
    if len(frames) < 2:
        raise ValueError(f"source video {source} has fewer than 2 decodable frames")
    return frames


class _SourcePlayer:
    """Real footage: source frames at ``src_fps`` replayed at ``fps`` with cross-fades, ping-pong looped."""

    def __init__(self, frames: list[Image.Image], src_fps: float, fps: float):
        self.frames = frames
        self.step = src_fps / fps  # source frames per output frame
        self.size = frames[0].size

    def __call__(self, i: int) -> Image.Image:
        pos = i * self.step
        n = len(self.frames)
        period = 2 * (n - 1)

        def at(k: int) -> Image.Image:
            k %= period
            return self.frames[k if k < n else period - k]

        k = int(pos)
        alpha = pos - k
        a = at(k)
        if alpha < 1e-6:
            return a
        return Image.blend(a, at(k + 1), alpha)


class _SyntheticScene:
    """Moving textured shapes over a textured background, rendered at a low working resolution."""

    def __init__(self, size: tuple[int, int] = (512, 384), seed: int = 0, num_shapes: int = 12):
        rng = np.random.default_rng(seed)
        self.size = size
        w, h = size

        def texture(tw: int, th: int, scale: float) -> Image.Image:
            noise = rng.random((th // 4 + 1, tw // 4 + 1, 3)) * 255
            img = Image.fromarray(noise.astype(np.uint8)).resize((tw, th), Image.BICUBIC)
            yy, xx = np.mgrid[0:th, 0:tw].astype(np.float32)
            stripes = 40 * np.sin(xx / scale + 0.7 * yy / scale)[..., None]
            tint = rng.integers(40, 200, size=3)
            arr = 0.5 * np.asarray(img, np.float32) + 0.5 * tint + stripes
            return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).filter(ImageFilter.SMOOTH)

        self.background = texture(w, h, 9.0)
        self.shapes = []
        for _ in range(num_shapes):
            sw, sh = (int(v) for v in rng.integers(30, 110, size=2))
            tex = texture(sw, sh, float(rng.uniform(2, 6)))
            mask = Image.new("L", (sw, sh), 0)
            draw = ImageDraw.Draw(mask)
            if rng.random() < 0.5:
                draw.ellipse((0, 0, sw - 1, sh - 1), fill=255)
            else:
                draw.rectangle((0, 0, sw - 1, sh - 1), fill=255)
            speed = rng.uniform(0.3, 1.5, size=2) * rng.choice([-1, 1], size=2)  # px per output frame
            phase = rng.uniform(0, 1, size=2) * np.array([w, h])
            self.shapes.append((tex, mask, speed, phase))

    def __call__(self, i: int) -> Image.Image:
        w, h = self.size
        img = self.background.copy()
        for tex, mask, speed, phase in self.shapes:
            sw, sh = tex.size
            x, y = phase + speed * i
            # bounce inside the frame (triangle wave)
            x = abs((x % (2 * (w - sw))) - (w - sw))
            y = abs((y % (2 * (h - sh))) - (h - sh))
            img.paste(tex, (int(x), int(y)), mask)
        return img


def _window(i: int, fps: float, src_w: int, src_h: int, aspect: float) -> tuple[float, float, float, float]:
    """A 16:9 (``aspect``) window over the source that pans and zooms slowly and continuously."""
    t = i / fps
    max_w = min(src_w, src_h * aspect)
    zoom = 1.3 + 0.25 * math.sin(2 * math.pi * t / 37.0)  # 1.05 .. 1.55
    ww = max_w / zoom
    wh = ww / aspect
    cx = src_w / 2 + (src_w - ww) / 2 * 0.95 * math.sin(2 * math.pi * t / 23.0)
    cy = src_h / 2 + (src_h - wh) / 2 * 0.95 * math.sin(2 * math.pi * t / 29.0 + 1.0)
    return (cx - ww / 2, cy - wh / 2, cx + ww / 2, cy + wh / 2)


class _DetailLayer:
    """Fine luma texture at output resolution that moves with the camera window, like real scene detail.

    Upscaled low-resolution footage is smoother than a real 720p recording and compresses to a third of a YouTube
    bitrate; adding this layer brings a 720p60 stream to about 3 Mbit/s and the decode cost per frame up accordingly.
    """

    def __init__(self, width: int, height: int, strength: float, seed: int = 1):
        rng = np.random.default_rng(seed)
        noise = Image.fromarray((rng.random((2 * height, 2 * width)) * 255).astype(np.uint8))
        tex = np.asarray(noise.filter(ImageFilter.GaussianBlur(0.8)), np.float32) - 127.5
        self.tex = np.round(tex / tex.std() * strength).astype(np.int16)
        self.width, self.height = width, height

    def apply(self, frame: av.VideoFrame, box: tuple[float, float, float, float]) -> av.VideoFrame:
        planes = frame.to_ndarray()  # yuv420p: (H * 3 / 2, W), luma first
        scale = self.width / (box[2] - box[0])
        ox = min(max(int(box[0] * scale), 0), self.width)
        oy = min(max(int(box[1] * scale), 0), self.height)
        luma = planes[: self.height].astype(np.int16)
        luma += self.tex[oy : oy + self.height, ox : ox + self.width]
        np.clip(luma, 0, 255, out=luma)
        planes[: self.height] = luma
        return av.VideoFrame.from_ndarray(planes, format="yuv420p")


def _expected_meta(width, height, fps, seconds, gop, crf, preset, source, detail) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "width": int(width),
        "height": int(height),
        "fps": float(fps),
        "seconds": float(seconds),
        "frames": int(round(seconds * fps)),
        "gop": int(gop),
        "crf": int(crf),
        "preset": preset,
        "codec": "libx264",
        "pix_fmt": "yuv420p",
        "source": source,
        "detail": float(detail),
    }


def _cache_ok(path: Path, meta: dict) -> bool:
    sidecar = path.with_name(path.name + ".json")
    if not (path.is_file() and sidecar.is_file()):
        return False
    try:
        recorded = json.loads(sidecar.read_text())
        if {k: recorded.get(k) for k in meta} != meta or recorded.get("bytes") != path.stat().st_size:
            return False
        info = probe_video(path)
    except (OSError, ValueError, av.error.FFmpegError):
        return False
    return (
        info["width"] == meta["width"]
        and info["height"] == meta["height"]
        and info["frames"] == meta["frames"]
        and info["codec"] == "h264"
    )


def make_video(
    path: str | os.PathLike,
    width: int = 1280,
    height: int = 720,
    fps: int = 60,
    seconds: float = 180,
    gop: int = 120,
    crf: int = 23,
    source: str | os.PathLike | None = None,
    preset: str = "superfast",
    detail: float = 6.0,
    force: bool = False,
    verbose: bool = False,
) -> Path:
    """Write (or reuse) an H.264 mp4 at ``path`` and return its path.

    ``source``: a video whose frames are looped (with cross-fades and a pan/zoom window) as content; ``None`` or a
    missing file gives synthetic moving shapes. ``detail``: strength (luma std) of a fine texture added at output
    resolution, moving with the camera, so the bitrate and decode cost resemble a real recording (0 disables).
    ``preset``: x264 preset; ``superfast`` (the default) still uses CABAC and B-frames like a YouTube stream and makes
    a 3-min 720p60 video in about two minutes on 2 cores (``veryfast`` is about 1.5x slower; ``ultrafast`` would drop
    CABAC and B-frames, which makes decoding unrealistically cheap).
    """
    path = Path(path)
    src_path = Path(source) if source is not None else None
    if src_path is not None and not src_path.is_file():
        if verbose:
            print(f"source {src_path} not found: using synthetic content")
        src_path = None
    src_tag = f"video:{src_path.name}" if src_path is not None else "synthetic"
    meta = _expected_meta(width, height, fps, seconds, gop, crf, preset, src_tag, detail)
    if not force and _cache_ok(path, meta):
        if verbose:
            print(f"cached: {path}")
        return path

    if src_path is not None:
        with av.open(str(src_path)) as c:
            src_fps = float(c.streams.video[0].average_rate or 25)
        scene = _SourcePlayer(_load_source_frames(src_path), src_fps, fps)
    else:
        scene = _SyntheticScene()
    src_w, src_h = scene.size
    aspect = width / height
    # sub-pixel pan/zoom is done at a working resolution (cheap PIL resize with a float box), then swscale upscales
    # and converts to yuv420p in one pass (a few ms per 720p frame in total).
    work_w = min(width, 640)
    work_h = int(round(work_w / aspect / 2)) * 2
    detail_layer = _DetailLayer(width, height, detail) if detail > 0 else None

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial" + path.suffix)
    n_frames = meta["frames"]
    t0 = time.time()
    with av.open(str(tmp), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.codec_context.thread_type = "FRAME"  # x264 frame threads (PyAV defaults to sliced threads)
        stream.codec_context.thread_count = 0
        stream.options = {
            "crf": str(crf),
            "preset": preset,
            "profile": "high",
            "g": str(gop),
            "keyint_min": str(gop),
            "sc_threshold": "0",
        }
        for i in range(n_frames):
            box = _window(i, fps, src_w, src_h, aspect)
            img = scene(i).resize((work_w, work_h), Image.BILINEAR, box=box)
            frame = av.VideoFrame.from_image(img).reformat(
                width=width, height=height, format="yuv420p", interpolation="BILINEAR"
            )
            if detail_layer is not None:
                frame = detail_layer.apply(frame, box)
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
            if verbose and i and i % (30 * int(fps)) == 0:
                print(f"  {i}/{n_frames} frames, {i / (time.time() - t0):.0f} fps")
        for packet in stream.encode():
            out.mux(packet)
    os.replace(tmp, path)
    meta["bytes"] = path.stat().st_size
    meta["encode_seconds"] = round(time.time() - t0, 1)
    path.with_name(path.name + ".json").write_text(json.dumps(meta, indent=2) + "\n")
    if verbose:
        print(f"wrote {path}: {n_frames} frames in {meta['encode_seconds']} s, {meta['bytes'] / 1e6:.1f} MB")
    return path


def repeat_video(
    src: str | os.PathLike, path: str | os.PathLike, repeats: int, verbose: bool = False
) -> Path:
    """Write ``src`` ``repeats`` times back to back into ``path`` by remuxing its packets (no re-encoding, seconds).

    Meant for videos made by :func:`make_video` (closed GOPs starting with a keyframe, constant frame rate), so the
    copies join seamlessly: a ``repeats`` x longer video with the same stream properties and GOP structure, whose
    content repeats. Cached like :func:`make_video`.
    """
    src, path = Path(src), Path(path)
    src_meta = json.loads(src.with_name(src.name + ".json").read_text())
    meta = dict(src_meta)
    meta.pop("bytes", None)
    meta.pop("encode_seconds", None)
    meta.update(
        seconds=src_meta["seconds"] * repeats,
        frames=src_meta["frames"] * repeats,
        source=f"repeat:{src.name}:{src_meta.get('bytes')}x{repeats}",
    )
    if _cache_ok(path, meta):
        if verbose:
            print(f"cached: {path}")
        return path
    t0 = time.time()
    tmp = path.with_name(path.stem + ".partial" + path.suffix)
    with av.open(str(src)) as inp, av.open(str(tmp), "w", format="mp4") as out:
        in_stream = inp.streams.video[0]
        out_stream = out.add_stream_from_template(in_stream)
        period = None
        for rep in range(repeats):
            inp.seek(0, stream=in_stream)
            last_end = 0
            for packet in inp.demux(in_stream):
                if packet.dts is None:  # flush packet
                    continue
                if rep == 0:
                    last_end = max(last_end, packet.pts + packet.duration)
                else:
                    packet.pts += rep * period
                    packet.dts += rep * period
                packet.stream = out_stream
                out.mux(packet)
            if rep == 0:
                period = last_end  # one copy's duration in stream time-base units
    os.replace(tmp, path)
    meta["bytes"] = path.stat().st_size
    meta["encode_seconds"] = round(time.time() - t0, 1)
    path.with_name(path.name + ".json").write_text(json.dumps(meta, indent=2) + "\n")
    if verbose:
        print(f"wrote {path}: {repeats} copies of {src.name} in {meta['encode_seconds']} s")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("path", help="output .mp4")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--fps", type=int, default=60)
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--gop", type=int, default=120, help="keyframe interval in frames (fixed)")
    parser.add_argument("--crf", type=int, default=23)
    parser.add_argument("--preset", default="superfast", help="x264 preset (veryfast or faster recommended)")
    parser.add_argument(
        "--detail", type=float, default=6.0, help="fine moving luma texture strength (0: none)"
    )
    parser.add_argument(
        "--source",
        default=str(DEFAULT_SOURCE),
        help="video to use as content; 'none' for synthetic shapes (default: the bundled street video)",
    )
    parser.add_argument(
        "--force", action="store_true", help="regenerate even if a matching cached file exists"
    )
    args = parser.parse_args(argv)
    source = None if args.source.lower() == "none" else args.source
    make_video(
        args.path,
        width=args.width,
        height=args.height,
        fps=args.fps,
        seconds=args.seconds,
        gop=args.gop,
        crf=args.crf,
        source=source,
        preset=args.preset,
        detail=args.detail,
        force=args.force,
        verbose=True,
    )


if __name__ == "__main__":
    main()
