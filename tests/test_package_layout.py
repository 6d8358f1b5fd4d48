"""Who may import whom: precond_service's packages by audience, and the trainer's side."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Package -> the precond_service packages it may import (besides itself).
ALLOWED = {
    "common": set(),
    "client": {"common"},
    "server": {"common", "worker"},
    "worker": {"common"},
}


def imported_packages(directory: Path) -> dict[str, set[str]]:
    """File -> the precond_service subpackages its import lines name."""
    found = {}
    for path in directory.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            for module in modules:
                parts = module.split(".")
                if parts[0] == "precond_service" and len(parts) > 1:
                    names.add(parts[1])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_service_package_imports_only_what_its_audience_may(package):
    for path, names in imported_packages(ROOT / "precond_service" / package).items():
        others = names & set(ALLOWED) - {package}
        assert others <= ALLOWED[package], f"{path} imports precond_service.{others}"


def test_the_trainer_imports_only_the_client_and_the_shared_modules():
    for path, names in imported_packages(ROOT / "trainer").items():
        assert names <= {"client", "common"}, f"{path} imports precond_service.{names}"
