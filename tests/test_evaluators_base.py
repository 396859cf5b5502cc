"""Evaluator plugin contract: the base class, the registry (entry points, built-ins, errors) and the results file."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO

import dora_lightning.evaluation.registry as registry
from dora_lightning.evaluation.contract import Evaluator
from dora_lightning.evaluation.registry import (
    EvaluatorImportError,
    available_evaluators,
    class_path_of,
    get_evaluator_class,
    import_registered,
)
from dora_lightning.evaluation.results import format_table, format_value, package_versions, write_results
from evaluators.knn.evaluator import KNNEvaluator


def make_distribution(root: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> Path:
    """A fake installed distribution: ``<dist>-0.1.dist-info`` with entry points in ``dora.evaluators``, plus modules."""
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[dora.evaluators]\n{lines}")
    for name, source in modules.items():
        (root / f"{name}.py").write_text(source)
    return root


DOCS_EXAMPLE = REPO / "docs" / "plugins.md"


def docs_example_source() -> str:
    """The ``toy_eval.py`` example of docs/plugins.md (the python block that defines ToyEvaluator)."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS_EXAMPLE.read_text(), flags=re.S)
    sources = [b for b in blocks if "class ToyEvaluator(Evaluator)" in b]
    assert len(sources) == 1, "docs/plugins.md must hold exactly one ToyEvaluator example"
    return sources[0]


def docs_entry_point() -> tuple[str, str]:
    """The ``name = "module:Class"`` line of docs/plugins.md's pyproject table."""
    found = re.search(
        r'\[project\.entry-points\."dora\.evaluators"\]\n(\w+) = "([\w.:]+)"', DOCS_EXAMPLE.read_text()
    )
    assert found, "docs/plugins.md must show the entry-point table"
    return found.group(1), found.group(2)


@pytest.fixture
def toy_distribution(tmp_path, monkeypatch):
    """docs/plugins.md's ToyEvaluator installed as a fake distribution on sys.path."""
    name, target = docs_entry_point()
    module = target.split(":")[0]
    root = make_distribution(tmp_path / "site", "toy-dist", {name: target}, {module: docs_example_source()})
    monkeypatch.syspath_prepend(str(root))
    yield root
    import sys

    sys.modules.pop(module, None)


# ---------------------------------------------------------------------------------------------------- registry
def test_builtin_evaluators_are_registered():
    known = available_evaluators()
    assert {"knn", "linear"} <= set(known)
    assert known["knn"].target == "evaluators.knn:KNNEvaluator"
    assert known["linear"].target == "evaluators.linear:LinearProbeEvaluator"
    assert known["knn"].distribution == "dora-lightning"


def test_installed_entry_points_match_the_builtin_table():
    from importlib.metadata import entry_points

    installed = {
        ep.name: ep.value
        for ep in entry_points(group="dora.evaluators")
        if ep.dist is not None and ep.dist.name.replace("_", "-").lower() == "dora-lightning"
    }
    assert installed, "dora-lightning's entry points are not installed (run .venv/bin/pip install -e .)"
    assert installed == registry.BUILTIN_EVALUATORS


def test_plain_checkout_falls_back_to_builtins(monkeypatch):
    monkeypatch.setattr(registry, "entry_points", lambda group: [])
    assert get_evaluator_class("knn") is KNNEvaluator
    assert set(available_evaluators()) == set(registry.BUILTIN_EVALUATORS)


@pytest.mark.parametrize(
    "spec",
    [
        "knn",
        "KNNEvaluator",
        "evaluators.knn.evaluator:KNNEvaluator",
        "evaluators.knn.evaluator.KNNEvaluator",
        KNNEvaluator,
    ],
)
def test_get_evaluator_class_accepts_names_and_paths(spec):
    assert get_evaluator_class(spec) is KNNEvaluator


def test_unknown_evaluator_lists_the_known_ones():
    with pytest.raises(
        ValueError, match=r"unknown evaluator 'nope'; known: davis, knn, linear, segmentation; .*class_path"
    ):
        get_evaluator_class("nope")


def test_class_path_that_is_not_an_evaluator():
    with pytest.raises(ValueError, match="not a subclass of dora_lightning.evaluation.contract.Evaluator"):
        get_evaluator_class("collections:OrderedDict")
    with pytest.raises(EvaluatorImportError, match="no_such_module_x"):
        get_evaluator_class("no_such_module_x:Thing")


def test_third_party_entry_point_is_discovered(toy_distribution):
    known = available_evaluators()
    assert known["toy"].distribution == "toy-dist"
    assert known["toy"].target == "toy_eval:ToyEvaluator"
    cls = get_evaluator_class("toy")
    assert cls.__name__ == "ToyEvaluator" and issubclass(cls, Evaluator)
    assert class_path_of(cls) == "toy_eval.ToyEvaluator"
    assert get_evaluator_class("ToyEvaluator") is cls


def test_broken_plugin_gives_a_clear_error(tmp_path, monkeypatch):
    root = make_distribution(
        tmp_path / "site",
        "broken-dist",
        {"broken": "broken_eval:BrokenEvaluator"},
        {"broken_eval": "import not_installed_dependency_xyz\n"},
    )
    monkeypatch.syspath_prepend(str(root))
    assert "broken" in available_evaluators()
    with pytest.raises(EvaluatorImportError) as info:
        get_evaluator_class("broken")
    message = str(info.value)
    assert "'broken'" in message and "broken-dist" in message and "not_installed_dependency_xyz" in message
    failures = import_registered()  # the others still import
    assert set(failures) == {"broken"}


