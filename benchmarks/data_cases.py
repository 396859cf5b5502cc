"""bench_data.py's cases: the child side (build one DataLoader, warm up, time its clips) and the parent side (run a
case in a fresh interpreter while sampling its process tree's memory and the machine's CPU load, rerunning it when
other processes disturbed it)."""

from __future__ import annotations

import gc
import os
import resource
import threading
import time
from pathlib import Path

from benchmarks.common import CpuSample, cpu_cores_between, read_proc_kib, run_child_case, wait_for_quiet

BUSY_CORES = 0.3  # other processes using more than this (in cores) during a case make its timing suspect


# ---------------------------------------------------------------------------------------------------------------
# Child side: one case in its own process
# ---------------------------------------------------------------------------------------------------------------


def _build_loader(case: dict):
    """The case's DataLoader and what the training process does to each batch before the model sees it."""
    if case["loader"] == "official":
        from benchmarks.official_loader import official_dataloader

        loader = official_dataloader(
            case["video"],
            num_frames=case["clip_length"],
            step=case["stride"],
            batch_size=case["batch_size"],
            num_workers=case["workers"],
            seed=case["seed"],
            num_local_crops=case["local_crops"],
        )
        return loader, lambda batch: batch  # float views, normalised in the workers
    from dora_lightning.data.augment.multicrop import ClipMultiCrop
    from dora_lightning.data.datamodule import VideoClipDataModule

    dm = VideoClipDataModule(
        paths=case["video"],
        clip_length=case["clip_length"],
        frame_stride=case["stride"],
        decode_short_side=case["decode_short_side"],
        batch_size=case["batch_size"],
        num_workers=case["workers"],
        seed=case["seed"],
        transform=ClipMultiCrop(
            global_size=224, local_size=112, num_local_crops=case["local_crops"], pre_crop_size=300
        ),
    )
    dm.setup("fit")
    if not case.get("normalize_on_cpu"):
        # uint8 views, as a GPU training process receives them (its normalisation is one kernel on the GPU)
        return dm.train_dataloader(), lambda batch: batch
    # the training device is this CPU: normalise in the main process, on one thread (the workers have the cores)
    import torch

    torch.set_num_threads(1)
    return dm.train_dataloader(), lambda batch: dm.on_after_batch_transfer(batch, 0)


def _endless(loader, epochs: list[int]):
    """Batches of ``loader``, starting a new epoch (a new iterator) whenever one ends; counts epochs in ``epochs[0]``."""
    while True:
        epochs[0] += 1
        yield from loader


def run_case(case: dict) -> dict:
    """Build the case's DataLoader, warm up, time ``case['clips']`` clips. Runs inside the case's own process."""
    import torch

    t_start = time.perf_counter()
    loader, prepare = _build_loader(case)
    t_built = time.perf_counter()
    bs = case["batch_size"]
    epochs = [0]
    stream = _endless(loader, epochs)

    def summarize(batch: dict) -> tuple[int, int, float, float]:
        batch = prepare(batch)
        n = int(batch["global_views"][0].shape[0])
        assert n == bs, (n, bs)
        g, loc = batch["global_views"][0], batch["local_views"]
        assert g.shape[1:] == (case["clip_length"], 3, 224, 224), g.shape
        expected = torch.float32 if case["loader"] == "official" or case["normalize_on_cpu"] else torch.uint8
        assert g.dtype == expected, (g.dtype, expected)
        assert len(loc) == case["local_crops"] and loc[0].shape[1:] == (case["clip_length"], 3, 112, 112)
        dec = int(torch.as_tensor(batch["decoded_frames"]).sum())
        dsec = float(torch.as_tensor(batch["decode_seconds"]).sum()) if "decode_seconds" in batch else 0.0
        asec = float(torch.as_tensor(batch["augment_seconds"]).sum()) if "augment_seconds" in batch else 0.0
        return n, dec, dsec, asec

    warm_clips = warm_decoded = 0
    for _ in range(case["warmup_batches"]):
        n, dec, _, _ = summarize(next(stream))
        warm_clips += n
        warm_decoded += dec
    t_warm = time.perf_counter()
    clips = decoded = 0
    dsec = asec = 0.0
    while clips < case["clips"]:
        n, dec, ds, as_ = summarize(next(stream))
        clips += n
        decoded += dec
        dsec += ds
        asec += as_
    t_end = time.perf_counter()
    stream.close()  # drops the DataLoader iterator: its workers are shut down and joined before the rusage readout
    del stream, loader
    gc.collect()
    wall = t_end - t_warm
    self_ru = resource.getrusage(resource.RUSAGE_SELF)
    child_ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = {
        "clips": clips,
        "seconds": round(wall, 3),
        "clips_per_s": round(clips / wall, 3),
        "decoded_frames": decoded,
        "decoded_per_clip": round(decoded / clips, 3),
        "warmup_clips": warm_clips,
        "decoded_per_clip_incl_warmup": round((decoded + warm_decoded) / (clips + warm_clips), 3),
        "setup_seconds": round(t_built - t_start, 3),
        "warmup_seconds": round(t_warm - t_built, 3),
        "epochs_started": epochs[0],
        "maxrss_main_mb": round(self_ru.ru_maxrss / 1024, 1),
        "maxrss_largest_worker_mb": round(child_ru.ru_maxrss / 1024, 1),
    }
    if case["loader"] == "official":
        result["worker_decode_s_per_clip"] = round(dsec / clips, 3)
        result["worker_augment_s_per_clip"] = round(asec / clips, 3)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Parent side: process-tree memory sampling and CPU accounting
