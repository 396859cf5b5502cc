"""A random-access clip dataset that decodes and augments the way the official DoRA code does (the benchmark baseline).

It imitates ``WT_dataset_1vid`` + ``DataAugmentationDINO`` of the official repository (see docs spec (C)), with PyAV in
place of decord:

* ``__init__`` opens the video once to index it (frame count, presentation timestamps, keyframe positions), as the
  official code creates a decord ``VideoReader`` to count frames.
* ``__getitem__(index)`` opens the container again and, like a new decord ``VideoReader``, demuxes (reads without
  decoding) every packet of the file to rebuild that index (``reindex_per_open=False`` skips this; its cost grows with
  the video's length: about 0.1 s for 3 min of 720p here, 2 s per sample for an hour-long video). It then
  reads the frames ``index + j * step`` (j < T) at NATIVE resolution, one after the other, as decord's ``get_batch``
  does: if the next frame lies in another GOP than the decoder's current position (or behind it), seek back to that
  frame's keyframe and decode forward to it; otherwise keep decoding forward from the current position. Every frame the decoder outputs is counted; only the T target frames are
  converted to RGB. (``seek_policy="always"`` re-seeks for every frame instead.) Decoding is single-threaded, as in the
  official ``DecordInit(num_threads=1)``.
* The clip then goes through the official augmentation, per clip: ToTensorVideo (float, C,T,H,W), a 300x300
  RandomResizedCropVideo (scale 0.2-1, bilinear) shared by all frames; the global view: RandomResizedCropVideo 224 (scale
  0.4-1) + horizontal flip shared by all frames, then PER FRAME in PIL: ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8,
  RandomGrayscale p=0.2, Gaussian blur p=0.1 (radius 0.1-2), ToTensor, Normalize; 6 local views, PER FRAME in PIL:
  RandomResizedCrop 112 (scale 0.05-0.4, bicubic), jitter, grayscale, blur p=0.5, normalize. torchvision's PIL transforms
  are used for all of this on purpose: it is the baseline.

Each sample is a dict ``{"global_views": [(T,3,224,224)], "local_views": 6 x [(T,3,112,112)], "decoded_frames": int,
"start": int, "decode_seconds": float, "augment_seconds": float}``, so a DataLoader with workers still reports how many
frames were decoded per emitted clip (``sum(batch["decoded_frames"]) / batch_size``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torchvision import transforms

__all__ = ["OfficialStyleAugmentation", "OfficialStyleClipDataset", "VideoIndex", "index_video"]

from dora_lightning.imagenet import IMAGENET_MEAN, IMAGENET_STD


class VideoIndex:
    """Presentation timestamps of every frame (in display order) and the positions of keyframes."""

    def __init__(self, pts: np.ndarray, keyframes: np.ndarray, width: int, height: int, fps: float):
        self.pts = pts  # (N,) int64, sorted
        self.keyframes = keyframes  # sorted frame positions of keyframes
        self.width, self.height, self.fps = width, height, fps
        self.position = {int(p): i for i, p in enumerate(pts)}

    def __len__(self) -> int:
        return len(self.pts)

    def keyframe_of(self, i: int) -> int:
        k = int(np.searchsorted(self.keyframes, i, side="right")) - 1
        return int(self.keyframes[max(k, 0)])


def _index_container(container, stream) -> VideoIndex:
    pts, key_pts = [], []
    for packet in container.demux(stream):
        if packet.pts is None:  # flush packet
            continue
        pts.append(packet.pts)
        if packet.is_keyframe:
            key_pts.append(packet.pts)
    pts_arr = np.array(sorted(pts), dtype=np.int64)
    if len(pts_arr) == 0:
        raise ValueError(f"{container.name}: no video frames")
    keyframes = np.searchsorted(pts_arr, np.array(sorted(key_pts), dtype=np.int64))
    if len(keyframes) == 0 or keyframes[0] != 0:
        keyframes = np.concatenate([[0], keyframes])
    fps = float(stream.average_rate) if stream.average_rate else 0.0
    cc = stream.codec_context
    return VideoIndex(pts_arr, keyframes.astype(np.int64), cc.width, cc.height, fps)


def index_video(path: str) -> VideoIndex:
    """Demux (no decoding) the first video stream of ``path`` and index its frames."""
    with av.open(path) as container:
        return _index_container(container, container.streams.video[0])


class _PILGaussianBlur:
    """DINO's blur: with probability ``p``, PIL Gaussian blur with a radius drawn uniformly in [0.1, 2]."""

    def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


def _video_random_resized_crop(clip: torch.Tensor, size: int, scale: Sequence[float]) -> torch.Tensor:
    """RandomResizedCropVideo: one crop box for all frames of a (C,T,H,W) float clip, bilinear resize to size x size."""
    i, j, h, w = transforms.RandomResizedCrop.get_params(
        clip, scale=list(scale), ratio=[3.0 / 4.0, 4.0 / 3.0]
    )
    crop = clip[..., i : i + h, j : j + w]
    return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)


