"""Backbone loading and export: our Lightning checkpoints, exported files, official DINO/DoRA layouts, clear errors."""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import timm
import torch
from conftest import MICRO_MODULE
from safetensors.torch import save_file

from dora_lightning.checkpoints import EXPORT_FORMAT, _infer, export_backbone, load_backbone
from dora_lightning.evaluation.results import write_results
from dora_lightning.export import main as export_main
from dora_lightning.models.backbone import build_vit
from dora_lightning.module import DoRAModule

MICRO = MICRO_MODULE
MICRO_TIMM = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[DoRAModule, Path]:
    """A micro DoRAModule whose student differs from its teacher, saved by Lightning as `dora fit` would."""
    torch.manual_seed(0)
    module = DoRAModule(**MICRO)
    with torch.no_grad():
        for param in module.student.backbone.parameters():
            param.add_(0.05 * torch.randn_like(param))
    module.eval()
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path_factory.mktemp("root")),
    )
    trainer.strategy.connect(module)
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    trainer.save_checkpoint(path)
    return module, path


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval().forward_features(x)


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def official_layout(model: torch.nn.Module, which=("teacher",)) -> dict:
    """DINO's checkpoint.pth layout: DDP-prefixed backbone + head under teacher/student, args as a Namespace."""
    head = {"head.mlp.0.weight": torch.zeros(4, 4), "head.last_layer.weight_g": torch.ones(8, 1)}
    section = {f"module.backbone.{k}": v for k, v in model.state_dict().items()}
    section |= {f"module.{k}": v for k, v in head.items()}
    ckpt = {w: dict(section) for w in which}
    return ckpt | {"args": argparse.Namespace(arch="vit_small", patch_size=8), "epoch": 3}


