"""collate_clips: default_collate's batches, in one storage per batch (one shared-memory file from a worker)."""

from __future__ import annotations

import io
import multiprocessing.reduction
import time
from itertools import islice

import numpy as np
import pytest
import torch
import torch.multiprocessing  # noqa: F401  (registers torch's pickling of shared tensors)
from conftest import BUNDLED_VIDEO
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate, get_worker_info

import dora_lightning.data.collate as collate_module
from dora_lightning.data.augment.multicrop import ClipMultiCrop
from dora_lightning.data.collate import BLOCK_FIELD, RecycledBlocks, collate_clips
from dora_lightning.data.datamodule import VideoClipDataModule
from dora_lightning.data.loader import ClipLoader


def sample(seed: int, locals_: int = 3, dtype: torch.dtype = torch.uint8) -> dict:
    g = torch.Generator().manual_seed(seed)

    def view(size: int) -> torch.Tensor:
        if dtype == torch.uint8:
            return torch.randint(0, 256, (4, 3, size, size), generator=g, dtype=torch.uint8)
        return torch.randn(4, 3, size, size, generator=g, dtype=dtype)

    return {
        "global_views": [view(16)],
        "local_views": [view(8) for _ in range(locals_)],
        "video": seed % 2,
        "start": 100 + seed,
        "decoded_frames": seed * 3,
        "score": 0.5 * seed,
        "flag": seed % 2 == 0,
    }


def assert_same_batch(ours: dict, reference: dict) -> None:
    assert list(ours) == list(reference)
    for key, value in reference.items():
        got = ours[key]
        if isinstance(value, torch.Tensor):
            assert got.dtype == value.dtype and torch.equal(got, value), key
        else:
            assert isinstance(got, list) and len(got) == len(value), key
            for a, b in zip(got, value, strict=True):
                assert a.dtype == b.dtype and torch.equal(a, b), key


def storages(batch: dict) -> set[int]:
    tensors = [v for v in batch.values() if isinstance(v, torch.Tensor)]
    tensors += [t for v in batch.values() if isinstance(v, list) for t in v]
    return {t.untyped_storage().data_ptr() for t in tensors}


@pytest.mark.parametrize("locals_,dtype", [(3, torch.uint8), (0, torch.uint8), (2, torch.float32)])
def test_same_batch_as_default_collate_in_one_storage(locals_, dtype):
    samples = [sample(seed, locals_, dtype) for seed in range(5)]
    batch = collate_clips(samples)
    assert_same_batch(batch, default_collate(samples))
    assert len(storages(batch)) == 1
    assert not batch["start"].untyped_storage().is_shared()  # in the main process: private memory


def test_fields_start_aligned_and_do_not_overlap():
    batch = collate_clips([sample(seed) for seed in range(3)])
    tensors = [
        batch["global_views"][0],
        *batch["local_views"],
        batch["video"],
        batch["start"],
        batch["score"],
    ]
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors)
    assert all(start % collate_module.ALIGNMENT == 0 for start, _ in spans)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:], strict=False))


def test_other_fields_go_through_default_collate():
    samples = [{"frames": torch.zeros(2, 3), "path": f"v{i}.mp4"} for i in range(3)]
    batch = collate_clips(samples)
    assert batch["path"] == ["v0.mp4", "v1.mp4", "v2.mp4"] and batch["frames"].shape == (3, 2, 3)


def test_in_a_worker_the_batch_is_one_shared_file(monkeypatch):
    monkeypatch.setattr(collate_module, "get_worker_info", lambda: object())
    batch = collate_clips([sample(seed) for seed in range(3)])
    assert batch["global_views"][0].untyped_storage().is_shared()
    duplicated = []
    original = multiprocessing.reduction.DupFd
    monkeypatch.setattr(multiprocessing.reduction, "DupFd", lambda fd: duplicated.append(fd) or original(fd))
    multiprocessing.reduction.ForkingPickler(io.BytesIO()).dump(batch)
    assert len(duplicated) == 1  # default_collate's batch: one file per tensor (9 here)


