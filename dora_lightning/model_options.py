"""The checks of DoRAModule's numeric options (``model.*``), one table: a value that cannot train is refused before
the model is built, in one line that names the key, instead of training on it (a negative lr) or failing later with
a misleading message (a zero temperature gives a NaN loss at the first step)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = [
    "MODEL_OPTION_RULES",
    "batch_problem",
    "check_model_options",
    "crop_size_problem",
    "precision_problem",
]


def _positive(value: float) -> bool:
    return value > 0


def _non_negative(value: float) -> bool:
    return value >= 0


def _fraction(value: float) -> bool:
    return 0 <= value <= 1


# option -> (test, what the test asks for); options that are None (not given, e.g. depth) are not checked;
# batch_size is linked from data.batch_size, which the data module checks under its own name
MODEL_OPTION_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "img_size": (_positive, "> 0"),
    "patch_size": (_positive, "> 0"),
    "depth": (_positive, "> 0"),
    "embed_dim": (_positive, "> 0"),
    "num_heads": (_positive, "> 0"),
    "drop_path_rate": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "out_dim": (lambda v: v >= 2, ">= 2 (a softmax over one prototype is constant)"),
    "head_hidden_dim": (_positive, "> 0"),
    "head_bottleneck_dim": (_positive, "> 0"),
    "sk_epsilon": (_positive, "> 0"),
    "sk_iterations": (_non_negative, ">= 0"),
    "student_temp": (_positive, "> 0"),
    "teacher_temp": (_positive, "> 0"),
    "warmup_teacher_temp": (_positive, "> 0"),
    "warmup_teacher_temp_epochs": (_non_negative, ">= 0"),
    "center_momentum": (_fraction, "in [0, 1]"),
    "momentum_teacher": (_fraction, "in [0, 1]"),
    "momentum_teacher_end": (_fraction, "in [0, 1]"),
    "base_lr": (_positive, "> 0"),
    "min_lr": (_non_negative, ">= 0"),
    "warmup_epochs": (_non_negative, ">= 0"),
    "weight_decay": (_non_negative, ">= 0"),
    "weight_decay_end": (_non_negative, ">= 0"),
    "freeze_last_layer_epochs": (_non_negative, ">= 0"),
    "clip_grad": (_non_negative, ">= 0 (0 disables)"),
    "log_images_every_n_steps": (_non_negative, ">= 0 (0 disables)"),
    "diagnostics_every_n_steps": (_non_negative, ">= 0 (0 disables)"),
}


def check_model_options(options: Mapping[str, Any]) -> None:
    """Raise ValueError ``model.NAME must be RULE, got VALUE`` for the first option of ``options`` (DoRAModule's
    hyperparameters) that breaks its rule in :data:`MODEL_OPTION_RULES`."""
    for name, (test, rule) in MODEL_OPTION_RULES.items():
        value = options.get(name)
        if value is not None and not test(value):
            raise ValueError(f"model.{name} must be {rule}, got {value}")


def crop_size_problem(kind: str, size: Any, patch_size: int, backbone: str) -> str | None:
    """Why a ``kind`` ("global", "local") crop of ``size`` pixels cannot be cut into the backbone's patches (the
    tracker and timm's patch embedding need whole patches), with a size that can; None when it can."""
    if not isinstance(size, int) or not patch_size or size % patch_size == 0:
        return None
    return (
        f"data.transform.init_args.{kind}_size={size} is not a multiple of the patch size {patch_size} of "
        f"model.backbone={backbone}; give a multiple of {patch_size} (e.g. {max(patch_size, round(size / patch_size) * patch_size)})"
    )


def batch_problem(batch: Mapping[str, Any], method: str, patch_size: int, backbone: str) -> str | None:
    """Why a training batch does not suit the model (None when it does), with the fix: the number of global views
    per frame for ``method`` (DINO 2, DoRA 1), views never normalised (uint8), crop sizes not in whole patches."""
    expected = 2 if method == "dino" else 1
    got = len(batch["global_views"])
    if got != expected:
        return (
            f"model.method={method} needs {expected} global view(s) per frame but the data gives {got}; "
            f"set data.transform.init_args.num_global_crops: {expected}"
        )
    if any(v.dtype == torch.uint8 for v in batch["global_views"] + batch["local_views"]):
        return (
            "the batch holds uint8 views that were never normalised: pass the VideoClipDataModule to the Trainer "
            "(its on_after_batch_transfer normalises them) or apply ClipMultiCrop.normalize to every view"
        )
    for kind, views in (("global", batch["global_views"]), ("local", batch["local_views"][:1])):
        size = int(views[0].shape[-1]) if views else None
        if problem := crop_size_problem(kind, size, patch_size, backbone):
            return problem
    return None


def precision_problem(precision: str) -> str | None:
    """Why ``trainer.precision`` cannot pretrain (None when it can): the ``-true`` precisions other than ``32-true``
    cast the weights themselves. In bfloat16 (8 bits of mantissa) the EMA teacher's step of (1 - momentum) x the
    difference, 0.4 % of it at momentum 0.996, is mostly lost to rounding, as are AdamW's small updates; and the
    views, made or normalised in float32 after Lightning casts a batch, do not match such weights."""
    if not precision.endswith("-true") or precision == "32-true":
        return None
    return (
        f"trainer.precision={precision} casts the weights, and the EMA teacher and AdamW need float32 weights (an "
        "EMA step of 0.4 % of the difference is lost to rounding in 16 bits); use --trainer.precision bf16-mixed "
        "(bfloat16 compute, float32 weights; 16-mixed on GPUs without bfloat16) or 32-true"
    )