# --------------------------------------------------------------------------------------------------- export
def test_export_loads_into_plain_timm(trained, images, tmp_path):
    module, ckpt = trained
    out = export_backbone(ckpt, tmp_path / "backbone.pth")
    payload = torch.load(out, map_location="cpu", weights_only=True)
    assert payload["format"] == EXPORT_FORMAT and payload["which"] == "teacher"
    assert payload["model_name"] == "vit_tiny_patch16_224" and payload["model_kwargs"] == MICRO_TIMM
    model = timm.create_model(
        payload["model_name"], pretrained=False, num_classes=0, **payload["model_kwargs"]
    )
    result = model.load_state_dict(payload["state_dict"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    same(features(model, images), features(module.teacher.backbone, images))


def test_plain_export_via_cli(trained, images, tmp_path, capsys):
    module, ckpt = trained
    out = tmp_path / "student.pth"
    assert export_main([str(ckpt), str(out), "--which", "student", "--plain"]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and line.startswith("wrote the student backbone")
    call = (
        'timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, '
        "img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)"
    )
    assert call in line and f'load_state_dict(torch.load("{out}"))' in line
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **MICRO_TIMM)
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    same(features(model, images), features(module.student.backbone, images))


def test_an_output_that_cannot_be_written_is_one_line_and_leaves_nothing(trained, tmp_path, capsys):
    _, ckpt = trained
    blocked = tmp_path / "a_file"
    blocked.write_text("a file where the output's folder should be")
    out = blocked / "teacher.pth"
    assert export_main([str(ckpt), str(out)]) == 2
    assert capsys.readouterr().err == (
        f"dora export: error: cannot write '{out}' (a part of the path is a file, not a folder); give a writable output path\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


# --------------------------------------------------------------------------------------------------- loading
def test_lightning_checkpoint_teacher_and_student(trained, images):
    module, ckpt = trained
    teacher, info = load_backbone(ckpt)
    student, student_info = load_backbone(ckpt, which="student")
    assert (info.kind, info.which, student_info.which) == ("lightning", "teacher", "student")
    assert info.model_kwargs == MICRO_TIMM and (info.embed_dim, info.depth, info.num_heads) == (48, 2, 3)
    assert not teacher.training
    same(features(teacher, images), features(module.teacher.backbone, images))
    same(features(student, images), features(module.student.backbone, images))
    assert not torch.allclose(features(teacher, images), features(student, images))


def test_exported_file_loads_back(trained, images, tmp_path):
    module, ckpt = trained
    out = export_backbone(ckpt, tmp_path / "nested" / "student.pth", which="student")
    model, info = load_backbone(out)
    assert (info.kind, info.which, info.model_kwargs) == ("exported", "student", MICRO_TIMM)
    same(features(model, images), features(module.student.backbone, images))


def test_official_layout(images, tmp_path):
    torch.manual_seed(2)
    source = build_vit("vit_tiny_patch16_224", **MICRO_TIMM)
    path = tmp_path / "checkpoint.pth"
    torch.save(official_layout(source, which=("teacher", "student")), path)
    model, info = load_backbone(path, num_heads=3)
    assert (info.kind, info.which, info.model_name) == ("official", "teacher", "vit_tiny_patch16_224")
    assert info.model_kwargs == {
        "img_size": 32,
        "patch_size": 8,
        "depth": 2,
        "embed_dim": 48,
    }  # 3 heads: tiny's
    same(features(model, images), features(source, images))


def test_bare_dino_state_dict_infers_the_architecture(images, tmp_path):
    """A DINO-released-style bare backbone (timm key names) with a standard width needs no num_heads."""
    torch.manual_seed(3)
    source = build_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    path = tmp_path / "dino_deittiny8_pretrain.pth"
    torch.save(source.state_dict(), path)
    model, info = load_backbone(path)
    assert (info.kind, info.which, info.num_heads) == ("state_dict", None, 3)
    assert info.model_kwargs == {"img_size": 32, "patch_size": 8, "depth": 1}
    same(features(model, images), features(source, images))
    safetensors_path = tmp_path / "backbone.safetensors"
    save_file(source.state_dict(), str(safetensors_path))
    same(features(load_backbone(safetensors_path)[0], images), features(source, images))


@pytest.mark.parametrize(
    ("name", "size"),
    [("vit_small_patch16_224", 224), ("vit_base_patch8_224", 224), ("vit_tiny_patch16_384", 384)],
)
def test_named_architectures_are_recognised(name, size):
    with torch.device("meta"):
        state = timm.create_model(name, pretrained=False, num_classes=0).state_dict()
    assert _infer(state, Path("x.pth"), None) == (name, {}, size)


def test_other_img_size_interpolates_pos_embed(trained, tmp_path):
    module, ckpt = trained
    model, info = load_backbone(ckpt, img_size=48)
    assert (info.img_size, info.source_img_size, info.model_kwargs["img_size"]) == (48, 32, 48)
    assert model.pos_embed.shape == (1, 1 + 6 * 6, 48)
    x = torch.randn(1, 3, 48, 48)
    # the training model resamples its 4x4 grid on the fly in the same way (timm's bicubic resample)
    same(features(model, x), features(module.teacher.backbone, x))
    out = export_backbone(ckpt, tmp_path / "b48.pth", img_size=48)
    payload = torch.load(out, weights_only=True)
    plain = timm.create_model(
        payload["model_name"], pretrained=False, num_classes=0, **payload["model_kwargs"]
    )
    plain.load_state_dict(payload["state_dict"], strict=True)
    assert features(plain, x).shape == (1, 37, 48)


class _RunsCode:
    """Unpickling this calls ``Path.touch`` on the given file: a stand-in for a payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_no_file_is_ever_unpickled_in_full(trained, images, tmp_path):
    """A file that names a dora-lightning format in its pickle but holds other objects is refused like any other: its
    objects never run (issue 14: a crafted file holding the format string ran its payload). Our own files load safely."""
    module, ckpt = trained
    exported = export_backbone(ckpt, tmp_path / "a.pth")
    same(features(load_backbone(exported)[0], images), features(module.teacher.backbone, images))
    same(features(load_backbone(ckpt)[0], images), features(module.teacher.backbone, images))
    marker = tmp_path / "payload_ran"
    payload = torch.load(exported, weights_only=True)
    for name, extra in (("crafted.pth", _RunsCode(marker)), ("own.pth", pathlib.PurePosixPath("x"))):
        torch.save({**payload, "source": extra, "kind": "dora-lightning/pretrain"}, tmp_path / name)
        with pytest.raises(ValueError, match=r"refuses; checkpoints are never unpickled in full"):
            load_backbone(tmp_path / name)
    assert not marker.exists()
    foreign = dict(payload["state_dict"]) | {"meta": pathlib.PurePosixPath("x")}
    torch.save({"teacher": foreign}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match=r"holds the Python object pathlib.*PurePosixPath"):
        load_backbone(tmp_path / "foreign.pth")


# --------------------------------------------------------------------------------------------------- errors
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'.*nope\.ckpt' does not exist; give a checkpoint"):
        load_backbone(tmp_path / "nope.ckpt")


def test_not_a_torch_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  backbone: vit_small_patch16_224\n")
    with pytest.raises(ValueError, match=r"'.*config\.yaml' is not a PyTorch checkpoint"):
        load_backbone(path)


def test_checkpoint_of_another_kind(tmp_path):
    path = tmp_path / "linear.ckpt"
    state = {"classifier.weight": torch.zeros(10, 48), "classifier.bias": torch.zeros(10)}
    torch.save({"epoch": 4, "state_dict": state, "hyper_parameters": {"num_classes": 10}}, path)
    expected = (
        rf"'{path}' holds no DoRA/DINO backbone weights \(found keys: epoch, state_dict \(classifier.weight, "
        r"classifier.bias\), hyper_parameters\); give a checkpoint from `dora fit`, an exported backbone, "
        r"or an official DINO/DoRA checkpoint"
    )
    with pytest.raises(ValueError, match=expected):
        load_backbone(path)
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match=r"holds no DoRA/DINO backbone weights \(found keys: model \("):
        load_backbone(path)


def test_student_requested_but_only_teacher(tmp_path):
    path = tmp_path / "teacher_only.pth"
    torch.save(official_layout(build_vit("vit_tiny_patch16_224", **MICRO_TIMM)), path)
    with pytest.raises(
        ValueError, match=r"holds no student backbone, only the teacher's; use which='teacher'"
    ):
        load_backbone(path, which="student", num_heads=3)


def test_student_requested_from_exported_teacher(trained, tmp_path):
    out = export_backbone(trained[1], tmp_path / "teacher.pth")
    with pytest.raises(ValueError, match=r"no student backbone, only the teacher's.*--which student"):
        load_backbone(out, which="student")


def test_the_hint_names_the_backbone_the_file_holds(tmp_path):
    path = tmp_path / "student_only.pth"
    student = official_layout(build_vit("vit_tiny_patch16_224", **MICRO_TIMM))["teacher"]
    torch.save({"student": {f"module.{key}": value for key, value in student.items()}}, path)
    with pytest.raises(ValueError) as refused:
        load_backbone(path, num_heads=3)
    assert (
        "use which='student' (dora validate: --evaluator.which student, dora-export and dora visualize: "
        in str(refused.value)
    )
    assert "--which teacher" not in str(refused.value)


def test_a_cut_checkpoint_is_damaged_or_incomplete(trained, tmp_path):
    """A download cut short: a torch zip without its end was "not a PyTorch checkpoint", a cut .safetensors a
    traceback (safetensors' error is not a ValueError)."""
    whole = trained[1].read_bytes()
    for cut in (len(whole) // 2, len(whole) - 100):
        path = tmp_path / f"cut{cut}.ckpt"
        path.write_bytes(whole[:cut])
        with pytest.raises(ValueError, match=r"could not be read by torch.load \(the zip file ends before"):
            load_backbone(path)
    tensors = tmp_path / "whole.safetensors"
    save_file(
        {k: v.contiguous() for k, v in build_vit("vit_tiny_patch16_224", **MICRO_TIMM).state_dict().items()},
        tensors,
    )
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    with pytest.raises(
        ValueError, match=r"could not be read by safetensors \(SafetensorError: .*damaged or incomplete"
    ):
        load_backbone(cut)


def test_a_zip_that_torch_did_not_write_is_not_a_checkpoint(tmp_path):
    """An .npz (a zip of .npy files) is not a checkpoint, not a damaged one."""
    path = tmp_path / "features.npz"
    np.savez(path, a=np.zeros(3))
    with pytest.raises(ValueError, match=r"is not a PyTorch checkpoint \(torch.save / .safetensors file\)"):
        load_backbone(path)


def test_a_torchscript_archive_is_named(tmp_path):
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(ValueError, match=r"is a TorchScript archive \(torch.jit.save\), which holds code"):
        load_backbone(path)


def test_the_stored_position_embedding_gives_the_size_the_weights_were_trained_at(tmp_path, images):
    """Another project's Lightning checkpoint names its timm ViT but not its image size (64 px here): the size is
    read from the stored position embedding (before: 224 was assumed and resampling crashed with a RuntimeError)."""
    source = build_vit("vit_tiny_patch16_224", **{**MICRO_TIMM, "img_size": 64})
    path = tmp_path / "foreign.ckpt"
    hparams = {key: MICRO_TIMM[key] for key in ("patch_size", "depth", "embed_dim", "num_heads")}
    torch.save(
        {
            "state_dict": {f"teacher.backbone.{k}": v for k, v in source.state_dict().items()},
            "hyper_parameters": {"backbone": "vit_tiny_patch16_224", **hparams},
        },
        path,
    )
    model, info = load_backbone(path)
    assert (info.img_size, info.source_img_size) == (64, 64)
    same(features(model, images), features(source, images))
    resized, info = load_backbone(path, img_size=32)
    assert (info.img_size, info.source_img_size) == (32, 64)
    assert resized.pos_embed.shape[1] == 1 + 4 * 4


def test_the_record_is_of_the_bytes_that_were_read(trained, tmp_path):
    """A checkpoint replaced after it was read (dora fit replaces last.ckpt): the results record the file that was
    evaluated, not its replacement."""
    path = tmp_path / "last.ckpt"
    path.write_bytes(trained[1].read_bytes())
    read = hashlib.sha256(path.read_bytes()).hexdigest()
    _, info = load_backbone(path)
    assert (info.sha256, info.size_bytes) == (read, path.stat().st_size)
    path.write_bytes(b"replaced by a newer checkpoint")
    results = write_results(tmp_path / "eval", "knn", {"knn/top1_k20": 1.0}, {}, path, backbone=info)
    data = json.loads(results.read_text())
    assert data["checkpoint"]["sha256"] == read and data["checkpoint"]["size_bytes"] == info.size_bytes
    assert "sha256" not in data["backbone"] and data["backbone"]["kind"] == "lightning"


def test_mismatched_keys_are_listed(tmp_path):
    state = build_vit("vit_tiny_patch16_224", **MICRO_TIMM).state_dict()
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.1.ls1.gamma"] = torch.ones(48)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(
        ValueError,
        match=r"the backbone weights do not fit timm.create_model\(\"vit_tiny_patch16_224\".*"
        r"missing keys: blocks.1.mlp.fc2.bias; unexpected keys: blocks.1.ls1.gamma",
    ):
        load_backbone(path, num_heads=3)


def test_unknown_width_needs_num_heads(tmp_path):
    path = tmp_path / "micro.pth"
    torch.save(build_vit("vit_tiny_patch16_224", **MICRO_TIMM).state_dict(), path)
    with pytest.raises(ValueError, match=r"embed dim 48 .* pass num_heads="):
        load_backbone(path)


def test_bad_arguments(trained, tmp_path):
    with pytest.raises(ValueError, match="which must be 'teacher' or 'student'"):
        load_backbone(trained[1], which="ema")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="img_size=36 is not a multiple of the patch size 8"):
        load_backbone(trained[1], img_size=36)
    with pytest.raises(ValueError, match="is the checkpoint being exported"):
        export_backbone(trained[1], trained[1])


def test_cli_reports_errors(tmp_path, capsys):
    assert export_main([str(tmp_path / "missing.ckpt"), str(tmp_path / "out.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dora export: error: '") and "does not exist" in err
    assert not (tmp_path / "out.pth").exists()
