"""EndLaunchedProcesses: a failing process 0 ends the processes Lightning's launcher started from it, which would
otherwise wait for it (with NCCL, in their next collective until the process group's timeout)."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from conftest import REPO
from lightning.pytorch import Trainer
from test_cli import MICRO_ARGS

from dora_lightning import launched_processes
from dora_lightning.cli import DoraCLI
from dora_lightning.data.datamodule import VideoClipDataModule
from dora_lightning.launched_processes import EndLaunchedProcesses, end_processes
from dora_lightning.module import DoRAModule


def test_only_processes_still_running_are_killed():
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    stuck = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) for _ in range(2)]
    assert end_processes([ended, *stuck]) == 2
    assert [process.returncode for process in (ended, *stuck)] == [0, -9, -9]


def test_only_a_failure_of_process_zero_ends_the_others(monkeypatch):
    """A stop (SIGTERM, Ctrl-C: StopCheckpoint's SIGTERMException) is every process's orderly exit with its own
    status: nothing is killed then (a child still closing would have been SIGKILLed, and the run said to fail)."""
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    registered: list = []
    monkeypatch.setattr(launched_processes.atexit, "register", lambda *args: registered.append(args))
    launcher = _SubprocessScriptLauncher(LightningEnvironment(), num_processes=2, num_nodes=1)
    trainer = SimpleNamespace(strategy=SimpleNamespace(launcher=launcher))
    callback = EndLaunchedProcesses()
    callback.on_exception(trainer, None, SIGTERMException())
    callback.on_exception(trainer, None, KeyboardInterrupt())
    assert registered == []
    callback.on_exception(trainer, None, OSError(28, "No space left on device"))
    assert len(registered) == 1


def test_dora_fit_has_it(tmp_path):
    cli = DoraCLI(
        DoRAModule,
        VideoClipDataModule,
        run=False,
        args=[
            *MICRO_ARGS,
            f"--data.paths={REPO / 'assets/video/vtest.mp4'}",
            f"--trainer.default_root_dir={tmp_path}",
        ],
    )
    assert isinstance(cli.trainer, Trainer)
    assert sum(isinstance(callback, EndLaunchedProcesses) for callback in cli.trainer.callbacks) == 1


PROCESS_ZERO_FAILS = """
import os
import sys
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, {tests!r})
from conftest import MICRO_MODULE  # noqa: E402

from dora_lightning.launched_processes import EndLaunchedProcesses  # noqa: E402
from dora_lightning.module import DoRAModule  # noqa: E402


class FailOnProcessZero(Callback):
    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank == 1:
            open(os.path.join({root!r}, "waiting.pid"), "w").write(str(os.getpid()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2 and trainer.global_rank == 0:
            raise OSError(28, "No space left on device")
        if trainer.global_step == 2:
            time.sleep(600)  # stands for a NCCL collective, which does not notice that process 0 is gone


generator = torch.Generator().manual_seed(0)
batch = {{
    "global_views": [torch.randn(2, 2, 3, 32, 32, generator=generator)],
    "local_views": [torch.randn(2, 2, 3, 16, 16, generator=generator) for _ in range(2)],
}}
callbacks = [FailOnProcessZero()] + ([EndLaunchedProcesses()] if {end!r} else [])
trainer = pl.Trainer(
    default_root_dir={root!r}, accelerator="cpu", strategy="ddp", devices=2, max_steps=4, logger=False,
    callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    use_distributed_sampler=False,
)
trainer.fit(DoRAModule(**MICRO_MODULE), torch.utils.data.DataLoader([batch] * 4, batch_size=None))
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("end", [True, False])
def test_a_failing_process_zero_ends_the_process_it_launched(tmp_path, end):
    """Process 0 fails at step 2 while process 1 waits: with the callback process 1 is killed when process 0 exits,
    and process 0 says so; without it (Lightning alone) process 1 is left running after process 0 has exited."""
    script = tmp_path / "fit.py"
    script.write_text(PROCESS_ZERO_FAILS.format(tests=str(REPO / "tests"), root=str(tmp_path), end=end))
    log = tmp_path / "log.txt"
    with log.open("w") as out:  # a file, not a pipe: a process left running would hold a pipe open
        run = subprocess.run([sys.executable, str(script)], cwd=REPO, stdout=out, stderr=out, timeout=300)
    said = log.read_text()
    assert run.returncode != 0 and "No space left on device" in said, said[-3000:]
    waiting = int((tmp_path / "waiting.pid").read_text())
    try:
        if end:
            assert "dora fit: process 0 failed; ended 1 process(es) it had launched" in said
            assert not _alive(waiting)
        else:
            assert _alive(waiting)
    finally:
        if _alive(waiting):
            os.kill(waiting, 9)
