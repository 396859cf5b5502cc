"""`make demo` run again (python -m dora_lightning.compare): a finished pretraining with the same recipe is reused, and
one with another recipe (or a fit that did not finish) pretrains again in its folder, which `dora fit` alone refuses
for a new run over another run's checkpoints."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import REPO

from dora_lightning.compare import Comparison

FIT_ARGS = ["--trainer.enable_progress_bar=false", "--data.num_workers=0", "--run_plan.enabled=false"]


@pytest.mark.slow
def test_compare_pretrains_again_over_its_own_earlier_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    config = REPO / "configs" / "demo.yaml"
    base = yaml.safe_load(config.read_text())
    comparison = Comparison(config=config, output_dir=tmp_path, seeds=[0], methods=["dora"])
    run = tmp_path / "seed0" / "dora"

    def pretrain(steps: int) -> int:
        comparison.fit_args = [*FIT_ARGS, f"--trainer.max_steps={steps}"]
        checkpoint = comparison._pretrain(base, "dora", 0)
        return torch.load(checkpoint, weights_only=True)["global_step"]

    assert pretrain(1) == 1
    assert pretrain(2) == 2  # another recipe: pretrained again (a new run into a folder with checkpoints)
    assert sorted(p.name for p in (run / "lightning_logs").iterdir()) == ["version_0"]  # no stale curve
    capsys.readouterr()
    assert pretrain(2) == 2 and "already pretrained with this config" in capsys.readouterr().out
    (run / "fit_done.json").unlink()  # a fit that did not finish: pretrained again too
    assert pretrain(2) == 2