@pytest.mark.parametrize(
    "samples,message",
    [
        ([], "empty list"),
        ([{"a": torch.zeros(2)}, {"b": torch.zeros(2)}], "different fields"),
        ([{"a": torch.zeros(2)}, {"a": torch.zeros(3)}], "field 'a'"),
        ([{"a": torch.zeros(2)}, {"a": torch.zeros(2, dtype=torch.int64)}], "field 'a'"),
        ([{"v": [torch.zeros(2)]}, {"v": [torch.zeros(2), torch.zeros(2)]}], "field 'v'"),
        ([{"v": [torch.zeros(2)]}, {"v": [torch.zeros(3)]}], r"field 'v\[0\]'"),
        ([{"v": torch.zeros(2)}, {"v": 3}], "field 'v'"),
    ],
)
def test_unbatchable_samples_name_the_field(samples, message):
    with pytest.raises(ValueError, match=message):
        collate_clips(samples)


class Samples(Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> dict:
        return sample(index)


def test_worker_batches_equal_the_main_process_batches():
    reference = list(DataLoader(Samples(), batch_size=3, collate_fn=default_collate))
    loaded = list(DataLoader(Samples(), batch_size=3, num_workers=2, collate_fn=collate_clips))
    for ours, theirs in zip(loaded, reference, strict=True):
        assert_same_batch(ours, theirs)
        assert len(storages(ours)) == 1


def test_the_data_module_batches_through_it():
    dm = VideoClipDataModule(
        paths=str(BUNDLED_VIDEO),
        clip_length=4,
        frame_stride=10,
        decode_short_side=64,
        batch_size=3,
        num_workers=2,
        transform=ClipMultiCrop(global_size=32, local_size=16, num_local_crops=2, pre_crop_size=48),
    )
    loader = dm.train_dataloader()
    batches = list(islice(loader, 4))
    assert all(len(storages(batch)) == 1 for batch in batches)
    assert batches[0]["global_views"][0].shape == (3, 4, 3, 32, 32)
    dm._iterations = 0  # the same epoch again, through fresh blocks
    plain = ClipLoader(
        dm.dataset, dm._position, recycle_blocks=False, batch_size=3, num_workers=2, drop_last=True
    )
    for batch, reference in zip(batches, islice(plain, 4), strict=True):
        assert_same_batch(batch, reference)


class Numbered(IterableDataset):
    """Each worker yields samples whose every value identifies (worker, index), ``delay`` seconds apart (a worker
    slower than the training loop, as in real training: the blocks freed by the loop are back before its next
    collate)."""

    def __init__(self, per_worker: int = 40, delay: float = 0.0) -> None:
        self.per_worker, self.delay = per_worker, delay

    def __iter__(self):
        worker = get_worker_info().id
        for index in range(self.per_worker):
            time.sleep(self.delay)
            value = (worker * 100 + index) % 251
            yield {
                "global_views": [torch.full((2, 3, 8, 8), value, dtype=torch.uint8)],
                "local_views": [torch.full((2, 3, 4, 4), 255 - value, dtype=torch.uint8)],
                "start": worker * 1000 + index,
            }


def recycled(hold, per_worker: int = 40, blocks_per_worker: int = 4, delay: float = 0.01):
    """Iterate a 2-worker loader through RecycledBlocks; ``hold(step, batch)`` says whether to keep the batch until the
    end (True) or drop it at the next step. Returns the blocks, the kept batches and copies made on receipt."""
    blocks = RecycledBlocks(2, blocks_per_worker=blocks_per_worker)
    loader = DataLoader(Numbered(per_worker, delay), batch_size=2, num_workers=2, collate_fn=blocks.collate)
    kept, copies = [], []
    for step, batch in enumerate(blocks.batches(iter(loader))):
        assert BLOCK_FIELD not in batch and list(batch) == ["global_views", "local_views", "start"]
        if hold(step, batch):
            kept.append(batch)
            copies.append(
                {k: [t.clone() for t in v] if isinstance(v, list) else v.clone() for k, v in batch.items()}
            )
    return blocks, kept, copies


def test_recycled_blocks_are_reused_and_held_batches_never_overwritten():
    blocks, kept, copies = recycled(lambda step, batch: step % 7 == 0)
    assert blocks.reused > 0  # the blocks of dropped batches went back to the workers
    assert len(kept) == 6
    for batch, copy in zip(kept, copies, strict=True):
        assert_same_batch(batch, copy)


def test_no_block_is_reused_while_the_training_process_holds_every_batch():
    blocks, kept, copies = recycled(lambda step, batch: True, delay=0.0)
    assert blocks.reused == 0 and len(kept) == 40
    for batch, copy in zip(kept, copies, strict=True):
        assert_same_batch(batch, copy)
        start = batch["start"]
        value = ((start // 1000) * 100 + start % 1000) % 251
        assert torch.equal(batch["global_views"][0][:, 0, 0, 0, 0].long(), value)


def test_recycled_batches_equal_plain_batches():
    plain = list(DataLoader(Numbered(), batch_size=2, num_workers=2, collate_fn=collate_clips))
    blocks, kept, _ = recycled(lambda step, batch: step % 3 == 0)
    assert blocks.reused > 0
    for batch, reference in zip(kept, plain[::3], strict=True):
        assert_same_batch(batch, reference)


def test_recycled_blocks_need_workers():
    with pytest.raises(ValueError, match="num_workers >= 1"):
        RecycledBlocks(0)


class NumberedStream(Numbered):
    """Numbered with the position hook ClipLoader calls and the number of processes it reads."""

    world_size = 1

    def set_position(self, epoch: int, batches_done: int = 0) -> None:
        self.position = (epoch, batches_done)


def test_spawned_workers_recycle_with_the_loaders_context():
    """With the spawn start method (macOS's default) the blocks' queues must come from the loader's context (a
    fork-context lock cannot be sent to a spawned worker)."""
    plain = list(DataLoader(Numbered(12), batch_size=2, num_workers=2, collate_fn=collate_clips))
    loader = ClipLoader(
        NumberedStream(12), lambda: (0, 0), batch_size=2, num_workers=2, multiprocessing_context="spawn"
    )
    batches = list(loader)
    assert len(batches) == len(plain) == 12
    for batch, reference in zip(batches, plain, strict=True):
        assert_same_batch(batch, reference)


class WithArrays(IterableDataset):
    """Samples whose first field is a numpy array: default_collate batches it into a storage of its own."""

    def __iter__(self):
        worker = get_worker_info().id
        for index in range(30):
            time.sleep(0.01)
            value = (worker * 100 + index) % 251
            yield {"meta": np.full(3, value), "views": torch.full((2, 3, 8, 8), value, dtype=torch.uint8)}


def test_a_block_is_tracked_by_its_own_tensors():
    """Keeping only the views (dropping the field default_collate made) must still keep their block from reuse."""
    blocks = RecycledBlocks(2, blocks_per_worker=2)
    loader = DataLoader(WithArrays(), batch_size=2, num_workers=2, collate_fn=blocks.collate)
    kept = []
    for batch in blocks.batches(iter(loader)):
        assert batch["meta"].untyped_storage().data_ptr() != batch["views"].untyped_storage().data_ptr()
        kept.append((batch["views"], batch["meta"][:, 0].clone()))
    assert len(kept) == 30
    for views, values in kept:
        assert torch.equal(views[:, 0, 0, 0, 0].long(), values)


class Paths(IterableDataset):
    def __iter__(self):
        yield from ({"path": f"w{get_worker_info().id}_{i}.mp4"} for i in range(4))


def test_batches_without_tensors_pass_through_the_blocks():
    blocks = RecycledBlocks(2)
    loader = DataLoader(Paths(), batch_size=2, num_workers=2, collate_fn=blocks.collate)
    batches = list(blocks.batches(iter(loader)))
    assert sorted(path for batch in batches for path in batch["path"]) == sorted(
        f"w{w}_{i}.mp4" for w in range(2) for i in range(4)
    )
    assert all(list(batch) == ["path"] for batch in batches) and blocks.reused + blocks.written_new == 0


def test_clip_index_pairs_become_a_b_by_2_int64_tensor():
    samples = [
        {"clip_index": torch.tensor([v, s], dtype=torch.int64), "start": s}
        for v, s in [(0, 5), (1, 70), (0, 9)]
    ]
    batch = collate_clips(samples)
    assert batch["clip_index"].dtype == torch.int64 and batch["clip_index"].shape == (3, 2)
    assert batch["clip_index"].tolist() == [[0, 5], [1, 70], [0, 9]]
    assert batch["start"].tolist() == [5, 70, 9]