def test_third_party_cannot_take_a_builtin_name(tmp_path, monkeypatch, capsys):
    """The clash is said once per process, in one line (it was a UserWarning with a code path in front, printed
    once for each place that read the registry: two or three times per command)."""
    root = make_distribution(tmp_path / "site", "squatter", {"knn": "squat:Evaluator"}, {})
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(registry, "_WARNED", set(), raising=False)
    monkeypatch.setattr("sys.argv", ["/venv/bin/dora", "validate", "--evaluator", "nosuch"])
    known = available_evaluators()
    assert known["knn"].target == "evaluators.knn:KNNEvaluator"
    assert get_evaluator_class("knn") is KNNEvaluator
    import_registered()
    with pytest.raises(ValueError, match="unknown evaluator 'nosuch'"):
        get_evaluator_class("nosuch")
    assert capsys.readouterr().err == (
        "dora validate: warning: evaluator name 'knn' registered by squatter (squat:Evaluator) is already taken by "
        "dora-lightning (evaluators.knn:KNNEvaluator); use --evaluator squat:Evaluator to run it\n"
    )


def test_a_wrong_plugin_target_is_named_once_without_stray_punctuation(tmp_path, monkeypatch):
    """The messages read `... registered by DIST,: module ...` (a stray ",:")."""
    root = make_distribution(
        tmp_path / "site",
        "wrong-dist",
        {"nope": "wrong_eval:Nope", "notone": "wrong_eval:NotAnEvaluator", "broken": "broken_x:Whatever"},
        {
            "wrong_eval": "class NotAnEvaluator:\n    pass\n",
            "broken_x": "import not_installed_dependency_xyz\n",
        },
    )
    monkeypatch.syspath_prepend(str(root))
    messages = {}
    for name in ("nope", "notone", "broken"):
        with pytest.raises((ValueError, ImportError)) as info:
            get_evaluator_class(name)
        messages[name] = str(info.value)
    assert messages["nope"] == (
        "evaluator 'nope' (wrong_eval:Nope, registered by wrong-dist): module 'wrong_eval' has no attribute 'Nope'"
    )
    assert messages["notone"].startswith(
        "evaluator 'notone' (wrong_eval:NotAnEvaluator, registered by wrong-dist) is not a subclass of "
        "dora_lightning.evaluation.contract.Evaluator (got <class 'wrong_eval.NotAnEvaluator'>)"
    )
    assert messages["broken"].startswith(
        "evaluator 'broken' (broken_x:Whatever, registered by wrong-dist) failed to import: ModuleNotFoundError: "
    )
    assert not any(",:" in m or ", (" in m for m in messages.values()), messages
    for module in ("wrong_eval", "broken_x"):
        sys.modules.pop(module, None)


# ---------------------------------------------------------------------------------------------------- base class
class _Minimal(Evaluator):
    name = "minimal"

    def __init__(self, depth: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.depth = depth

    def evaluate(self, backbone, trainer_kwargs):
        return {"x": 1.0}


def test_protocol_records_the_constructor_arguments(tmp_path):
    evaluator = _Minimal(depth=5, data_dir=str(tmp_path), image_size=64, num_workers=7, output_dir="out")
    protocol = evaluator.protocol()
    assert protocol == {
        "evaluator": "minimal",
        "class_path": f"{__name__}._Minimal",
        "data_dir": str(tmp_path),
        "image_size": 64,
        "batch_size": 256,
        "which": "teacher",
        "depth": 5,
        "data_path": str(tmp_path.resolve()),
    }


def test_evaluator_is_abstract_and_checks_its_arguments():
    with pytest.raises(TypeError):
        Evaluator()  # type: ignore[abstract]
    with pytest.raises(ValueError, match="image_size"):
        _Minimal(image_size=0)
    with pytest.raises(ValueError, match="which"):
        _Minimal(which="both")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------- results
def test_write_results_records_everything(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"weights" * 100)
    metrics = {"knn/top1_k20": 71.25, "knn/top5_k20": 90.5}
    path = write_results(
        tmp_path / "out" / "eval",
        "knn",
        metrics,
        {"ks": (10, 20), "data_dir": Path("data")},
        ckpt,
        backbone={"model_name": "vit_small_patch16_224"},
        command=["dora", "validate", "--evaluator", "knn", "--evaluator.ks", "[10, 20]"],
    )
    assert path == tmp_path / "out" / "eval" / "results_knn.json"
    data = json.loads(path.read_text())
    assert data["evaluator"] == "knn" and data["metrics"] == metrics
    assert data["protocol"] == {"ks": [10, 20], "data_dir": "data"}
    assert data["checkpoint"]["sha256"] == hashlib.sha256(b"weights" * 100).hexdigest()
    assert data["checkpoint"]["size_bytes"] == 700 and data["checkpoint"]["path"] == str(ckpt.resolve())
    assert set(data["versions"]) >= {"python", "torch", "timm", "lightning", "torchmetrics", "dora-lightning"}
    assert data["versions"]["torch"] == package_versions()["torch"] != "not installed"
    assert data["command"] == "dora validate --evaluator knn --evaluator.ks '[10, 20]'"
    assert data["backbone"] == {"model_name": "vit_small_patch16_224"}
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$", data["date"])
    assert not list(path.parent.glob("*.partial"))


def test_format_table():
    table = format_table({"knn/top1_k20": 71.254, "knn/top5_k20": 90.0}, title="knn")
    assert table.splitlines() == [
        "knn",
        "+--------------+-------+",
        "| metric       | value |",
        "+--------------+-------+",
        "| knn/top1_k20 | 71.25 |",
        "| knn/top5_k20 | 90.00 |",
        "+--------------+-------+",
    ]
    assert "| loss   | 0.0123 |" in format_table({"loss": 0.0123})
    assert [format_value(v) for v in (0.001, 0.0, 1.0, float("nan"))] == ["0.001", "0.00", "1.00", "nan"]
