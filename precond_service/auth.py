"""The shared token: where the service, its clients and the trainer read it from."""

from __future__ import annotations

import os
import pathlib

TOKEN_ENV = "PRECOND_SERVICE_TOKEN"


def read_token(token_file: str | None) -> str | None:
    """The token in `token_file`, else $PRECOND_SERVICE_TOKEN; None when neither is set.

    Raises:
        OSError: `token_file` is given but cannot be read.
    """
    if token_file:
        return pathlib.Path(token_file).read_text().strip() or None
    return os.environ.get(TOKEN_ENV) or None
