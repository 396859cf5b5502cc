"""`dora fit --config FILE`: a file that is not UTF-8 text, not YAML, empty, or has a section whose keys are all
commented out, or a key given twice in one mapping is refused in one line naming the file (they gave tracebacks, `Unexpected config: `, or, for an empty
`model:` section, silently reset every model option to the code's defaults)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO

from dora_lightning.argument_parser import config_problem
from dora_lightning.cli import main

SECTIONS = {"model", "data", "trainer"}


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("DORA_TRACEBACK", raising=False)
    return tmp_path


def _printed(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/demo.yaml", *argv, "--print_config"])
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "model:\n#  depth: 3\n",
            "section 'model:' is empty (all its keys commented out?); remove the line or give its keys",
        ),
        ("trainer:\n#  max_steps: 3\n", "section 'trainer:' is empty (all its keys commented out?)"),
        ("data:\n", "section 'data:' is empty (all its keys commented out?)"),
        ("model: 3\n", "section 'model:' holds the keys of model.*, got 3"),
        (
            "model:\n  depth: [3\n",
            "not valid YAML: while parsing a flow sequence at line 2, column 10: expected ',' or ']'",
        ),
        ("model:\n\tdepth: 3\n", "not valid YAML: while scanning for the next token: found character '\\t'"),
        ("", "the file is empty (or all comments)"),
        ("# nothing yet\n", "the file is empty (or all comments)"),
        ("- model\n", "a config maps keys to values (model:, data:, trainer:, ...), got a list"),
        (
            "model:\n  base_lr: 0.01\n  depth: 3\n  base_lr: 0.02\n",
            "key 'base_lr' is given twice in one mapping (lines 2 and 4); YAML keeps only the last",
        ),
        (
            "trainer:\n  max_steps: 3\nmodel:\n  depth: 3\ntrainer:\n  max_epochs: 2\n",
            "key 'trainer' is given twice",
        ),
    ],
)
def test_a_broken_config_file_is_one_line_naming_it(text, expected, in_repo, capsys):
    overlay = in_repo / "overlay.yaml"
    overlay.write_text(text)
    status, out, err = _printed(["--config", str(overlay)], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and not out and "Traceback" not in err, err
    assert [line for line in lines if "error:" in line] == lines[-1:], err
    assert lines[-1].startswith(f"dora fit: error: '{overlay}': {expected}"), err


def test_a_config_file_that_is_not_utf8_is_one_line_naming_it(in_repo, capsys):
    """A Latin-1 file (or a checkpoint given to --config by mistake) was a UnicodeDecodeError traceback."""
    overlay = in_repo / "latin1.yaml"
    overlay.write_bytes("model:\n  depth: 3  # café\n".encode("latin-1"))
    status, _, err = _printed(["--config", str(overlay)], capsys)
    assert status == 2 and "Traceback" not in err, err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(f"dora fit: error: '{overlay}': not a UTF-8 text file (byte 0xe9 at position")
    ), err


def test_sections_with_keys_and_other_null_keys_are_taken(in_repo, capsys):
    """An overlay's sections with keys merge as before; a null key that is not a section (ckpt_path) is a value."""
    overlay = in_repo / "overlay.yaml"
    overlay.write_text("model:\n  depth: 3\ndata:\n  batch_size: 4\nckpt_path: null\n")
    status, out, err = _printed(["--config", str(overlay)], capsys)
    config = yaml.safe_load(out)
    assert status == 0, err
    assert config["model"]["depth"] == 3 and config["model"]["backbone"] == "vit_tiny_patch16_224"
    assert config["data"]["batch_size"] == 4 and config["data"]["clip_length"] == 4


def test_config_problem_leaves_keys_that_take_a_value_alone():
    """`evaluator: knn` (dora validate) is a value, not a section: only the parser's option groups are checked."""
    assert config_problem("evaluator: knn\nmodel:\n  depth: 3\n", SECTIONS) is None
    assert config_problem("{model: {depth: 3}}", SECTIONS) is None
    assert config_problem("model:\n", SECTIONS) is not None


def test_yaml_merge_keys_and_the_same_key_in_two_mappings_are_not_duplicates():
    text = "base: &base\n  depth: 3\nmodel:\n  <<: *base\n  depth: 4\ndata:\n  depth: 3\n"
    assert config_problem(text, SECTIONS) is None
