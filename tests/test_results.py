"""scripts/results.py: the README's results tables are what benchmarks/*.json give."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "results.py"


def run(*args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=False
    )


def test_the_readme_tables_match_the_json_on_main():
    result = run("--check")
    assert result.returncode == 0, result.stderr


def test_a_changed_number_in_the_json_fails_the_check_until_regenerated(tmp_path):
    shutil.copytree(REPO_ROOT / "benchmarks", tmp_path / "benchmarks")
    shutil.copy(REPO_ROOT / "README.md", tmp_path / "README.md")
    report = json.loads((REPO_ROOT / "benchmarks" / "convergence.json").read_text())
    summary = report["summary"]["adam"]
    summary["final_dev_loss"] += 0.125
    (tmp_path / "benchmarks" / "convergence.json").write_text(json.dumps(report))
    result = run("--check", f"--root={tmp_path}")
    assert result.returncode == 1
    assert "README.md line" in result.stderr
    assert run(f"--root={tmp_path}").returncode == 0
    assert run("--check", f"--root={tmp_path}").returncode == 0
    assert f"{summary['final_dev_loss']:.3f}" in (tmp_path / "README.md").read_text()
