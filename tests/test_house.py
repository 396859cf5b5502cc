"""The house rules that a test can check: imports run one way, and `dora --help` is light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_dora_lightning_never_imports_evaluators() -> None:
    """The plugin contract lives in the host; plugins depend on it, never the reverse (also no lazy imports)."""
    offenders = {
        str(path.relative_to(REPO)): sorted(
            m for m in _imported_modules(path) if m.split(".")[0] == "evaluators"
        )
        for path in (REPO / "dora_lightning").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_math_never_imports_lightning() -> None:
    for path in (REPO / "dora_lightning" / "core").rglob("*.py"):
        assert not {m for m in _imported_modules(path) if m.split(".")[0] == "lightning"}, path


def test_dora_help_answers_without_importing_torch() -> None:
    code = (
        "import sys\nfrom dora_lightning.command import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
        "    assert e.code == 0\nprint(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning')))"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert "fit" in run.stdout and "validate" in run.stdout and "export" in run.stdout
    assert run.stdout.strip().splitlines()[-1] == "[]"
