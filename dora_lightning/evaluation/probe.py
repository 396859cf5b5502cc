"""What the trained-probe evaluators (linear, segmentation) share: the Trainer defaults of a probe run, the check of
``n_last_blocks``, the refusal of spawned strategies, a frozen backbone that is given back as it came, and when their
metrics sync over processes."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
from torch import nn

from dora_lightning.evaluation.contract import EvaluatorSettingError


def check_n_last_blocks(backbone: nn.Module, n_last_blocks: int) -> None:
    """Raise :class:`EvaluatorSettingError` when the backbone has fewer than ``n_last_blocks`` blocks."""
    depth = len(backbone.blocks)
    if n_last_blocks > depth:
        raise EvaluatorSettingError(
            f"n_last_blocks={n_last_blocks} exceeds the depth of the checkpoint's backbone ({depth} blocks); give "
            f"--evaluator.n_last_blocks between 1 and {depth}"
        )


def probe_trainer_kwargs(
    trainer_kwargs: Mapping[str, Any],
    epochs: int,
    output_dir: Any,
    who: str,
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The Trainer arguments of a probe run: the given ones with ``max_epochs = epochs`` (a different given value is
    replaced, with a warning naming ``who``) and, for options absent or None (LightningCLI passes unset ones as
    None), no sanity check, no checkpoints (a probe is cheap to retrain), ``output_dir`` as root, and ``defaults``."""
    kwargs = dict(trainer_kwargs)
    given = kwargs.get("max_epochs")
    if given is not None and given != epochs:
        warnings.warn(
            f"trainer max_epochs={given} is replaced by {who}'s epochs={epochs}", UserWarning, stacklevel=3
        )
    kwargs["max_epochs"] = epochs
    fill = {
        "num_sanity_val_steps": 0,
        "enable_checkpointing": False,
        "default_root_dir": output_dir,
        **(defaults or {}),
    }
    for key, value in fill.items():
        if kwargs.get(key) is None and value is not None:
            kwargs[key] = value
    return kwargs


def refuse_spawned_strategy(trainer: pl.Trainer, who: str) -> None:
    """Raise :class:`EvaluatorSettingError` under a spawn/fork strategy: a probe's results would stay in the
    workers. Lightning starts the worker processes of such a strategy also for one device (``--trainer.strategy
    ddp_spawn`` alone: until 2026-12-06 it was let through and crashed pickling the probe's metrics)."""
    start_method = getattr(trainer.strategy, "_start_method", "popen")
    if start_method != "popen":
        raise EvaluatorSettingError(
            f"{who} cannot run under a spawned/forked strategy ({type(trainer.strategy).__name__}, start method "
            f"{start_method!r}): its results would stay in the worker processes; use --trainer.strategy ddp"
        )


@contextmanager
def frozen_backbone(backbone: nn.Module) -> Iterator[nn.Module]:
    """Run a probe on ``backbone``; its ``requires_grad`` flags and train/eval mode are restored afterwards, and
    Lightning's warning about modules in eval mode (the frozen backbone, on purpose) is silenced meanwhile."""
    grads = {name: p.requires_grad for name, p in backbone.named_parameters()}
    was_training = backbone.training
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
            yield backbone
    finally:
        for name, p in backbone.named_parameters():
            p.requires_grad_(grads[name])
        backbone.train(was_training)


def syncs_across_its_trainer(module: pl.LightningModule) -> Callable[[], bool]:
    """torchmetrics' ``distributed_available_fn`` for ``module``'s metrics: sync only when the module's own Trainer
    runs several processes. torchmetrics' default asks ``torch.distributed``, which during ``dora fit --eval_during``
    is the training's process group: process 0 evaluates alone on its own Trainer, and a sync there met the other
    processes' training collectives (a 2-process CPU run hung at the first evaluation, before 2026-12-06)."""

    def several_processes() -> bool:
        return module._trainer is not None and module.trainer.world_size > 1

    return several_processes
