"""benchmarks/learning_targets.py: issue 13's learning targets checked on a comparison summary."""

from __future__ import annotations

import json
import math

from benchmarks.learning_targets import check, main

K = 4096


def summary(**cells: dict[str, float]) -> dict:
    return {
        method: {column: [value, 0.0, 1] for column, value in row.items()} for method, row in cells.items()
    }


GOOD = summary(
    random={"k-NN top-1 (k=20)": 50.0, "DAVIS J&F": 60.0, "feature rank": 20.0},
    dino={
        "k-NN top-1 (k=20)": 56.0,
        "DAVIS J&F": 63.0,
        "teacher entropy": 0.5 * math.log(K),
        "feature rank": 12.0,
    },
    dora={
        "k-NN top-1 (k=20)": 55.0,
        "DAVIS J&F": 64.0,
        "teacher entropy": 0.6 * math.log(K),
        "feature rank": 11.0,
    },
)


def test_all_targets_pass_on_a_run_that_learns():
    results = check(GOOD, K)
    assert len(results) == 9 and all(passed for _, passed, _ in results)


def test_each_target_fails_on_its_own():
    cases = {
        "dino k-NN >= random + 5": ("dino", "k-NN top-1 (k=20)", 54.9),
        "dino DAVIS J&F >= random + 2": ("dino", "DAVIS J&F", 61.9),
        "dino teacher entropy <= 0.9 log K": ("dino", "teacher entropy", 0.91 * math.log(K)),
        "dora feature rank >= random / 2": ("dora", "feature rank", 9.9),
        "DoRA DAVIS J&F >= DINO": ("dora", "DAVIS J&F", 62.9),
    }
    for target, (method, column, value) in cases.items():
        bad = json.loads(json.dumps(GOOD))
        bad[method][column][0] = value
        failed = [name for name, passed, _ in check(bad, K) if passed is False]
        assert failed == [target], (target, failed)


def test_unmeasured_targets_are_not_passed(tmp_path, capsys):
    partial = summary(random={"k-NN top-1 (k=20)": 50.0}, dino={"k-NN top-1 (k=20)": 60.0})
    results = dict((name, passed) for name, passed, _ in check(partial, K))
    assert results["dino k-NN >= random + 5"] is True and results["DoRA DAVIS J&F >= DINO"] is None
    path = tmp_path / "comparison.json"
    path.write_text(json.dumps({"summary": partial}))
    assert main([str(path), "--out_dim", str(K)]) == 0
    assert "n/a " in capsys.readouterr().out
    path.write_text(json.dumps({"summary": summary(random={"DAVIS J&F": 60.0}, dino={"DAVIS J&F": 59.0})}))
    assert main([str(path), "--out_dim", str(K)]) == 1
    assert main([str(tmp_path / "missing.json"), "--out_dim", str(K)]) == 2
