"""scripts/harness.py: the code hash, targets' verdicts and the one JSON schema."""

from __future__ import annotations

import json
import math
import subprocess

import pytest

from scripts import harness


def _tree(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("A = 1\n")
    (tmp_path / "pkg" / "notes.txt").write_text("not code\n")
    return tmp_path


def test_the_code_hash_follows_the_code_and_only_the_code(tmp_path):
    root = _tree(tmp_path)
    first = harness.code_hash(["pkg"], root)
    assert harness.code_hash(["pkg"], root) == first
    (root / "pkg" / "notes.txt").write_text("edited\n")
    assert harness.code_hash(["pkg"], root) == first
    (root / "pkg" / "a.py").write_text("A = 2\n")
    changed = harness.code_hash(["pkg"], root)
    assert changed != first
    (root / "pkg" / "b.py").write_text("")
    assert harness.code_hash(["pkg"], root) not in (first, changed)


def test_comments_docstrings_and_layout_leave_the_code_hash_alone(tmp_path):
    root = _tree(tmp_path)
    (root / "pkg" / "a.py").write_text('def f(x):\n    """Doc."""\n    return x + 1\n')
    first = harness.code_hash(["pkg"], root)
    (root / "pkg" / "a.py").write_text(
        '"""Module doc."""\n\n\ndef f(x):  # a comment\n'
        '    """Other doc."""\n\n    return (x + 1)\n'
    )
    assert harness.code_hash(["pkg"], root) == first
    (root / "pkg" / "a.py").write_text('def f(x):\n    """Doc."""\n    return x + 2\n')
    assert harness.code_hash(["pkg"], root) != first


def test_the_code_hash_skips_ignored_files_in_a_checkout(tmp_path):
    root = _tree(tmp_path)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    (root / ".gitignore").write_text("pkg/generated.py\n")
    first = harness.code_hash(["pkg"], root)
    (root / "pkg" / "generated.py").write_text("X = 1\n")
    assert harness.code_hash(["pkg"], root) == first
    assert harness.source_files(["pkg"], root) == ["pkg/a.py"]


@pytest.mark.parametrize(
    ("value", "threshold", "met"),
    [
        (0.6, "<= 0.65", True),
        (0.65, "<= 0.65", True),
        (0.75, "<= 0.65", False),
        (3.0, ">= 2.0", True),
        (1.0, ">= 2.0", False),
        (-0.1, "< 0", True),
        (0.0, "< 0", False),
        (None, "<= 1", False),
        (math.nan, ">= 0", False),
    ],
)
def test_a_target_keeps_its_value_threshold_and_computed_verdict(value, threshold, met):
    row = harness.target(value, threshold)
    assert row["met"] is met and row["threshold"] == threshold
    assert row["value"] is value


def test_a_threshold_without_an_operator_is_refused():
    with pytest.raises(ValueError, match="expected one of"):
        harness.target(1.0, "0.5")


def test_a_report_has_the_schema_metadata_and_a_json_safe_body(tmp_path):
    out = tmp_path / "thing.json"
    targets = {"fast enough": harness.target(1.0, "<= 2")}
    harness.write(
        out, "thing", harness.COMMON, {"loss": math.inf, "gap": math.nan}, targets, {"cpus": "1"}
    )
    report = json.loads(out.read_text())
    assert set(report) == {"schema", "benchmark", "metadata", "targets", "results"}
    assert report["schema"] == harness.SCHEMA and report["benchmark"] == "thing"
    assert report["results"] == {"loss": "inf", "gap": None}
    assert report["targets"]["fast enough"]["met"] is True
    meta = report["metadata"]
    assert meta["sources"] == sorted([*harness.COMMON, *harness.HARNESS])
    assert meta["code_hash"] == harness.code_hash(meta["sources"])
    assert meta["split"] == {"cpus": "1"}
    for key in ("git_commit", "git_dirty", "cpu_model", "cpu_count", "blas", "command", "date"):
        assert key in meta
    assert {"python", "numpy", "grpcio", "tensorflow"} <= set(meta["versions"])
