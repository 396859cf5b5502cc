"""model.* values that cannot train are refused when DoRAModule is built, in one line naming the key."""

from __future__ import annotations

import inspect

import pytest

from dora_lightning.model_options import MODEL_OPTION_RULES, check_model_options, precision_problem
from dora_lightning.module import DoRAModule

DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(DoRAModule.__init__).parameters.items()
    if name != "self"
}
BAD = {
    "img_size": 0,
    "patch_size": 0,
    "depth": 0,
    "embed_dim": -1,
    "num_heads": 0,
    "drop_path_rate": 1.0,
    "out_dim": 1,
    "head_hidden_dim": 0,
    "head_bottleneck_dim": 0,
    "sk_epsilon": 0.0,
    "sk_iterations": -1,
    "student_temp": 0.0,
    "teacher_temp": -0.04,
    "warmup_teacher_temp": 0.0,
    "warmup_teacher_temp_epochs": -1,
    "center_momentum": 1.1,
    "momentum_teacher": -0.1,
    "momentum_teacher_end": 1.01,
    "base_lr": -5e-4,
    "min_lr": -1e-5,
    "warmup_epochs": -1,
    "weight_decay": -0.04,
    "weight_decay_end": -0.4,
    "freeze_last_layer_epochs": -1,
    "clip_grad": -3.0,
    "log_images_every_n_steps": -1,
    "diagnostics_every_n_steps": -1,
}


def test_every_rule_names_an_option_of_the_module_and_the_defaults_pass():
    assert set(MODEL_OPTION_RULES) <= set(DEFAULTS)
    assert set(BAD) == set(MODEL_OPTION_RULES)
    check_model_options(DEFAULTS)


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_value_that_cannot_train_is_refused_naming_the_key(name):
    with pytest.raises(ValueError, match=rf"^model\.{name} must be .*, got {BAD[name]}$"):
        check_model_options({**DEFAULTS, name: BAD[name]})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("clip_grad", 0.0),
        ("drop_path_rate", 0.0),
        ("momentum_teacher", 1.0),
        ("min_lr", 0.0),
        ("depth", None),
    ],
)
def test_the_edges_that_can_train_pass(name, value):
    check_model_options({**DEFAULTS, name: value})


def test_the_module_checks_before_building_anything():
    with pytest.raises(ValueError, match=r"^model\.teacher_temp must be > 0, got 0.0$"):
        DoRAModule(backbone="vit_nope", teacher_temp=0.0)  # the unknown backbone is never reached


@pytest.mark.parametrize("precision", ["bf16-true", "16-true", "64-true"])
def test_a_precision_that_casts_the_weights_is_refused_before_the_first_batch(precision, tmp_path):
    """Before: bf16-true and 16-true crashed at the first batch (float32 views into bfloat16 weights); they cannot
    train anyway (the EMA step is lost to rounding)."""
    import lightning.pytorch as pl
    from conftest import MICRO_MODULE

    assert "bf16-mixed" in precision_problem(precision) and precision in precision_problem(precision)
    trainer = pl.Trainer(
        accelerator="cpu", precision=precision, max_steps=1, logger=False, default_root_dir=tmp_path
    )
    with pytest.raises(ValueError, match=f"trainer.precision={precision} casts the weights"):
        trainer.fit(DoRAModule(**MICRO_MODULE), train_dataloaders=[{}])


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed", "transformer-engine"])
def test_the_precisions_with_float32_weights_pass(precision):
    assert precision_problem(precision) is None
