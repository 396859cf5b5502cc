"""Untagged colour matrices: an HD frame without a matrix tag is read with BT.709 (as players read it), an SD one
with BT.601 (swscale's default for both, before), in the training reader (plain and compact frames) and the
evaluation frames."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from dora_lightning.data.decode_stats import DecodeStats
from dora_lightning.data.reader import RangeReader, frame_to_rgb, to_pixels
from dora_lightning.data.sources import probe_video
from dora_lightning.evaluation.video_frames import read_video_frames

RED, GREEN = (200, 40, 40), (30, 180, 60)
UNTAGGED, BT709, BT601 = 2, 1, 5
TOLERANCE = 5  # 8-bit limited-range YUV 4:2:0 there and back


def two_colours(width: int, height: int) -> np.ndarray:
    image = np.empty((height, width, 3), np.uint8)
    image[:, : width // 2], image[:, width // 2 :] = RED, GREEN
    return image


def untagged_frame(width: int, height: int, matrix: str) -> av.VideoFrame:
    """Red | green as 4:2:0 YUV made with ``matrix`` ("itu709" or "itu601"), carrying no matrix tag."""
    frame = av.VideoFrame.from_ndarray(two_colours(width, height), format="rgb24")
    frame = frame.reformat(format="yuv420p", dst_colorspace=matrix)
    frame.colorspace = UNTAGGED
    return frame


def colours(rgb: np.ndarray) -> np.ndarray:
    height, width = rgb.shape[:2]
    return rgb[height // 2, [width // 4, 3 * width // 4], :3].astype(int)


@pytest.mark.parametrize(
    ("size", "matrix"),
    [((1280, 720), "itu709"), ((1920, 1080), "itu709"), ((720, 576), "itu601"), ((640, 360), "itu601")],
)
def test_an_untagged_frame_is_read_with_its_size_class_matrix(size, matrix):
    """HD made with BT.709 and SD made with BT.601 both come back as the colours they were made of (+-5); read with
    the other matrix (BT.601 for HD, as before), they are more than 10 levels off."""
    frame = untagged_frame(*size, matrix)
    other = frame.to_ndarray(format="rgb24", src_colorspace="itu601" if matrix == "itu709" else "itu709")
    rgb = frame_to_rgb(frame, 64, 36, "rgb24", None)
    assert np.abs(colours(rgb) - [RED, GREEN]).max() <= TOLERANCE, colours(rgb)
    assert np.abs(colours(other) - [RED, GREEN]).max() > 10


def test_a_tagged_matrix_is_kept():
    frame = untagged_frame(1280, 720, "itu601")
    frame.colorspace = BT601
    assert np.abs(colours(frame_to_rgb(frame, 64, 36, "rgb24", None)) - [RED, GREEN]).max() <= TOLERANCE


@pytest.fixture(scope="module")
def hd_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three 1280x720 H.264 frames made with BT.709 and written without a colour tag (as many cameras do)."""
    path = tmp_path_factory.mktemp("matrix") / "untagged_hd.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10, options={"preset": "ultrafast", "crf": "1"})
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        for index in range(3):
            frame = untagged_frame(1280, 720, "itu709")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        assert next(container.decode(video=0)).colorspace == UNTAGGED
    return path


@pytest.mark.parametrize(("pixel_format", "compact"), [("rgb24", False), ("rgba", False), ("rgb24", True)])
def test_training_frames_of_an_untagged_hd_file_keep_their_colours(hd_file, pixel_format, compact):
    info = probe_video(str(hd_file), hd_file.parent / "index")
    reader = RangeReader(
        info, 0, 3, (64, 36), lambda i: True, DecodeStats(), pixel_format=pixel_format, compact=compact
    )
    frames = dict(reader)
    assert sorted(frames) == [0, 1, 2]
    for frame in frames.values():
        assert isinstance(frame, av.VideoFrame) == compact
        assert np.abs(colours(to_pixels(frame, pixel_format)) - [RED, GREEN]).max() <= TOLERANCE


def test_evaluation_frames_of_an_untagged_hd_file_keep_their_colours(hd_file):
    frames = read_video_frames(hd_file, [1], (36, 64))
    assert np.abs(colours(frames[1]) - [RED, GREEN]).max() <= TOLERANCE
