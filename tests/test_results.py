"""scripts/results.py: the README's summary and docs/RESULTS.md are what benchmarks/*.json give."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

from scripts import harness, results

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "results.py"


def run(*args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=False
    )


def _copy_documents(tmp_path: Path) -> None:
    shutil.copytree(REPO_ROOT / "benchmarks", tmp_path / "benchmarks")
    (tmp_path / "docs").mkdir()
    shutil.copy(REPO_ROOT / "README.md", tmp_path / "README.md")
    shutil.copy(REPO_ROOT / "docs" / "RESULTS.md", tmp_path / "docs" / "RESULTS.md")


def test_the_documents_match_the_json_on_main():
    result = run("--check")
    assert result.returncode == 0, result.stderr


def test_a_changed_number_in_the_json_fails_the_check_until_regenerated(tmp_path):
    _copy_documents(tmp_path)
    path = tmp_path / "benchmarks" / "convergence.json"
    report = json.loads(path.read_text())
    summary = report["results"]["summary"]["adam"]
    summary["final_dev_loss"] += 0.125
    path.write_text(json.dumps(report))

    result = run("--check", f"--root={tmp_path}")

    assert result.returncode == 1
    assert "README.md line" in result.stderr or "docs/RESULTS.md line" in result.stderr
    assert run(f"--root={tmp_path}").returncode == 0
    assert run("--check", f"--root={tmp_path}").returncode == 0
    shown = f"{summary['final_dev_loss']:.3f}"
    assert shown in (tmp_path / "README.md").read_text()
    assert shown in (tmp_path / "docs" / "RESULTS.md").read_text()


def test_a_changed_figure_that_no_table_shows_fails_the_check_too(tmp_path):
    _copy_documents(tmp_path)
    path = tmp_path / "benchmarks" / "convergence.json"
    report = json.loads(path.read_text())
    report["results"]["best_runs"]["adam"]["points"][0]["train_loss"] += 1.0
    path.write_text(json.dumps(report, indent=1) + "\n")
    result = run("--check", f"--root={tmp_path}")
    assert result.returncode == 1 and "docs/RESULTS.md line" in result.stderr


def test_verdicts_are_quoted_as_the_run_computed_them(tmp_path):
    _copy_documents(tmp_path)
    path = tmp_path / "benchmarks" / "convergence.json"
    report = json.loads(path.read_text())
    report["targets"] = {"a target": {"value": 5.0, "threshold": "<= 1", "met": True}}
    path.write_text(json.dumps(report))
    assert run(f"--root={tmp_path}").returncode == 0
    text = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "| a target | <= 1 | 5 | **yes** |" in text


def test_a_result_outside_the_schema_is_refused_by_name(tmp_path):
    _copy_documents(tmp_path)
    (tmp_path / "benchmarks" / "old.json").write_text(json.dumps({"results": []}))
    result = run("--check", f"--root={tmp_path}")
    assert result.returncode == 1
    assert "benchmarks/old.json is not a harness result" in result.stderr


def _git(root: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=root,
        check=True,
        capture_output=True,
    )


def test_a_result_is_current_until_its_sources_change(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("A = 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "one")
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True
    ).stdout.strip()
    meta = {
        "git_commit": commit,
        "git_dirty": False,
        "sources": ["pkg"],
        "code_hash": harness.code_hash(["pkg"], tmp_path),
    }
    report = {"metadata": meta}
    assert results.stale_reasons(report, tmp_path) == []

    (tmp_path / "pkg" / "a.py").write_text("A = 2\n")
    assert results.stale_reasons(report, tmp_path) == [
        "its sources changed since it ran (code hash differs)"
    ]
    report["metadata"] = {**meta, "git_commit": "0" * 40, "git_dirty": True}
    (tmp_path / "pkg" / "a.py").write_text("A = 1\n")
    reasons = results.stale_reasons(report, tmp_path)
    assert reasons[0] == "ran on uncommitted code" and "not an ancestor" in reasons[1]
