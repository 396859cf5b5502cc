"""Augmentation on the training device (data.augment_on=gpu): draw / render split of ClipMultiCrop, the batched
renderer (dora_lightning/data/augment/device.py) against the CPU path, padding, seeds and the data module wiring."""

from __future__ import annotations

from itertools import islice
from types import SimpleNamespace

import pytest
import torch
from conftest import BUNDLED_VIDEO, write_video
from copy_watch import CopyWatch
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

from dora_lightning.data.augment.colour_views import NUM_DRAWS
from dora_lightning.data.augment.device import HOST_PLAN, DeviceAugment
from dora_lightning.data.augment.multicrop import ClipMultiCrop
from dora_lightning.data.augment.multicrop_args import per_image
from dora_lightning.data.augment.plan import FramesAndPlan, ViewPlan
from dora_lightning.data.collate import collate_clips
from dora_lightning.data.datamodule import VideoClipDataModule

LEVEL = 1.0 / (255.0 * 0.224)  # one 8-bit level after the normalisation (the smallest std is 0.224)


def small(recipe: str = "dora", **kw) -> ClipMultiCrop:
    base = dict(global_size=32, local_size=16, num_local_crops=3, pre_crop_size=48, recipe=recipe)
    extra = {"num_global_crops": 2} if recipe == "dino" else {}
    return ClipMultiCrop(**(base | extra | kw))


def clip(seed: int, T: int, height: int, width: int, channels: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (T, height, width, channels), dtype=torch.uint8, generator=g)


class _DecodedAs(ClipMultiCrop):
    """A ClipMultiCrop that asks for frames in a given pixel format."""

    def __init__(self, frame_format: str, **kw) -> None:
        super().__init__(**kw)
        self._format = frame_format

    @property
    def frame_format(self) -> str:
        return self._format


def cpu_reference(t: ClipMultiCrop) -> ClipMultiCrop:
    """The CPU path the device renderer equals: roi_align crops and the device colour backend, on frames decoded as
    ``t`` has them decoded (the gpu path decodes in the transform's format)."""
    colour = "fused" if t.colour_backend == "compiled" else t.colour_backend
    names = (
        "global_blur_prob global_solarize_prob local_flip_prob output_dtype recipe num_global_crops".split()
    )
    kw = {k: getattr(t, k) for k in names} | dict(
        global_size=32, local_size=16, num_local_crops=3, pre_crop_size=48
    )
    return _DecodedAs(t.frame_format, crop_backend="roi_align", colour_backend=colour, **kw)


def assert_views_close(expected: torch.Tensor, got: torch.Tensor) -> None:
    """Equal up to float rounding: within one 8-bit level, and all but 0.1 % of the values equal."""
    diff = (expected - got).abs()
    assert diff.max() <= LEVEL * 1.001
    assert (diff > 1e-5).float().mean() <= 1e-3


# -- draw + render is the transform ---------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["dora", "dino"])
def test_draw_makes_the_old_draws_in_the_old_order(recipe):
    """draw() consumes the generator exactly as __call__ did before the split: boxes, the jitter-op order, global
    and local colour uniforms, then the solarisation / local-flip uniforms; and nothing else."""
    t, T = small(recipe, local_flip_prob=0.5, global_solarize_prob=0.3), 3
    G, L = t.num_global_crops, t.num_local_crops
    for seed in range(3):
        plan = t.draw(T, 60, 80, torch.Generator().manual_seed(seed))
        g = torch.Generator().manual_seed(seed)
        boxes = t.sample_boxes(T, 60, 80, g)
        order = torch.randperm(4, generator=g)
        u_global, u_local = (
            torch.rand(G * T, NUM_DRAWS, generator=g),
            torch.rand(L * T, NUM_DRAWS, generator=g),
        )
        u_extra = torch.rand(G * T + L * T, generator=g)
        assert torch.equal(plan.pre_crop, boxes.pre_crop) and torch.equal(plan.global_flip, boxes.global_flip)
        assert torch.equal(plan.global_boxes, boxes.to_frame(boxes.global_boxes))
        assert torch.equal(plan.local_boxes, boxes.to_frame(boxes.local_boxes).view(L * T, 4))
        assert torch.equal(plan.colour_order, order)
        assert torch.equal(plan.u_global, u_global) and torch.equal(plan.u_local, u_local)
        assert torch.equal(plan.solarized, u_extra[: G * T] < per_image(t.global_solarize_prob, T))
        assert torch.equal(plan.local_flip, u_extra[G * T :] < t.local_flip_prob)
        assert torch.equal(plan.local_restore[plan.local_order], torch.arange(L * T))
        assert plan.frame_size.tolist() == [60, 80]
        # the generator is where the old __call__ left it
        assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=_after_draw(t, T, seed)))


