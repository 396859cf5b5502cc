"""VideoClipDataModule: streams multi-cropped clips from long videos with PyAV, resumable mid-epoch."""

from __future__ import annotations

import warnings
from fractions import Fraction
from typing import Any, Literal

import lightning.pytorch as pl
import torch

from dora_lightning.data.augment.device import DeviceAugment
from dora_lightning.data.augment.multicrop import ClipMultiCrop
from dora_lightning.data.augment.plan import FramesAndPlan
from dora_lightning.data.loader import ClipLoader
from dora_lightning.data.position import ClipStreamPosition
from dora_lightning.data.sampling import ClipSpec, cursors_per_worker
from dora_lightning.data.sources import VideoInfo, probe_videos, resolve_video_paths
from dora_lightning.data.stream import VideoClipStream
from dora_lightning.distributed import process_zero_value_if_any_differs

DEFAULT_VIDEO = "assets/video/vtest.mp4"
AUGMENT_ON = ("cpu", "gpu", "auto")

# Lightning cannot see that this loader resumes through the data module's state_dict, nor that __len__ is exact
# per worker (every shard emits the same number of clips); both of its generic warnings are false alarms here.
warnings.filterwarnings(
    "ignore", message="You're resuming from a checkpoint that ended before the epoch ended"
)
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")


