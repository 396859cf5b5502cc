"""`dora validate`'s results: what a results file says of the backbone it evaluated (an exported student is named
as the student) and of the precision it ran at (mixed precision scores as float32 does)."""

from __future__ import annotations

import json

import torch
from conftest import micro_vit
from test_validate_cli import QUIET, fit_checkpoint, image_root, knn_args  # noqa: F401 - fixtures

from dora_lightning.checkpoints import EXPORT_FORMAT
from dora_lightning.cli import main


def test_an_exported_student_is_evaluated_and_named_as_the_student(image_root, tmp_path, capsys):  # noqa: F811
    """A file of one backbone is that backbone: an exported student under the default which=teacher was scored and
    labelled "teacher" (title, protocol.which, protocol.feature)."""
    student = tmp_path / "student.pth"
    torch.save(
        {
            "format": EXPORT_FORMAT,
            "version": 1,
            "model_name": "vit_tiny_patch16_224",
            "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 3},
            "which": "student",
            "state_dict": micro_vit(depth=1).state_dict(),
        },
        student,
    )
    main(
        [
            *knn_args(student, image_root[0], "[1]", batch_size=128),
            *QUIET,
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    said = capsys.readouterr()
    assert (
        f"dora validate: '{student}' holds one backbone, the student's: evaluated as the student" in said.err
    )
    assert f"knn evaluation of {student} (student)" in said.out
    protocol = json.loads((tmp_path / "eval" / "knn" / "results_knn.json").read_text())["protocol"]
    assert protocol["which"] == "student" and protocol["feature"].startswith("student")


def test_validate_under_mixed_precision_scores_as_in_float32(fit_checkpoint, image_root, tmp_path):  # noqa: F811
    """``--trainer.precision bf16-mixed`` (what a GPU user gives; ``16-mixed`` is bf16 on the CPU too): the backbone
    runs in bf16, the k-NN vote in float32; the scores stay close to float32's (they failed before)."""
    data_dir, _ = image_root
    args = [*knn_args(fit_checkpoint, data_dir, "[5,20]", batch_size=256), *QUIET]
    scores = {}
    for precision in ("32-true", "bf16-mixed"):
        root = tmp_path / precision
        main([*args, f"--trainer.precision={precision}", f"--trainer.default_root_dir={root}"])
        results = json.loads((root / "eval" / "knn" / "results_knn.json").read_text())
        assert results["trainer"]["precision"] == precision
        scores[precision] = results["metrics"]
    for name, value in scores["32-true"].items():
        assert abs(scores["bf16-mixed"][name] - value) <= 3.0, (name, scores)
