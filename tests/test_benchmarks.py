"""Smoke runs of the benchmark scripts (tiny sizes): they run and report every field. Speed is never asserted here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO


@pytest.mark.slow
def test_bench_data_quick(tmp_path):
    out = tmp_path / "data.json"
    subprocess.run(
        [
            sys.executable,
            "benchmarks/bench_data.py",
            "--quick",
            "--skip-memory",
            "--quiet-wait",
            "0",
            "--cache-dir",
            str(tmp_path),
            "--out",
            str(out),
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    report = json.loads(out.read_text())
    assert report["machine"] and report["date_utc"]
    assert json.dumps(report).count("clips_per_s") >= 2


def test_bench_resume_layout_quick(tmp_path):
    """The resumed epoch takes no start twice; skipping batches of the new layout's own plans would."""
    out = tmp_path / "resume_layout.json"
    command = [sys.executable, "benchmarks/bench_resume_layout.py", "--quick", "--out", str(out)]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    report = json.loads(out.read_text())
    assert report["machine"] and set(report["cases"]) == {"10min/8gpu_to_4gpu", "10min/8workers_to_4"}
    for case in report["cases"].values():
        assert case["rest_of_the_epoch"]["taken_twice"] == 0
        assert case["rest_of_the_epoch"]["never_taken"] <= case["uninterrupted"]["never_taken"]
        assert case["skip_batches_of_new_plans"]["taken_twice"] > case["starts"] // 10


def test_bench_interlaced_quick(tmp_path):
    out = tmp_path / "interlaced.json"
    command = [sys.executable, "benchmarks/bench_interlaced.py", "--quick", "--out", str(out)]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    cases = json.loads(out.read_text())["ms_per_frame"]
    assert set(cases) == {
        "first_field/rgba",
        "whole_frame/rgba",
        "first_field/compact",
        "whole_frame/compact",
    }
    assert all(value > 0 for value in cases.values())