def _after_draw(t: ClipMultiCrop, T: int, seed: int) -> torch.Generator:
    g = torch.Generator().manual_seed(seed)
    t.draw(T, 60, 80, g)
    return g


@pytest.mark.parametrize("recipe", ["dora", "dino"])
@pytest.mark.parametrize("crop_backend", ["interpolate", "roi_align"])
@pytest.mark.parametrize("colour_backend", ["compiled", "fused", "exact"])
def test_render_of_draw_is_the_call(recipe, crop_backend, colour_backend):
    t = small(recipe, crop_backend=crop_backend, colour_backend=colour_backend)
    for seed in range(3):
        frames = clip(seed, 3, 50, 41, 4 if t.frame_format == "rgba" else 3)
        views = t(frames, torch.Generator().manual_seed(seed))
        rendered = t.render(frames, t.draw(3, 50, 41, torch.Generator().manual_seed(seed)))
        for key in ("global_views", "local_views"):
            for a, b in zip(views[key], rendered[key], strict=True):
                assert torch.equal(a, b)


# -- the batched device renderer against the CPU path ------------------------------------------------------------


def render_batch(t: ClipMultiCrop, clips: list[torch.Tensor], seeds: list[int], canvas, pad_value: int = 0):
    """Views of ``clips`` through FramesAndPlan, collate_clips and DeviceAugment (prepare, then render)."""
    wrap = FramesAndPlan(t, canvas)
    samples = [wrap(list(c), torch.Generator().manual_seed(s)) for c, s in zip(clips, seeds, strict=True)]
    for c, sample in zip(clips, samples, strict=True):
        assert sample["frames"].shape == (len(c), *canvas, 3)
        sample["frames"][:, c.shape[1] :] = pad_value
        sample["frames"][:, :, c.shape[2] :] = pad_value
    augment = DeviceAugment(t)
    prepared = augment.prepare(collate_clips(samples))
    assert HOST_PLAN in prepared and not any(k.startswith("plan_") for k in prepared)
    return augment(prepared)


SIZES = [(60, 80), (50, 41), (70, 90), (48, 48)]


@pytest.mark.parametrize("recipe", ["dora", "dino"])
@pytest.mark.parametrize("colour_backend", ["compiled", "fused", "exact"])
@pytest.mark.parametrize("output_dtype", ["uint8", "float32"])
def test_device_render_equals_the_cpu_path(recipe, colour_backend, output_dtype):
    """Clips of different sizes in one batch: each clip's views are its CPU views (roi_align, device colour)."""
    t = small(recipe, colour_backend=colour_backend, output_dtype=output_dtype, local_flip_prob=0.5)
    clips = [clip(i, 4, h, w) for i, (h, w) in enumerate(SIZES)]
    seeds = [10, 11, 12, 13]
    batch = render_batch(t, clips, seeds, canvas=(70, 90))
    reference = cpu_reference(t)
    for i, (c, seed) in enumerate(zip(clips, seeds, strict=True)):
        expected = reference(c, torch.Generator().manual_seed(seed))
        for key in ("global_views", "local_views"):
            assert len(batch[key]) == len(expected[key])
            for view, ref in zip(batch[key], expected[key], strict=True):
                assert view.dtype == torch.float32 and view.shape[0] == len(clips)
                assert_views_close(reference.normalize(ref), view[i])


