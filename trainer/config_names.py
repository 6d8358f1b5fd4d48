"""`--config=NAME[:variant]`: a config shipped in the `configs` package, by name.

A value that ends in ".py" or names a directory is a path to a config file; any
other is the name of a module of the installed `configs` package
(`quickstart`, `wmt14_en_fr`, ...), so that an installed trainer runs its shipped
configs from any folder. ml_collections then loads the file as usual.
"""

from __future__ import annotations

import importlib.util
import os
import pkgutil

SHIPPED_PACKAGE = "configs"


def shipped_configs() -> list[str]:
    """Names of the configs the `configs` package ships; [] if it is not importable."""
    spec = importlib.util.find_spec(SHIPPED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(m.name for m in pkgutil.iter_modules(spec.submodule_search_locations))


def config_path(value: str) -> str:
    """The config file `value` ("path.py[:variant]" or "name[:variant]") means, variant kept.

    Args:
        value: The --config flag's value.

    Returns:
        `value` itself when it is a path; "<configs package>/<name>.py[:variant]" for a name.

    Raises:
        ValueError: A name that no shipped config has, with the names there are.
    """
    target, colon, variant = value.partition(":")
    if not target or target.endswith(".py") or os.sep in target or "/" in target:
        return value
    if target in shipped_configs():
        spec = importlib.util.find_spec(f"{SHIPPED_PACKAGE}.{target}")
        return f"{spec.origin}{colon}{variant}"
    raise ValueError(
        f"--config={value}: {target!r} is neither a config file (path/to/file.py) nor a "
        f"shipped config; shipped: {', '.join(shipped_configs()) or 'none found'}"
    )


def resolve_config_flag(argv: list[str]) -> list[str]:
    """`argv` with a `--config` naming a shipped config replaced by that config's path.

    Raises:
        ValueError: As `config_path`.
    """
    resolved = list(argv)
    for i, arg in enumerate(resolved):
        if arg.startswith("--config="):
            resolved[i] = "--config=" + config_path(arg[len("--config=") :])
        elif arg == "--config" and i + 1 < len(resolved):
            resolved[i + 1] = config_path(resolved[i + 1])
    return resolved