@pytest.mark.slow
def test_bench_diversity_quick(tmp_path):
    out = tmp_path / "diversity.json"
    subprocess.run(
        [
            sys.executable,
            "benchmarks/bench_diversity.py",
            "--quick",
            "--decode-batches",
            "4",
            "--out",
            str(out),
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    report = json.loads(out.read_text())
    assert report["machine"] and report["date_utc"]
    assert set(report["cases"]) == {"wt_8x8", "demo_b8", "demo_b32", "demo_photo_walk_b8", "decode"}
    for case in ("wt_8x8", "demo_b8", "demo_b32", "demo_photo_walk_b8"):
        assert (
            report["cases"][case]["ours"]["moments_median"] > 0
            and report["cases"][case]["uniform"]["batches"] > 0
        )
    assert (
        report["cases"]["decode"]["batches"] == 4 and report["cases"]["decode"]["clip_index_mismatches"] == 0
    )


def test_bench_handoff_small(tmp_path):
    out = tmp_path / "handoff.json"
    args = ["--batches", "4", "--warmup", "2", "--rounds", "1", "--batch-size", "2", "--quiet-wait", "0"]
    subprocess.run(
        [sys.executable, "benchmarks/bench_handoff.py", *args, "--out", str(out)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    report = json.loads(out.read_text())
    assert set(report["median"]) == {"default_collate", "collate_clips", "recycled"}
    assert all(m["clips_per_s"] > 0 and m["total_cpu_ms_per_clip"] >= 0 for m in report["median"].values())
    bad = subprocess.run(
        [sys.executable, "benchmarks/bench_handoff.py", "--batches", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--batches, --rounds must be >= 1" in bad.stderr


@pytest.mark.slow
def test_bench_step_quick(tmp_path):
    out = tmp_path / "step.json"
    subprocess.run(
        [sys.executable, "benchmarks/bench_step.py", "--quick", "--quiet-wait", "0", "--out", str(out)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    report = json.loads(out.read_text())
    assert all(r["step_median_s"] > 0 for r in report["results"])


def test_bench_knn_small(tmp_path):
    out = tmp_path / "knn.json"
    subprocess.run(
        [
            sys.executable,
            "benchmarks/bench_knn.py",
            "--bank=2000",
            "--queries=300",
            "--dim=32",
            "--classes=10",
            "--chunk-sizes=64",
            "--out",
            str(out),
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    (result,) = json.loads(out.read_text())["results"]
    assert result["queries_per_s"] > 0 and result["peak_rss_gb"] > 0


@pytest.mark.slow
def test_bench_davis_tiny(tmp_path):
    out = tmp_path / "davis.json"
    subprocess.run(
        [sys.executable, "benchmarks/bench_davis.py", "--frames", "2", "--warmup", "1", "--height", "64",
         "--width", "96", "--short-side", "64", "--arch", "vit_tiny_patch16_224", "--quiet-wait", "0",
         "--out", str(out)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["machine"] and "frames_per_s" in json.dumps(report)


def test_bench_data_headline_is_the_median_run():
    sys.path.insert(0, str(REPO))
    from benchmarks.data_report import _rate, median_run

    runs = [{"clips_per_s": v, "run": i} for i, v in enumerate([66.3, 54.7, 78.7])]
    chosen = median_run(runs)
    assert chosen["run"] == 0 and chosen["clips_per_s_runs"] == [66.3, 54.7, 78.7]
    assert _rate(chosen) == "66.30 (median of 3: 54.7-78.7)"
    assert median_run([{"clips_per_s": 5.0}, {"clips_per_s": 3.0}])["clips_per_s"] == 3.0  # lower middle
    assert "clips_per_s_runs" not in median_run(runs[:1]) and _rate(runs[0]) == "66.30"


def test_diversity_bench_knows_the_demo_videos_length():
    """bench_diversity's photo-walk case uses the real length of configs/demo.yaml's video."""
    import yaml

    from benchmarks.bench_diversity import PHOTO_WALK_FRAMES
    from dora_lightning.data.sources import probe_videos, resolve_video_paths

    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["data"]["paths"]
    assert demo.endswith("photo_walk.mp4")
    (info,) = probe_videos(resolve_video_paths(str(REPO / demo)), min_frames=1)
    assert info.num_frames == PHOTO_WALK_FRAMES


@pytest.mark.slow
def test_bench_gpu_smoke_through_the_device_script(tmp_path):
    """benchmarks/on_device.sh (what a lent GPU machine runs) on the CPU: it installs the package into a folder of its
    own, then every part of bench_gpu.py (micro ViT, tiny video) writes its fields as it goes, then the compiled bare
    step; everything lands in the output folder."""
    out = tmp_path / "out"
    env = dict(os.environ, SMOKE="1", SITE=str(tmp_path / "site"), PYTHON=sys.executable)
    subprocess.run(["benchmarks/on_device.sh", str(out)], cwd=REPO, check=True, capture_output=True, env=env)
    log = (out / "on_device.log").read_text()
    assert "set-up:" in log and "== done in" in log and ": exit " not in log, log[-2000:]
    (compiled,) = json.loads((out / "gpu_compiled" / "bench_gpu.json").read_text())["parts"]["bare/dora/b2"][
        "results"
    ]
    assert compiled["clips_per_s"] > 0 and compiled["compile"] and compiled["compiled_regions"] > 0
    assert json.loads((out / "gpu_compiled" / "bench_gpu.json").read_text())["settings"]["compile"] is True
    report = json.loads((out / "gpu" / "bench_gpu.json").read_text())
    assert report["smoke"] and report["machine"]["torch"] and report["date_utc"]
    parts = report["parts"]
    fits = ("fit/dora/b2/cpu-aug", "fit/dora/b2/gpu-aug")
    assert set(parts) == {"overhead/dora/b2", "bare/dora/b2", "bare/dino/b2", "video", *fits}
    overhead = parts["overhead/dora/b2"]
    assert overhead["bare"]["step_ms"] > 0 and overhead["trainer"]["step_ms"] > 0
    assert overhead["trainer"]["value_reads_per_step"]  # at least the optimiser's step counters
    for name in ("bare/dora/b2", "bare/dino/b2"):
        (row,) = parts[name]["results"]
        assert row["flops_per_step"] > 0 and row["clips_per_s"] > 0 and row["tflops_per_s"] >= 0
    for name in fits:
        fit = parts[name]
        assert (
            fit["steps_per_s"] > 0 and 0 <= fit["data_wait_fraction"] <= 1 and fit["tflops_per_s"] is not None
        )
        # one cursor per clip of a batch; the timed steps decode far fewer frames per clip than the start-up
        decoded = fit["decoded_frames_per_clip"]
        assert fit["cursors"] == 2 and decoded["timed"] < decoded["warmup"] / 4
    table = (out / "gpu" / "bench_gpu.md").read_text()
    assert "| fit/dora/b2/gpu-aug |" in table and "smoke, CPU" in table


def test_a_training_step_launches_no_more_operators_for_more_clips_or_parameters():
    """benchmarks/count_ops.py: the step's operator count (each a kernel launch on a GPU) does not grow with the batch
    (no per-clip loop), and the gradient clip and the EMA are a few multi-tensor operators, not some per parameter."""
    sys.path.insert(0, str(REPO))
    from benchmarks.count_ops import count_step

    small, large = count_step("dora", 2), count_step("dora", 3)
    assert small == large
    assert small["gradient clip"] <= 10 and small["EMA"] <= 10
    assert small["tracker"] > 0 and small["teacher_fwd"] > 0 and small["student_fwd"] > 0


def test_batch_digest_tells_batches_apart_by_any_tensor():
    from benchmarks.batch_digest import batch_digest

    batch = {"global_views": [torch.zeros(2, 3, 4, 4)], "start": torch.tensor([0, 5]), "video": 0}
    same = {"start": torch.tensor([0, 5]), "global_views": [torch.zeros(2, 3, 4, 4)], "video": 1}
    assert batch_digest(batch) == batch_digest(same)  # key order and non-tensor fields do not count
    changed = {**batch, "global_views": [torch.zeros(2, 3, 4, 4).index_fill_(3, torch.tensor([1]), 1e-3)]}
    assert batch_digest(changed) != batch_digest(batch)
    assert batch_digest({**batch, "start": torch.tensor([0, 6])}) != batch_digest(batch)


def test_batch_digest_of_the_demo_config_is_stable(tmp_path):
    """The digest of the demo's first batch does not depend on the index cache or the process (seeded)."""
    command = [sys.executable, "benchmarks/batch_digest.py", "--batches", "1"]
    runs = [subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True) for _ in range(2)]
    first, second = (json.loads(run.stdout.strip().splitlines()[-1]) for run in runs)
    assert first == second and len(first["batches"]) == 1 and first["videos"][0][1] == 1280


def _gpu_plan(*options: str):
    sys.path.insert(0, str(REPO))
    from benchmarks.bench_gpu import build_parser, plan

    args = build_parser().parse_args(["unused_out", *options])
    return args, *plan(args)


def test_the_gpu_benchmarks_fit_parts_time_the_loaders_steady_state_not_its_start_up():
    """bench_gpu.py's fit parts (14 workers, batch 16 and 64, on the generated video): a decode cursor's first clip is
    a seek plus ~445 decoded frames, each later one ~start_step. With wt.yaml's cursors (2 x batch_size per worker)
    and 5 warm-up steps, every clip of the 15 timed steps was some cursor's first (data wait ~0.9, and the b64 parts
    could not make a batch in time). Now no timed clip starts a run, and every worker has the batches of the warm-up,
    the timed steps, the step after them and the loader's look-ahead, so the epoch does not end (a new start-up)."""
    from benchmarks.common import wt_settings
    from dora_lightning.data.sampling import ClipSpec, cursors_per_worker, plan_shards

    args, _, parts, video = _gpu_plan()
    _, data, _ = wt_settings()
    spec = ClipSpec(data["clip_length"], data["frame_stride"])
    num_starts = [spec.num_starts(round(video["seconds"] * video["fps"]))]
    fits = [(name, case) for name, case, _ in parts if name.startswith("fit")]
    assert {case["batch_size"] for _, case in fits} == {16, 64} and len(fits) == 4
    assert [name for name, _, _ in parts][-2:] == ["fit/dora/b64/gpu-aug", "fit/dora/b64/cpu-aug"]  # last
    for name, case in fits:
        workers, batch, warmup, steps = case["workers"], case["batch_size"], case["warmup"], case["steps"]
        assert workers == args.workers == 14 and warmup >= workers + 1, name
        cursors = cursors_per_worker(case.get("data", {}).get("cursors"), batch)
        plans = plan_shards(
            num_starts, spec, shards=range(workers), num_shards=workers, batch_size=batch, cursors=cursors,
            start_step=data["start_step"], workers_per_rank=workers, seed=0, epoch=0,
        )  # fmt: skip
        fresh = 0
        for step in range(warmup + steps + 2):  # + the step that ends the window and the look-ahead
            plan = plans[step % workers]
            first_of_run = np.unique(plan.run_index, return_index=True)[1]
            batch_clips = np.arange((step // workers) * batch, (step // workers + 1) * batch)
            assert batch_clips[-1] < len(plan), (
                f"{name}: worker {step % workers} has no batch for step {step}"
            )
            if warmup <= step < warmup + steps:
                fresh += np.isin(batch_clips, first_of_run).sum()
        # a run starts only where a cursor's stretch crosses from one residue class of start_step to the next
        assert fresh <= 0.01 * steps * batch, f"{name}: {fresh} of {steps * batch} timed clips start a cursor"
    # the old default, a 20 s video, gave each of 14 workers 55 clip starts at batch 64: not one batch
    assert clips_per_shard_of(20 * 60, spec, 14, 64) == 0


def clips_per_shard_of(frames: int, spec, workers: int, batch: int) -> int:
    from dora_lightning.data.sampling import clips_per_shard

    return clips_per_shard([spec.num_starts(frames)], workers, batch)


def test_the_bare_step_with_model_compile_runs_compiled_blocks(monkeypatch):
    """``bench_gpu.py --compile``: ``model.compile`` acts in ``DoRAModule.configure_model()``, which only a Trainer
    calls, so the bare step (no Trainer) ran eager while its row said compiled. It now compiles (here with dynamo's
    eager backend, for speed); the warm-up steps pay for it, and the JSON's settings say whether the run compiled."""
    import functools

    import torch._dynamo

    import dora_lightning.module as module_file
    from benchmarks import gpu_cases
    from benchmarks.bench_gpu import report_settings
    from dora_lightning.models.compile import compile_regions_

    args, common, parts, _ = _gpu_plan("--smoke", "--compile")
    assert report_settings(args, common)["compile"] is True
    assert report_settings(*_gpu_plan("--smoke")[:2])["compile"] is False
    monkeypatch.setattr(module_file, "compile_regions_", functools.partial(compile_regions_, backend="eager"))
    stepped = []

    class RecordingStep(gpu_cases.BareStep):
        def __init__(self, module, *rest) -> None:
            stepped.append(module)
            super().__init__(module, *rest)

    monkeypatch.setattr(gpu_cases, "BareStep", RecordingStep)
    case = dict((name, case) for name, case, _ in parts)["bare/dora/b2"]
    # the smoke run's backend; without it the bare step calls configure_model(), as on a GPU
    assert case.pop("compile_backend") == "eager"
    torch._dynamo.reset()
    try:
        result = gpu_cases.time_bare(case | {"steps": 1}, "dora")
    finally:
        torch._dynamo.reset()
    (module,) = stepped
    assert module.student.backbone.blocks[0]._compiled_call_impl is not None
    assert result["compile"] and result["compiled_regions"] == gpu_cases.compiled_regions(module) == 5
    assert result["compile_backend"] == "inductor"  # what configure_model() asks for (eager here: patched)
    assert result["warmup_steps"] >= 2 and result["graphs_compiled_timed"] == 0  # compiled in the warm-up


def test_the_device_script_finds_the_repositorys_python_and_names_what_a_python_lacks(tmp_path):
    """on_device.sh's documented smoke command (SMOKE=1, no PYTHON) used python3, which here lacks torch, and then
    blamed missing wheels; it now takes .venv/bin/python when SMOKE is set, and says which modules a python lacks."""
    script = [str(REPO / "benchmarks" / "on_device.sh"), str(tmp_path / "out")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"} | {"SMOKE": "1", "WHAT": "none"}
    run = subprocess.run(script, capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 2 and "WHAT must be gpu or learning" in run.stdout  # checked before any set-up
    if (REPO / ".venv" / "bin" / "python").exists():
        assert f"PYTHON={REPO / '.venv' / 'bin' / 'python'}" in run.stdout, run.stdout
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    env = dict(os.environ, PYTHON=str(bare / "bin" / "python"), SITE=str(tmp_path / "site"))
    run = subprocess.run(script, capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 2 and "lacks torch lightning timm" in run.stdout, run.stdout
