"""Start-up without TensorFlow's native noise, unless asked for.

TensorFlow prints lines on a CPU machine that are not about the user's run (oneDNN is
on, no CUDA driver, cuInit failed), some of them from C++ before its own log level is
read. `quiet_tensorflow_start()` sets `TF_CPP_MIN_LOG_LEVEL` to 3 unless the user set
it, and filters those known lines out of whatever the process writes to its standard
error while TensorFlow is imported; every other line is written out as it was. To
see everything, set `TF_CPP_MIN_LOG_LEVEL=0` (or 1).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator

# Lines TensorFlow writes at start on a CPU-only machine that carry nothing for a user.
NOISE = (
    "All log messages before absl::InitializeLog() is called",
    "oneDNN custom operations are on",
    "Could not find cuda drivers on your machine",
    "failed call to cuInit",
    "Unable to register cu",
    "TF-TRT Warning",
)


@contextlib.contextmanager
def quiet_tensorflow_start() -> Iterator[None]:
    """Imports under this block write TensorFlow's start-up noise nowhere.

    With `TF_CPP_MIN_LOG_LEVEL` set to 0 or 1 by the user (asking for TensorFlow's
    informational lines), nothing is filtered.
    """
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") in ("0", "1"):
        yield
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode("utf-8", errors="replace").splitlines():
                if not any(noise in line for noise in NOISE):
                    print(line, file=sys.stderr)