class VideoClipDataModule(ClipStreamPosition, pl.LightningDataModule):
    """Clips of ``clip_length`` frames ``frame_stride`` apart, streamed from one or many long videos.

    Video is decoded sequentially, downscaled at decode time to ``decode_short_side``, by many decode cursors per
    dataloader worker, placed far apart in the videos afresh each epoch; a batch holds one clip of each of
    ``batch_size`` different cursors, so its clips are spread over the videos like independent uniform draws (the
    official loader's batches), and clips are multi-cropped on tensors. Every frame is a clip start and each start is
    used at most once per epoch (all but fewer than ranks x workers x batch_size), sharded over (DDP rank x dataloader
    worker); the order is a function of ``seed`` and the epoch. The position within an epoch is saved in checkpoints,
    so ``fit --ckpt_path`` continues with the same clips, or, on other processes, workers or batch size with the same
    global batch, with the clips not yet taken (:mod:`~dora_lightning.data.position`). See docs/data.md.

    Args:
        paths: a video file, a folder (searched recursively, e.g. one folder per Walking Tours city), a glob, or a list.
        clip_length: frames per clip (T; the paper uses 8).
        frame_stride: frames between consecutive frames of a clip (60 in the paper: 1 s at 60 fps).
        frame_rate: count every video's frames at this rate, as a player showing it at this rate would (a 30 fps
            file read at 60 shows each frame twice, a 120 fps file every other frame), so ``frame_stride`` is the
            same time in every file; None: each file at its own rate (mixed rates then mean mixed strides in time).
        decode_short_side: scale frames at decode time so the short side is this many pixels (None: native size).
        batch_size: clips per batch per process.
        num_workers: dataloader worker processes per process (0 decodes in the main process).
        cursors: decode cursors per worker, each with one open container and about span / start_step decoded frames
            in memory (span = (clip_length - 1) x frame_stride + 1); at least batch_size; None: 2 x batch_size, so
            consecutive batches of a worker come from different cursors.
        start_step: a cursor takes every start_step-th clip start of its stretch (an epoch still uses every start:
            the other cursors take the rest); must divide frame_stride. Decoded frames per clip are about
            start_step + cursors x ranks x workers x (span + GOP / 2) / (clip starts of all videos); memory per
            cursor falls as 1 / start_step. None: the largest divisor of frame_stride up to 4 (4 for the paper's 60).
        compact_frames: keep each cursor's decoded frames as scaled YUV 4:2:0 (1.5 bytes a pixel instead of RGBA's 4)
            and convert a frame each time a clip uses it: 3/8 of the frame memory for ~0.4 ms of CPU per frame of a
            clip at 568x320 (see docs/data.md).
        seed: seed of the cursor placement, the clip order and the augmentations.
        transform: multi-crop augmentation applied to each clip.
        max_decode_retries: consecutive decode errors tolerated in one stretch before the rest of it is skipped.
        decode_threads: FFmpeg decoding threads per worker (0: FFmpeg's choice).
        pin_memory: pin batches for faster host-to-GPU copies.
        index_cache: folder of the per-file frame indexes (built by demuxing each video once, reused while its path,
            size and mtime are unchanged); None: ``$XDG_CACHE_HOME/dora_lightning/video_index`` (``~/.cache/...``).
            An unwritable folder only means the indexes are rebuilt at each start.
        augment_on: where the views are made. ``"cpu"``: the loader workers run ``transform`` and hand over uint8
            views. ``"gpu"``: the workers decode the clips and draw their random view plans only, and hand over the
            frames (uint8, padded to the largest decode size) and plans; all views of a batch are rendered on the
            training device after the transfer (:mod:`dora_lightning.data.augment.device`: roi_align crops and the
            ``"fused"`` colour map for the CPU-only ``"compiled"`` backend). ``"auto"``: gpu when the trainer's
            accelerator is CUDA, else cpu (resolved in :meth:`setup`; see docs/data.md, "Augmentation on the GPU").
    """

    def __init__(
        self,
        paths: str | list[str] = DEFAULT_VIDEO,
        clip_length: int = 8,
        frame_stride: int = 60,
        frame_rate: float | None = None,
        decode_short_side: int | None = 320,
        batch_size: int = 6,
        num_workers: int = 4,
        cursors: int | None = None,
        start_step: int | None = None,
        compact_frames: bool = False,
        seed: int = 0,
        transform: ClipMultiCrop | None = None,
        max_decode_retries: int = 3,
        decode_threads: int = 1,
        pin_memory: bool = True,
        index_cache: str | None = None,
        augment_on: Literal["cpu", "gpu", "auto"] = "auto",
    ) -> None:
        super().__init__()
        self.spec = ClipSpec(clip_length, frame_stride)
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("max_decode_retries", max_decode_retries, 0),
            ("decode_threads", decode_threads, 0),
        ):
            if value < low:
                raise ValueError(f"data.{name} must be >= {low}, got {value}")
        if start_step is None:
            start_step = max(d for d in range(1, 5) if frame_stride % d == 0)
        if start_step < 1:
            raise ValueError(f"data.start_step must be >= 1 or null, got {start_step}")
        if frame_stride % start_step:
            raise ValueError(
                f"data.start_step must divide data.frame_stride={frame_stride}, got {start_step}"
            )
        if cursors is not None and cursors < batch_size:
            raise ValueError(f"data.cursors must be >= data.batch_size={batch_size} (or null), got {cursors}")
        if augment_on not in AUGMENT_ON:
            raise ValueError(f"data.augment_on must be one of {AUGMENT_ON}, got {augment_on!r}")
        if frame_rate is not None and not 0 < frame_rate <= 1000:
            raise ValueError(
                f"data.frame_rate must be in (0, 1000] frames per second or null, got {frame_rate}"
            )
        if decode_short_side is not None and decode_short_side < 16:
            raise ValueError(f"data.decode_short_side must be >= 16 or null, got {decode_short_side}")
        self.paths = paths
        self.frame_rate = None if frame_rate is None else Fraction(str(frame_rate))
        self.index_cache = index_cache
        self.decode_short_side = decode_short_side
        self.batch_size, self.num_workers = batch_size, num_workers
        self.cursors = cursors_per_worker(cursors, batch_size)
        self.start_step, self.compact_frames = start_step, compact_frames
        self.seed = seed
        self.transform = transform if transform is not None else ClipMultiCrop()
        self.max_decode_retries, self.decode_threads, self.pin_memory = (
            max_decode_retries,
            decode_threads,
            pin_memory,
        )
        self.augment_on = augment_on
        self.device_augment: DeviceAugment | None = None  # set in setup when the views are made on the device
        self.videos: list[VideoInfo] = []
        self.dataset: VideoClipStream | None = None

    @property
    def clip_length(self) -> int:
        return self.spec.clip_length

    def resolved_augment_on(self) -> Literal["cpu", "gpu"]:
        """Where the views are made: ``augment_on``, with ``"auto"`` resolved from the trainer's accelerator (gpu for
        CUDA; cpu without a trainer)."""
        if self.augment_on != "auto":
            return self.augment_on
        from lightning.pytorch.accelerators import CUDAAccelerator

        accelerator = getattr(self.trainer, "accelerator", None)
        return "gpu" if isinstance(accelerator, CUDAAccelerator) else "cpu"

    def _stream_transform(self) -> ClipMultiCrop | FramesAndPlan:
        """What the workers run: the transform (augment_on cpu), or the plan drawer that hands over the frames padded
        to the largest decode size of the videos (gpu; sets :attr:`device_augment`)."""
        if self.resolved_augment_on() == "cpu":
            self.device_augment = None
            return self.transform
        sizes = [video.decode_size(self.decode_short_side) for video in self.videos]
        canvas = (max(height for _, height in sizes), max(width for width, _ in sizes))
        self.device_augment = DeviceAugment(self.transform)
        return FramesAndPlan(self.transform, canvas)

    def prepare_data(self) -> None:
        """Index the videos once per machine before the processes set up (Lightning runs this in one process per
        node, then lets the others start): with N GPUs the N processes would otherwise each demux every file, N
        reads of the whole data set, at the same time. The indexes land in ``index_cache``; :meth:`setup` reads them
        back and reports what it finds (this pass keeps its warnings to itself)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._probe_videos()

    def _probe_videos(self) -> list[VideoInfo]:
        return probe_videos(
            resolve_video_paths(self.paths),
            min_frames=self.spec.span,
            index_cache=self.index_cache,
            frame_rate=self.frame_rate,
        )

    def setup(self, stage: str | None = None) -> None:
        """Find and probe the videos (skipping unusable ones with a warning), resolve ``augment_on`` and build the
        clip stream."""
        if self.dataset is not None:
            return
        self.videos = self._probe_videos()
        self._refuse_videos_other_processes_do_not_see()
        if self._saved_identity is not None:
            self.check_same_data(self._saved_identity)
        rank, world = self._rank_and_world()
        self.dataset = VideoClipStream(
            self.videos,
            self.spec,
            self._stream_transform(),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            rank=rank,
            world_size=world,
            cursors=self.cursors,
            start_step=self.start_step,
            seed=self.seed,
            decode_short_side=self.decode_short_side,
            max_decode_retries=self.max_decode_retries,
            decode_threads=self.decode_threads,
            compact_frames=self.compact_frames,
        )
        if self.dataset.clips_per_worker == 0:
            total = sum(self.dataset.num_starts)
            raise ValueError(
                f"the videos give {total} clip starts, not enough for one batch of data.batch_size={self.batch_size} "
                f"per worker over {self.dataset.num_shards} (ranks x workers); lower data.batch_size, data.num_workers, "
                "data.frame_stride or data.clip_length, or add videos"
            )

    def _refuse_videos_other_processes_do_not_see(self) -> None:
        """Every process finds and indexes the videos itself (on its own node's file system): if they do not find
        the same ones (a node without the files, a file still being copied, a read that failed on one node), their
        shards and epoch lengths differ, clips are taken twice or never, and a run hangs at an epoch's end."""
        if self.trainer is None:
            return
        found = [
            [*name_and_size, video.num_frames]
            for name_and_size, video in zip(self.identity()["videos"], self.videos, strict=True)
        ]
        zero = process_zero_value_if_any_differs(getattr(self.trainer, "strategy", None), found)
        if zero is not None:
            raise ValueError(
                f"data.paths: the processes of this run do not find the same videos: process 0 has {_brief(zero)}, "
                f"process {self.trainer.global_rank} {_brief(found)}; every node must see the same files at the same "
                "paths (a shared file system or identical copies, none still being written)"
            )

    def train_dataloader(self) -> ClipLoader:
        """Batches of ``{"global_views": [...], "local_views": [...], "video", "start", "clip_index",
        "decoded_frames"}``; ``clip_index`` is an int64 (B, 2) tensor of (video index, first frame) per clip. With
        augment_on gpu, ``"frames"`` and ``"plan_*"`` instead of the views: :meth:`on_before_batch_transfer`, the move
        to the device and :meth:`on_after_batch_transfer` turn them into the views (as Lightning does)."""
        if self.dataset is None:
            self.setup("fit")
        if self.num_workers > 0 and self.device_augment is None:
            # compile the augmentation kernels once here, for each decode size: the forked workers inherit them
            sizes = {video.decode_size(self.decode_short_side) for video in self.dataset.videos}
            for width, height in sorted(sizes)[:4]:
                self.transform.warm_up(self.dataset.spec.clip_length, height, width)
        return ClipLoader(
            self.dataset,
            self._position,
            on_first_batch=self._resume_started,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            drop_last=True,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=False,
            # the loader draws its workers' base seed at each iteration; from its own generator, so that the global
            # RNG (drop path) is the same after a resume at an epoch's start as in an uninterrupted run (the clips and
            # their augmentations do not depend on it: they are seeded by data.seed, the epoch and the clip)
            generator=torch.Generator().manual_seed(self.seed),
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """augment_on gpu: keep the batch's view plans on the CPU (their decisions steer the rendering)."""
        if self.device_augment is None or not isinstance(batch, dict):
            return batch
        return self.device_augment.prepare(batch)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Normalise the views on the training device: the workers hand over uint8 views (4x fewer bytes to copy
        between processes and to the GPU than float32); see ``ClipMultiCrop(output_dtype=...)``. augment_on gpu:
        render the views of the batch's frames and plans here (:class:`DeviceAugment`), in the same format."""
        if self.device_augment is not None and isinstance(batch, dict) and "frames" in batch:
            return self.device_augment(batch)
        if not isinstance(batch, dict) or "global_views" not in batch:
            return batch
        normalize = self.transform.normalize
        return {
            **batch,
            "global_views": [normalize(v) for v in batch["global_views"]],
            "local_views": [normalize(v) for v in batch["local_views"]],
        }


def _brief(found: list[list[Any]]) -> str:
    """'3 videos, 10,800 frames in all (a.mp4, b.mp4, c.mp4)' of [name, size, frames] rows."""
    names = ", ".join(str(row[0]) for row in found[:3]) + (", ..." if len(found) > 3 else "")
    frames = sum(int(row[2]) for row in found)
    return f"{len(found)} video{'s' * (len(found) != 1)}, {frames:,} frames in all ({names})"