class OfficialStyleAugmentation:
    """The official ``DataAugmentationDINO`` (one global view + ``num_local_crops`` local views per frame)."""

    def __init__(
        self,
        pre_crop_size: int = 300,
        pre_crop_scale: Sequence[float] = (0.2, 1.0),
        global_size: int = 224,
        global_scale: Sequence[float] = (0.4, 1.0),
        local_size: int = 112,
        local_scale: Sequence[float] = (0.05, 0.4),
        num_local_crops: int = 6,
    ):
        self.pre_crop_size, self.pre_crop_scale = pre_crop_size, tuple(pre_crop_scale)
        self.global_size, self.global_scale = global_size, tuple(global_scale)
        self.num_local_crops = num_local_crops
        jitter_gray = [
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
        ]
        normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        self.global_frame = transforms.Compose(
            [transforms.ToPILImage(), *jitter_gray, _PILGaussianBlur(0.1), *normalize]
        )
        self.local_frame = transforms.Compose(
            [
                transforms.ToPILImage(),
                transforms.RandomResizedCrop(
                    local_size, scale=tuple(local_scale), interpolation=transforms.InterpolationMode.BICUBIC
                ),
                *jitter_gray,
                _PILGaussianBlur(0.5),
                *normalize,
            ]
        )

    def __call__(self, video: torch.Tensor) -> list[torch.Tensor]:
        """``video``: uint8 (T,H,W,3). Returns ``[global (T,3,G,G), local_1 (T,3,L,L), ...]``."""
        clip = video.permute(3, 0, 1, 2).float().div_(255.0)  # ToTensorVideo -> (C,T,H,W)
        clip = _video_random_resized_crop(clip, self.pre_crop_size, self.pre_crop_scale)
        g = _video_random_resized_crop(clip, self.global_size, self.global_scale)
        if random.random() < 0.5:  # RandomHorizontalFlipVideo, shared by all frames
            g = g.flip(-1)
        g = g.permute(1, 0, 2, 3)  # (T,C,H,W)
        frames = clip.permute(1, 0, 2, 3)
        crops = [torch.stack([self.global_frame(f) for f in g])]
        for _ in range(self.num_local_crops):
            crops.append(torch.stack([self.local_frame(f) for f in frames]))
        return crops


class OfficialStyleClipDataset(torch.utils.data.Dataset):
    """Clips of ``num_frames`` frames ``step`` apart, one per start frame, decoded by random access per sample."""

    def __init__(
        self,
        path: str,
        num_frames: int = 8,
        step: int = 60,
        transform=None,
        seek_policy: str = "decord",
        decoder_threads: int = 1,
        max_retries: int = 3,
        reindex_per_open: bool = True,
    ):
        if seek_policy not in ("decord", "always"):
            raise ValueError(f"seek_policy must be 'decord' or 'always', not {seek_policy!r}")
        self.path = str(path)
        self.num_frames, self.step = num_frames, step
        self.transform = transform
        self.seek_policy = seek_policy
        self.decoder_threads = decoder_threads
        self.max_retries = max_retries
        self.reindex_per_open = reindex_per_open
        self.index = index_video(self.path)  # like the official __init__ opening the video to count frames
        if len(self) <= 0:
            raise ValueError(f"{self.path}: {len(self.index)} frames is too short for {num_frames} x {step}")
        self.decoded_frames = 0  # per process (per DataLoader worker); also returned with every sample

    def __len__(self) -> int:
        return len(self.index) - self.num_frames * self.step

    def read_frames(self, positions: Sequence[int]) -> tuple[np.ndarray, int]:
        """Open the video, decode the frames at ``positions`` (RGB, native size); return them and the decode count."""
        idx = self.index
        out, decoded = [], 0
        with av.open(self.path) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = self.decoder_threads
            if self.reindex_per_open:  # decord's VideoReader demuxes the whole file to index it on every open
                idx = _index_container(container, stream)
            frames = None  # decode iterator; None = no decoder position yet
            current = -1
            for target in positions:
                key = idx.keyframe_of(target)
                if (
                    frames is None
                    or self.seek_policy == "always"
                    or target <= current
                    or key != idx.keyframe_of(current)
                ):
                    container.seek(int(idx.pts[key]), stream=stream, backward=True, any_frame=False)
                    frames = container.decode(stream)
                frame = None
                for frame in frames:
                    decoded += 1
                    pos = idx.position.get(frame.pts, -1) if frame.pts is not None else -1
                    if pos >= target:
                        current = pos
                        break
                else:
                    raise EOFError(f"{self.path}: ran out of frames looking for frame {target}")
                out.append(frame.to_ndarray(format="rgb24"))
        return np.stack(out), decoded

    def __getitem__(self, index: int) -> dict:
        positions = [index + j * self.step for j in range(self.num_frames)]
        t0 = time.perf_counter()
        for attempt in range(self.max_retries + 1):  # the official code retries forever
            try:
                video, decoded = self.read_frames(positions)
                break
            except (av.error.FFmpegError, EOFError):
                if attempt == self.max_retries:
                    raise
        t1 = time.perf_counter()
        self.decoded_frames += decoded
        with torch.no_grad():
            clip = torch.from_numpy(video)
            crops = self.transform(clip) if self.transform is not None else [clip]
        t2 = time.perf_counter()
        return {
            "global_views": crops[:1],
            "local_views": crops[1:],
            "decoded_frames": decoded,
            "start": index,
            "decode_seconds": t1 - t0,
            "augment_seconds": t2 - t1,
        }


def official_dataloader(
    path: str,
    num_frames: int = 8,
    step: int = 60,
    batch_size: int = 6,
    num_workers: int = 2,
    seed: int = 0,
    num_local_crops: int = 6,
    seek_policy: str = "decord",
) -> torch.utils.data.DataLoader:
    """The official loading setup: shuffled start frames (``DistributedSampler(shuffle=True)`` on one rank), drop_last."""
    dataset = OfficialStyleClipDataset(
        path,
        num_frames=num_frames,
        step=step,
        transform=OfficialStyleAugmentation(num_local_crops=num_local_crops),
        seek_policy=seek_policy,
    )
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        num_workers=num_workers,
        drop_last=True,
    )