# ---------------------------------------------------------------------------------------------------------------


def _tree_pids(root: int) -> list[int]:
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return pids


class TreeMemorySampler(threading.Thread):
    """Max over time of the summed VmRSS (every ``rss_interval`` s) and summed PSS (every ``pss_interval`` s)."""

    def __init__(self, root: int, rss_interval: float = 0.05, pss_interval: float = 1.0):
        super().__init__(daemon=True)
        self.root, self.rss_interval, self.pss_interval = root, rss_interval, pss_interval
        self.peak_rss_kb = self.peak_pss_kb = self.max_processes = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        next_pss = 0.0
        while not self._stop_event.is_set():
            pids = _tree_pids(self.root)
            self.max_processes = max(self.max_processes, len(pids))
            self.peak_rss_kb = max(
                self.peak_rss_kb, sum(read_proc_kib(f"/proc/{p}/status", "VmRSS:") for p in pids)
            )
            now = time.monotonic()
            if now >= next_pss:
                self.peak_pss_kb = max(
                    self.peak_pss_kb, sum(read_proc_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
                )
                next_pss = now + self.pss_interval
            self._stop_event.wait(self.rss_interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def __enter__(self) -> TreeMemorySampler:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def run_case_in_subprocess(script: Path, case: dict, timeout: float) -> dict:
    """Run one case through ``script`` in a fresh interpreter (clean memory baseline) while sampling its process
    tree."""
    samplers: list[TreeMemorySampler] = []

    def monitor(pid: int) -> TreeMemorySampler:
        samplers.append(TreeMemorySampler(pid))
        return samplers[-1]

    start = CpuSample.now(include_children=True)
    result = run_child_case(script, case, case["name"], timeout, monitor=monitor)
    end = CpuSample.now(include_children=True)
    own, other = cpu_cores_between(start, end)
    (sampler,) = samplers
    result.update(
        peak_rss_mb=round(sampler.peak_rss_kb / 1024, 1),
        peak_pss_mb=round(sampler.peak_pss_kb / 1024, 1),
        processes=sampler.max_processes,
        case_wall_seconds=round(end.wall - start.wall, 1),
        own_cpu_cores=round(own, 2),
        other_cpu_cores=round(other, 2),
    )
    return result


def measure_case(script: Path, case: dict, quiet_wait: float, busy_retries: int, timeout: float) -> dict:
    """Run ``case`` after waiting (up to ``quiet_wait`` s) for quiet CPUs; rerun it (up to ``busy_retries`` times)
    while other processes used more than BUSY_CORES during it, and keep the least disturbed run."""
    r = None
    for attempt in range(1 + max(0, busy_retries)):
        waited, load = wait_for_quiet(quiet_wait, BUSY_CORES, include_children=True)
        if load is not None and load > BUSY_CORES:
            print(
                f"   warning: other processes use {load:.2f} cores; timings will be pessimistic",
                flush=True,
            )
        attempt_result = run_case_in_subprocess(script, case, timeout=timeout)
        attempt_result.update(waited_for_quiet_s=waited, other_cpu_cores_before=load, attempts=attempt + 1)
        if r is None or attempt_result["other_cpu_cores"] < r["other_cpu_cores"]:
            r = attempt_result
        if r["other_cpu_cores"] <= BUSY_CORES:
            break
        print(
            f"   other processes used {attempt_result['other_cpu_cores']:.2f} cores during the case "
            f"({attempt_result['clips_per_s']:.2f} clips/s)",
            flush=True,
        )
    return r
