"""What the server checks in a received block, or a request's run_id and known_steps.

Every check raises `ValueError` with the reason the client gets back in
`PushStatisticsReply.rejected`; a bad block never reaches a worker, and never
affects the other blocks of the message or other runs.

The checks run on the receive path, so each costs at most one pass over the
matrix: dtype, shape and byte length, size limit, finite values. Symmetry is checked
here on `SYMMETRY_SAMPLE` rows against the matching columns (all of them for a small
matrix), which catches a matrix that is not a statistic at all (garbage, a wrong
layout) at the cost of a few rows; the full check, `max|A - A^T|` over every entry,
runs in the worker (`roots.validate_statistic`, same tolerance), where a failure is
counted and logged like any root that is not published. The full check here cost
2.5 ms per 4 MiB block, more than everything else on the receive path together.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

from precond_service.common import wire
from precond_service.common.eigenbasis import PRECONDITIONERS
from precond_service.common.root_settings import RootSettings
from precond_service.common.roots import METHODS, RIDGE_MODES
from protos import precond_service_pb2 as pb

# Longest block key accepted, in characters; keys are names, not payloads.
MAX_KEY_LENGTH = 1024

# Characters of a bad setting's value echoed back in a rejection's reason.
_ECHOED_CHARACTERS = 40

# Relative asymmetry max|A - A^T| / max|A| above which a statistic is rejected: a
# float32 sum of G G^T is symmetric to rounding, far below this. The workers pass the
# same value to `roots` for the full check.
SYMMETRY_TOLERANCE = 1e-4

# Rows compared with their columns in the receive-path symmetry check; a matrix with
# at most this many rows is checked in full.
SYMMETRY_SAMPLE = 32


@dataclasses.dataclass(frozen=True)
class ValidBlock:
    """A statistic that passed every check.

    Attributes:
        key: Block key, non-empty.
        step: Step of the statistic, >= 0.
        exponent: p of the inverse p-th root, >= 1.
        matrix: Read-only square float32 or float64 matrix, finite and symmetric.
        settings: The block's own root settings (None: the service's flags).
    """

    key: str
    step: int
    exponent: int
    matrix: np.ndarray
    settings: RootSettings = RootSettings()


def decode_block(
    message: pb.BlockStatistics, *, max_matrix_size: int, matrix: np.ndarray | None = None
) -> ValidBlock:
    """Checks one received statistic and returns it decoded.

    Args:
        message: The block as received.
        max_matrix_size: Largest matrix side n accepted.
        matrix: The matrix of a statistic sent in chunks (`chunks.ChunkAssembler`),
            of the message's shape and dtype; None: the message's own data.

    Returns:
        The decoded block; its matrix views the message's bytes.

    Raises:
        ValueError: With the reason, if the key is empty or too long, the step is
            negative, the exponent is below 1, the tensor is malformed (unknown
            dtype, byte length not matching the shape), the matrix is not square,
            larger than `max_matrix_size`, not finite or not symmetric, or a root
            setting is out of range (see `decode_settings`).
    """
    settings = decode_settings(message)
    if not message.key:
        raise ValueError("empty key: every block needs a non-empty key")
    if len(message.key) > MAX_KEY_LENGTH:
        raise ValueError(f"key has {len(message.key)} characters, more than {MAX_KEY_LENGTH}")
    if message.step < 0:
        raise ValueError(f"step must be >= 0, got {message.step}")
    if message.exponent < 1:
        raise ValueError(f"exponent must be >= 1, got {message.exponent}")
    if not message.HasField("statistics"):
        raise ValueError("no statistics tensor")
    rank = len(message.statistics.shape)
    if rank != 2:  # The rank alone: a hostile shape may have millions of dimensions.
        raise ValueError(f"statistics must be a square n x n matrix, got {rank} dimensions")
    shape = list(message.statistics.shape)
    if shape[0] != shape[1] or shape[0] < 1:
        raise ValueError(f"statistics must be a square n x n matrix with n >= 1, got shape {shape}")
    if shape[0] > max_matrix_size:
        raise ValueError(
            f"matrix side {shape[0]} exceeds the service's max_matrix_size {max_matrix_size}; "
            "use smaller blocks or start the service with a larger --max_matrix_size"
        )
    if matrix is None:
        matrix = wire.tensor_to_array(message.statistics)
    # max and min propagate NaN and reach infinities: one pass each, no temporary.
    largest, smallest = float(matrix.max()), float(matrix.min())
    if not (math.isfinite(largest) and math.isfinite(smallest)):
        raise ValueError("statistics contain NaN or infinity")
    scale = max(largest, -smallest)
    asymmetry = _sampled_asymmetry(matrix)
    if asymmetry > SYMMETRY_TOLERANCE * scale:
        raise ValueError(
            f"statistics are not symmetric: |A - A^T| reaches {asymmetry:.3g} with max|A| = "
            f"{scale:.3g}"
        )
    return ValidBlock(message.key, message.step, message.exponent, matrix, settings)


def decode_settings(message: pb.BlockStatistics) -> RootSettings:
    """Checks and returns the root settings a block carries.

    Raises:
        ValueError: With the reason, if ridge_epsilon is set and not in (0, 1),
            failure_threshold is set and not finite and > 0, or method or ridge_mode
            is set and not one of `roots.METHODS` or `roots.RIDGE_MODES`, or
            preconditioner is set and not one of `eigenbasis.PRECONDITIONERS`.
    """
    ridge = message.ridge_epsilon if message.HasField("ridge_epsilon") else None
    threshold = message.failure_threshold if message.HasField("failure_threshold") else None
    if ridge is not None and not 0 < ridge < 1:
        raise ValueError(
            f"ridge_epsilon must be in (0, 1), got {ridge!r}; leave it unset for the "
            "service's --ridge_epsilon"
        )
    if threshold is not None and not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(
            f"failure_threshold must be finite and > 0, got {threshold!r}; leave it unset for "
            "the service's --failure_threshold"
        )
    if message.ridge_mode and message.ridge_mode not in RIDGE_MODES:
        raise ValueError(
            f"ridge_mode must be one of {RIDGE_MODES} (or empty for the service's "
            f"--ridge_mode), got {message.ridge_mode[:_ECHOED_CHARACTERS]!r}"
        )
    if message.method and message.method not in METHODS:
        raise ValueError(
            f"method must be one of {METHODS} (or empty for the service's --method), got "
            f"{message.method[:_ECHOED_CHARACTERS]!r}"
        )
    if message.preconditioner and message.preconditioner not in PRECONDITIONERS:
        raise ValueError(
            f"preconditioner must be one of {PRECONDITIONERS} (or empty for a root), got "
            f"{message.preconditioner[:_ECHOED_CHARACTERS]!r}"
        )
    return RootSettings(
        ridge,
        threshold,
        message.method or None,
        message.ridge_mode or None,
        message.preconditioner or None,
    )


def _sampled_asymmetry(matrix: np.ndarray) -> float:
    """Returns max|A[i, :] - A[:, i]| over SYMMETRY_SAMPLE random rows i (all if fewer)."""
    n = matrix.shape[0]
    if n <= SYMMETRY_SAMPLE:
        rows = np.arange(n)
    else:
        rows = np.random.default_rng().choice(n, size=SYMMETRY_SAMPLE, replace=False)
    difference = matrix[rows, :] - matrix[:, rows].T
    return float(np.abs(difference).max())


def check_run_id(run_id: str, *, max_length: int) -> None:
    """Checks the run_id of a push, pull or DropRun.

    Args:
        run_id: As received.
        max_length: Most characters accepted (`ServiceConfig.max_run_id_length`).

    Raises:
        ValueError: If it is empty or longer than `max_length`.
    """
    if not run_id:
        raise ValueError("empty run_id: every request names its run")
    if len(run_id) > max_length:
        raise ValueError(
            f"run_id has {len(run_id)} characters, more than max_run_id_length={max_length}; "
            "use a shorter run_id or start the service with a larger --max_run_id_length"
        )


def check_known_steps(known_steps: Mapping[str, int], *, max_entries: int) -> None:
    """Checks the known_steps map of a GetPreconditioners request.

    Args:
        known_steps: key -> stats_step the client holds.
        max_entries: Most entries accepted (`ServiceConfig.max_blocks_per_request`).

    Raises:
        wire.RequestTooLargeError: If it has more than `max_entries` entries.
        ValueError: If a key is longer than any block key can be.
    """
    if len(known_steps) > max_entries:
        raise wire.RequestTooLargeError(
            f"known_steps has {len(known_steps)} entries, more than max_blocks_per_request="
            f"{max_entries}; a client lists at most one per key of its run"
        )
    for key in known_steps:
        if len(key) > MAX_KEY_LENGTH:
            raise ValueError(
                f"known_steps has a key of {len(key)} characters, more than {MAX_KEY_LENGTH}: "
                "no block has such a key"
            )


def check_run_digest(digest: str) -> None:
    """Checks a run digest as GetStatus shows it (`auth.run_digest`).

    Raises:
        ValueError: If it is not 12 lowercase hex digits.
    """
    if len(digest) != 12 or digest.strip("0123456789abcdef"):
        raise ValueError(
            f"run_digest must be the 12 lowercase hex digits GetStatus shows, got {digest[:40]!r}"
        )
