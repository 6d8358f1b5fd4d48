"""The one harness every benchmark uses: metadata, JSON schema, targets, code hash, plots.

A benchmark is a module run from the repository root (`python -m scripts.bench_roots`).
It names the source files it exercises; its JSON then records, under one schema:

    {"schema": 1, "benchmark": NAME,
     "metadata": {commit, dirty flag, code hash of those sources, CPU, BLAS, library
                  versions, command line, date, device/host split},
     "targets": {DESCRIPTION: {"value", "threshold", "met"}},
     "results": {... the benchmark's own figures ...}}

`met` is the verdict the run computed from its value and threshold; the documents quote
it and never recompute it. The code hash is what makes a figure traceable: a result is
current while the hash of its sources at HEAD equals the one it records
(`python scripts/results.py --fresh`), and the training runs' cache is keyed by it.
"""

from __future__ import annotations

import ast
import datetime
import hashlib
import importlib.metadata
import json
import logging
import math
import operator
import os
import pathlib
import platform
import subprocess
import sys
from collections.abc import Iterable, Sequence
from typing import Any

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SCHEMA = 1

# Source trees, by what a benchmark exercises (paths relative to the repository root).
PROTOS = ("protos",)
COMMON = ("precond_service/common",)
SERVICE = ("precond_service", *PROTOS)
PRODUCT = ("trainer", "configs", *SERVICE)
HARNESS = ("scripts/harness.py",)

_CODE_SUFFIXES = (".py", ".proto", ".sh")
_LIBRARIES = (
    "tensorflow",
    "keras",
    "numpy",
    "grpcio",
    "protobuf",
    "sentencepiece",
    "sacrebleu",
    "tensorflow-datasets",
)
_OPERATORS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}

log = logging.getLogger("harness")


def _git(*args: str, root: pathlib.Path = REPO_ROOT) -> str | None:
    try:
        result = subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=root
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip()


def git_commit() -> str | None:
    """HEAD's commit, or None outside a git checkout."""
    return _git("rev-parse", "HEAD") or None


def git_dirty() -> bool | None:
    """Whether the code differs from HEAD (None outside a git checkout).

    Benchmark outputs (benchmarks/) are not code: a benchmark run after another in the
    same checkout is not dirty for the first one's result file.
    """
    status = _git("status", "--porcelain", "--", ".", ":(exclude)benchmarks")
    return None if status is None else bool(status)


def source_files(sources: Iterable[str], root: pathlib.Path = REPO_ROOT) -> list[str]:
    """The code files under `sources` (files or folders), relative to `root`, sorted.

    Tracked and untracked-but-not-ignored files count (so an uncommitted new module
    changes the hash); generated caches and ignored build outputs do not.
    """
    sources = list(sources)
    listed = _git("ls-files", "-co", "--exclude-standard", "--", *sources, root=root)
    if listed is None:  # not a git checkout: walk the folders
        names = set()
        for source in sources:
            path = root / source
            found = [path] if path.is_file() else path.rglob("*")
            names.update(str(p.relative_to(root)) for p in found if p.is_file())
    else:
        names = set(listed.splitlines())
    return sorted(
        name for name in names if name.endswith(_CODE_SUFFIXES) and (root / name).is_file()
    )


def code_hash(sources: Iterable[str], root: pathlib.Path = REPO_ROOT) -> str:
    """SHA-256 over the paths and code of the files under `sources`.

    A Python file counts by its syntax tree without docstrings, so comments, docstrings
    and layout (what documentation edits touch) leave the hash alone; any change to
    what the code does changes it. Other files count by their bytes.
    """
    digest = hashlib.sha256()
    for name in source_files(sources, root):
        digest.update(name.encode() + b"\0")
        digest.update(_code_bytes(root / name) + b"\0")
    return digest.hexdigest()


def _code_bytes(path: pathlib.Path) -> bytes:
    data = path.read_bytes()
    if path.suffix != ".py":
        return data
    try:
        tree = ast.parse(data)
    except SyntaxError:
        return data
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree).encode()


def _cpu_model() -> str | None:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _blas() -> dict | None:
    try:
        import numpy as np

        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except (ImportError, KeyError, TypeError, ValueError):  # older NumPy: no dicts mode
        return None
    return {key: blas.get(key) for key in ("name", "version", "openblas configuration")}


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def command_line() -> str:
    """How this benchmark was started, as a user would type it from the repository root."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0]}"
    return " ".join([head, *sys.argv[1:]])


def metadata(sources: Sequence[str], split: dict[str, Any] | None = None) -> dict[str, Any]:
    """Where and on what code a benchmark ran.

    Args:
        sources: Files and folders the benchmark exercises (`HARNESS` is added).
        split: The device/host split of the run (which cores trained, which served),
            or None where the benchmark has none.
    """
    sources = sorted({*sources, *HARNESS})
    return {
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "sources": sources,
        "code_hash": code_hash(sources),
        "command": command_line(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": sorted(os.sched_getaffinity(0)),
        "load_average": list(os.getloadavg()),
        "platform": platform.platform(),
        "blas": _blas(),
        "versions": _versions(),
        "split": split,
    }


def target(value: float | None, threshold: str) -> dict[str, Any]:
    """A target's row: its value, its threshold ("<= 0.65") and the verdict computed now.

    A missing value (the run never got there) does not meet any threshold.
    """
    op, _, limit = threshold.partition(" ")
    if op not in _OPERATORS:
        raise ValueError(
            f"threshold {threshold!r}: expected one of {sorted(_OPERATORS)}, a space, a number"
        )
    met = value is not None and not _is_nan(value) and _OPERATORS[op](value, float(limit))
    return {"value": value, "threshold": threshold, "met": bool(met)}


def _is_nan(value: float) -> bool:
    return isinstance(value, float) and math.isnan(value)


def json_safe(value: Any) -> Any:
    """`value` with infinities as "inf" and NaN as None, which JSON can hold."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def write(
    path: str | pathlib.Path,
    benchmark: str,
    sources: Sequence[str],
    results: dict[str, Any],
    targets: dict[str, dict[str, Any]] | None = None,
    split: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes a benchmark's JSON under the one schema and returns it.

    Args:
        path: Output file, relative to the repository root or absolute.
        benchmark: The benchmark's name (its JSON file's stem by convention).
        sources: What it exercises (see `metadata`).
        results: Its own figures.
        targets: Description -> `target(...)` row.
        split: The device/host split (see `metadata`).
    """
    report = {
        "schema": SCHEMA,
        "benchmark": benchmark,
        "metadata": metadata(sources, split),
        "targets": targets or {},
        "results": results,
    }
    out = REPO_ROOT / path
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_safe(report), indent=1) + "\n")
    log.info("wrote %s", out)
    return report


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | pathlib.Path) -> None:
    """Lays out `fig` and writes it to `path` (relative to the repository root) as PNG."""
    path = REPO_ROOT / path
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    log.info("wrote %s", path)