@pytest.mark.parametrize("pre_crop_size", [48, None])
def test_padding_never_enters_a_crop(pre_crop_size):
    """Whatever the padding holds, the views are the same; boxes touching the frames' edges included (no pre-crop:
    the whole frame is the region; scale up to 1: the global boxes cover it)."""
    t = small(pre_crop_size=pre_crop_size, global_scale=(0.9, 1.0), colour_backend="fused")
    clips = [clip(i, 2, h, w) for i, (h, w) in enumerate(SIZES)]
    seeds = list(range(len(clips)))
    zeros = render_batch(t, clips, seeds, canvas=(72, 96), pad_value=0)
    whites = render_batch(t, clips, seeds, canvas=(72, 96), pad_value=255)
    for key in ("global_views", "local_views"):
        for a, b in zip(zeros[key], whites[key], strict=True):
            assert torch.equal(a, b)


def test_an_unprepared_batch_renders_the_same():
    t = small(colour_backend="fused")
    clips, seeds = [clip(0, 2, 60, 80), clip(1, 2, 50, 41)], [3, 4]
    wrap = FramesAndPlan(t, (60, 80))
    batch = collate_clips(
        [wrap(list(c), torch.Generator().manual_seed(s)) for c, s in zip(clips, seeds, strict=True)]
    )
    augment = DeviceAugment(t)
    direct, prepared = augment(dict(batch)), augment(augment.prepare(dict(batch)))
    assert set(direct) == set(prepared) == {"global_views", "local_views"}
    for a, b in zip(direct["local_views"], prepared["local_views"], strict=True):
        assert torch.equal(a, b)


