"""Helpers shared by the benchmark scripts: machine description, CPU-load accounting from /proc, waiting for quiet
CPUs, running one case in a fresh interpreter, Markdown tables and JSON output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------------------
# Machine
# ---------------------------------------------------------------------------------------------------------------


def base_machine_info() -> dict:
    """Platform, CPU model and counts, memory and Python version (callers append their library versions)."""
    from dora_lightning.run_plan import usable_cpu_cores

    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu_model
            )
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cpu_cores(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
    }


def read_proc_kib(path: str, key: str) -> int:
    """The value (in KiB) of the line starting with ``key`` in a /proc file such as ``/proc/PID/status``; 0 if absent
    or unreadable (the process may have ended)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


# ---------------------------------------------------------------------------------------------------------------
# CPU load: this process versus the rest of the machine
# ---------------------------------------------------------------------------------------------------------------


def cpu_busy_seconds() -> float:
    """Busy CPU time of the whole machine (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds(include_children: bool) -> float:
    """CPU time of this process, plus that of its ended (waited-for) children if ``include_children``."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    seconds = me.ru_utime + me.ru_stime
    if include_children:
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        seconds += kids.ru_utime + kids.ru_stime
    return seconds


@dataclass(frozen=True)
class CpuSample:
    """Machine-wide busy CPU seconds, this process's own CPU seconds and the monotonic clock, read together."""

    busy: float
    own: float
    wall: float

    @classmethod
    def now(cls, include_children: bool) -> CpuSample:
        return cls(cpu_busy_seconds(), own_cpu_seconds(include_children), time.monotonic())


def cpu_cores_between(start: CpuSample, end: CpuSample, window: float | None = None) -> tuple[float, float]:
    """(own, other) CPU cores used between two samples, averaged over ``window`` seconds (default: the wall time
    between them); "other" is every process but this one (and its children when the samples count them)."""
    window = window if window is not None else max(end.wall - start.wall, 1e-9)
    own = end.own - start.own
    return own / window, max(0.0, (end.busy - start.busy) - own) / window


def other_cpu_load(include_children: bool, window: float = 2.0) -> float:
    """CPU cores used by other processes, averaged over ``window`` seconds."""
    start = CpuSample.now(include_children)
    time.sleep(window)
    return cpu_cores_between(start, CpuSample.now(include_children), window)[1]


def wait_for_quiet(max_wait: float, threshold: float, include_children: bool) -> tuple[float, float | None]:
    """Wait (up to ``max_wait`` s) until other processes use at most ``threshold`` cores; return (waited s, load).
    ``max_wait`` <= 0: no wait and no measurement, (0.0, None)."""
    if max_wait <= 0:
        return 0.0, None
    t0 = time.monotonic()
    while True:
        load = other_cpu_load(include_children)
        waited = time.monotonic() - t0
        if load <= threshold or waited >= max_wait:
            return round(waited, 1), round(load, 2)


def add_report_args(parser: argparse.ArgumentParser, quick: str) -> None:
    """``--out`` (the JSON that :func:`finish_report` writes) and ``--quick`` (a smoke run: ``quick`` says what)."""
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {quick}")


def add_quiet_wait_arg(parser: argparse.ArgumentParser, default: float) -> None:
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=default,
        help="before each case, wait up to this many seconds for other processes to leave the CPUs idle (0: no wait)",
    )


# ---------------------------------------------------------------------------------------------------------------
# One case in its own interpreter: ``SCRIPT --child-case JSON --child-out FILE``
# ---------------------------------------------------------------------------------------------------------------


def add_child_args(parser: argparse.ArgumentParser) -> None:
    """The hidden options with which a benchmark script runs one case as a child process."""
    parser.add_argument("--child-case", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)


def run_child_side(args: argparse.Namespace, run_case: Callable[[dict], dict]) -> bool:
    """In a child process (``--child-case`` given): run the case, write its result JSON and return True."""
    if not args.child_case:
        return False
    result = run_case(json.loads(args.child_case))
    Path(args.child_out).write_text(json.dumps(result))
    return True


def run_child_case(
    script: Path,
    case: dict,
    name: str,
    timeout: float,
    env: dict | None = None,
    monitor: Callable[[int], AbstractContextManager] | None = None,
) -> dict:
    """Run ``case`` through ``script`` in a fresh interpreter (cwd: the repository) and return the result it wrote.

    ``monitor(pid)``, if given, is a context manager held while the child runs (e.g. a memory sampler). A child that
    fails, or runs past ``timeout`` seconds (it is then killed), raises RuntimeError naming the case ``name``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            str(Path(script).resolve()),
            "--child-case",
            json.dumps(case),
            "--child-out",
            str(out),
        ]
        proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=env)
        with monitor(proc.pid) if monitor is not None else nullcontext():
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc = "timeout"
        if rc != 0 or not out.is_file():
            raise RuntimeError(f"benchmark case {name} failed (exit {rc})")
        return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------


def wt_settings(config: str = "configs/wt.yaml") -> tuple[dict, dict, dict]:
    """The model, data and transform arguments of ``config`` (the paper's recipe by default)."""
    import yaml

    raw = yaml.safe_load((REPO_ROOT / config).read_text())
    data = dict(raw["data"])
    transform = dict(data.pop("transform")["init_args"])
    return dict(raw["model"]), data, transform


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table: a header line, a ``|---|`` line, one line per row (cells already formatted)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def finish_report(started: Any, table: str, out: Path | None, **results: Any) -> dict:
    """A benchmark run's report: its start (a datetime, UTC), the machine and ``results``; prints ``table`` and the
    date, and writes the report as JSON to ``out`` when given."""
    report = {"date_utc": started.strftime("%Y-%m-%d %H:%M"), "machine": base_machine_info(), **results}
    print(table)
    print(f"date {report['date_utc']} UTC")
    if out is not None:
        write_json(out, report)
    return report


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` as indented JSON (creating the folder) and say so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


class VideoJob:
    """``make_long_video.py`` generating ``path`` in the background (at nice 10, its output in a temporary file), so
    that the overhead and bare parts, which use the GPU and one core, run meanwhile; :meth:`wait` before the first fit
    part."""

    def __init__(self, path: Path, settings: dict) -> None:
        cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "make_long_video.py"), str(path)]
        cmd += [f"--{key}={value}" for key, value in settings.items()]
        self.started = time.monotonic()
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=lambda: os.nice(10)
        )
        self.finished: float | None = None
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        self.proc.wait()
        self.finished = time.monotonic()

    def wait(self, timeout: float) -> float:
        """Wait for the video (at most ``timeout`` s); returns the seconds it took to make."""
        try:
            code = self.proc.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired as err:
            self.stop()
            raise RuntimeError(
                f"make_long_video.py: not done after {time.monotonic() - self.started:.0f} s"
            ) from err
        if code:
            self.log.seek(0)
            tail = self.log.read().decode(errors="replace")[-300:]
            raise RuntimeError(f"make_long_video.py: exit {code}: {tail}")
        return (self.finished or time.monotonic()) - self.started

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