def test_a_clip_larger_than_the_canvas_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        FramesAndPlan(small(), (40, 40))(clip(0, 2, 48, 48), torch.Generator().manual_seed(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_render_matches_the_cpu_render():
    t = small(colour_backend="fused")
    clips, seeds = [clip(i, 4, h, w) for i, (h, w) in enumerate(SIZES)], [1, 2, 3, 4]
    wrap = FramesAndPlan(t, (70, 90))
    batch = collate_clips(
        [wrap(list(c), torch.Generator().manual_seed(s)) for c, s in zip(clips, seeds, strict=True)]
    )
    augment = DeviceAugment(t)
    on_cpu = augment(augment.prepare(dict(batch)))
    prepared = augment.prepare(dict(batch))
    on_cuda = augment({**prepared, "frames": prepared["frames"].cuda()})
    for a, b in zip(
        on_cpu["global_views"] + on_cpu["local_views"],
        on_cuda["global_views"] + on_cuda["local_views"],
        strict=True,
    ):
        assert b.is_cuda
        diff = (a - b.cpu()).abs()
        # float rounding (and TF32 convolutions, where cuDNN uses them for the blur) flips some 8-bit roundings
        assert diff.max() <= LEVEL * 1.001 and diff.mean() <= 0.1 * LEVEL


# -- through the data module ----------------------------------------------------------------------------------------


def module(paths, augment_on: str, transform: ClipMultiCrop, **kw) -> VideoClipDataModule:
    options = dict(
        clip_length=4, frame_stride=5, decode_short_side=48, batch_size=3, num_workers=0, start_step=5
    )
    return VideoClipDataModule(paths=paths, transform=transform, augment_on=augment_on, **(options | kw))


def ready_batches(dm: VideoClipDataModule, n: int) -> list[dict]:
    """``n`` batches as the training step gets them (the data module's hooks around the transfer, on the CPU)."""
    out = []
    for batch in islice(iter(dm.train_dataloader()), n):
        out.append(dm.on_after_batch_transfer(dm.on_before_batch_transfer(batch, 0), 0))
    return out


def assert_same_batches(expected: list[dict], got: list[dict], exact: bool) -> None:
    for a, b in zip(expected, got, strict=True):
        assert a.keys() == b.keys()
        for key in ("video", "start", "clip_index", "decoded_frames"):
            assert torch.equal(a[key], b[key])
        for key in ("global_views", "local_views"):
            assert len(a[key]) == len(b[key])
            for x, y in zip(a[key], b[key], strict=True):
                assert x.shape == y.shape and x.dtype == y.dtype == torch.float32
                assert torch.equal(x, y) if exact else assert_views_close(x, y) is None


@pytest.mark.parametrize("colour_backend", ["compiled", "fused", "exact"])
def test_gpu_path_gives_the_cpu_paths_views(colour_backend):
    """augment_on=gpu, forced and rendered on the CPU device, gives the views of augment_on=cpu with roi_align crops
    and the device colour backend ("fused" for "compiled"), clip for clip."""
    gpu = module(str(BUNDLED_VIDEO), "gpu", small(colour_backend=colour_backend))
    cpu = module(str(BUNDLED_VIDEO), "cpu", cpu_reference(small(colour_backend=colour_backend)))
    got, expected = ready_batches(gpu, 3), ready_batches(cpu, 3)
    assert gpu.device_augment is not None and cpu.device_augment is None
    assert gpu.dataset.pixel_format == cpu.dataset.pixel_format == gpu.transform.frame_format
    assert_same_batches(expected, got, exact=False)


def test_gpu_path_same_seed_same_views():
    first = ready_batches(module(str(BUNDLED_VIDEO), "gpu", small(), seed=5), 2)
    again = ready_batches(module(str(BUNDLED_VIDEO), "gpu", small(), seed=5), 2)
    other = ready_batches(module(str(BUNDLED_VIDEO), "gpu", small(), seed=6), 1)
    assert_same_batches(first, again, exact=True)
    assert not torch.equal(first[0]["global_views"][0], other[0]["global_views"][0])


def test_videos_of_two_sizes_share_a_batch(tmp_path):
    """Frames are padded to the largest decode size; every clip's views are its own video's CPU-path views."""
    write_video(tmp_path / "wide.mp4", 60, width=96, height=64)
    write_video(tmp_path / "tall.mp4", 60, width=48, height=80)
    kw = dict(decode_short_side=None, batch_size=4)
    gpu = module(str(tmp_path), "gpu", small(), **kw)
    cpu = module(str(tmp_path), "cpu", cpu_reference(small()), **kw)
    frames = next(iter(module(str(tmp_path), "gpu", small(), **kw).train_dataloader()))["frames"]
    assert frames.shape[2:] == (80, 96, 4)  # largest height and width; RGBA, as the default backends decode
    got, expected = ready_batches(gpu, 4), ready_batches(cpu, 4)
    assert any(len(set(batch["video"].tolist())) == 2 for batch in got)
    assert_same_batches(expected, got, exact=False)


def test_gpu_views_have_the_default_cpu_paths_statistics():
    """The default CPU path (interpolate crops of whole-pixel boxes, compiled colour rounded twice) and the GPU path
    (roi_align, fused colour) differ in resampling and rounding only (same decoded frames; the crop, flip and colour
    draws are the same draws): per-view means and standard deviations agree clip for clip (measured: means within
    0.35 / 0.95 8-bit levels on average for global / local views, overall means within 0.3 / 0.12 levels, standard
    deviations within 0.7 % / 1.9 %)."""
    gpu = ready_batches(module(str(BUNDLED_VIDEO), "gpu", small()), 6)
    cpu = ready_batches(module(str(BUNDLED_VIDEO), "cpu", small()), 6)
    for key in ("global_views", "local_views"):
        a = torch.stack([v for batch in cpu for v in batch[key]])  # (batches x views, B, T, 3, s, s)
        b = torch.stack([v for batch in gpu for v in batch[key]])
        mean_a, mean_b = a.mean(dim=(-3, -2, -1)), b.mean(dim=(-3, -2, -1))
        std_a, std_b = a.std(dim=(-3, -2, -1)), b.std(dim=(-3, -2, -1))
        assert (mean_a - mean_b).abs().mean() < 1.5 * LEVEL
        assert abs(float(mean_a.mean() - mean_b.mean())) < 0.75 * LEVEL
        assert (std_a - std_b).abs().mean() < 0.04 * std_a.mean()
        assert abs(float(std_a.mean() - std_b.mean())) < 0.01 * std_a.mean()


def test_augment_on_resolves_from_the_accelerator():
    dm = module(str(BUNDLED_VIDEO), "auto", small())
    assert dm.resolved_augment_on() == "cpu"  # no trainer
    dm.trainer = SimpleNamespace(accelerator=CUDAAccelerator())
    assert dm.resolved_augment_on() == "gpu"
    dm.trainer = SimpleNamespace(accelerator=CPUAccelerator())
    assert dm.resolved_augment_on() == "cpu"
    assert module(str(BUNDLED_VIDEO), "gpu", small()).resolved_augment_on() == "gpu"
    with pytest.raises(ValueError, match="augment_on"):
        module(str(BUNDLED_VIDEO), "tpu", small())


def test_plan_fields_round_trip():
    plan = small().draw(2, 40, 50, torch.Generator().manual_seed(0))
    fields = plan.to_fields()
    assert all(k.startswith("plan_") for k in fields)
    back = ViewPlan.from_fields(fields)
    assert all(torch.equal(getattr(plan, n), getattr(back, n)) for n in ViewPlan.names)
    with pytest.raises(KeyError, match="no view plan"):
        ViewPlan.from_fields({})


@pytest.mark.parametrize("recipe", ["dora", "dino"])
def test_fused_rendering_never_waits_for_the_device(recipe):
    """On the meta device (tensors without values) rendering runs through: it reads no value back from the device
    (which would wait for the device's queue); and every copy to the device is non-blocking."""
    t = small(recipe, local_flip_prob=0.5)
    wrap = FramesAndPlan(t, (70, 90))
    clips = [clip(i, 4, h, w) for i, (h, w) in enumerate(SIZES)]
    batch = collate_clips([wrap(list(c), torch.Generator().manual_seed(i)) for i, c in enumerate(clips)])
    augment = DeviceAugment(t)
    prepared = augment.prepare(batch)
    prepared["frames"] = prepared["frames"].to("meta")
    with CopyWatch() as watch:
        out = augment(prepared)
    assert all(v.device.type == "meta" for v in out["global_views"] + out["local_views"])
    assert watch.copies and all(
        src == "cpu" and dst == "meta" and non_blocking for src, dst, non_blocking in watch.copies
    )


def test_gpu_path_with_worker_processes():
    """Frames and plans cross from worker processes (shared-memory blocks) and render to the CPU path's views."""
    kw = dict(num_workers=2, batch_size=2)
    got = ready_batches(module(str(BUNDLED_VIDEO), "gpu", small(), **kw), 2)
    expected = ready_batches(module(str(BUNDLED_VIDEO), "cpu", cpu_reference(small()), **kw), 2)
    assert_same_batches(expected, got, exact=False)


def test_a_true_half_precision_trainer_leaves_the_plan_alone():
    """Lightning's ``bf16-true`` casts a batch's floating tensors before the transfer hooks: the plan's floats travel
    as bits, so the views are those of an untouched batch."""
    from lightning.pytorch.plugins.precision import HalfPrecision

    t = small(colour_backend="fused")
    wrap = FramesAndPlan(t, (70, 90))
    clips = [clip(i, 2, h, w) for i, (h, w) in enumerate(SIZES)]
    batch = collate_clips([wrap(list(c), torch.Generator().manual_seed(i)) for i, c in enumerate(clips)])
    assert not any(v.is_floating_point() for v in batch.values() if isinstance(v, torch.Tensor))
    augment = DeviceAugment(t)
    plain = augment(augment.prepare(dict(batch)))
    cast = augment(augment.prepare(HalfPrecision("bf16-true").convert_input(dict(batch))))
    for a, b in zip(
        plain["global_views"] + plain["local_views"], cast["global_views"] + cast["local_views"], strict=True
    ):
        assert torch.equal(a, b)
