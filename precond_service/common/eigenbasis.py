"""Eigenbases of symmetric PSD statistics, in float64 NumPy: the basis Adam runs in (SOAP).

A statistic says what it wants back (`PRECONDITIONERS`): its inverse p-th root
(`roots.inverse_pth_root`, Shampoo's update) or its eigenbasis, the orthogonal Q with
`A = Q·diag(λ)·Qᵀ` and λ in descending order. With Q_L and Q_R of a block's two
factors, the optimizer runs Adam on `Q_Lᵀ G Q_R` (Vyas et al. 2024, "SOAP",
arXiv 2409.11321; George et al. 2018, eigenvalue-corrected Kronecker factorization).

The basis is a full float64 `numpy.linalg.eigh` every time, not the reference's cheaper
step (one QR power iteration warm-started from the previous basis): measured here on
one BLAS thread (`scripts/bench_roots.py --eigenbasis`), eigh costs only 1.1–1.4× that
step at n = 128…1024, gives the exact basis rather than an approximation of it, and
needs no per-key state in the service, so a restarted service or a new shard gives the
same basis. Eigenvalues are sorted in descending order, so that entry i of Adam's
second moment stays with the i-th largest eigenvalue when a new basis is installed
(what the reference's permutation by eigenvalue estimates does).
"""

from __future__ import annotations

import numpy as np

from precond_service.common import roots

# What a statistic may ask for: Shampoo's inverse root, or Adam's rotated coordinates.
PRECONDITIONERS = ("root", "eigenbasis")
# The `method` a published eigenbasis carries, so that a client can tell it from a root.
EIGENBASIS_METHOD = "eigenbasis"


def eigenbasis(
    matrix: np.ndarray, *, failure_threshold: float = 0.1, symmetry_tolerance: float = 1e-4
) -> roots.RootResult:
    """The eigenvectors of one statistic, as the columns of Q, largest eigenvalue first.

    Args:
        matrix: Symmetric PSD [n, n] statistic, float32 or float64.
        failure_threshold: A basis whose orthogonality error `max|QᵀQ − I|` is above
            this (or not finite) is returned with `converged=False`.
        symmetry_tolerance: See `roots.validate_statistic`.

    Returns:
        A `RootResult` whose `root` is Q (float64), `error` its orthogonality error,
        `method` `EIGENBASIS_METHOD`, 0 iterations and no ridge.

    Raises:
        ValueError: For an invalid statistic (see `roots.validate_statistic`).
    """
    statistic = roots.validate_statistic(matrix, 1, symmetry_tolerance=symmetry_tolerance)
    try:
        _, vectors = np.linalg.eigh(statistic)
    except np.linalg.LinAlgError:
        nan = np.full_like(statistic, np.nan)
        return roots.RootResult(nan, float("inf"), 0, 0.0, EIGENBASIS_METHOD, False)
    basis = np.ascontiguousarray(vectors[:, ::-1])
    gram = basis.T @ basis
    gram.reshape(-1)[:: gram.shape[0] + 1] -= 1.0
    error = float(np.max(np.abs(gram)))
    converged = bool(np.isfinite(error) and error <= failure_threshold)
    return roots.RootResult(basis, error, 0, 0.0, EIGENBASIS_METHOD, converged)


def batched_eigenbasis(
    matrices: np.ndarray, *, failure_threshold: float = 0.1
) -> roots.BatchedRootResult:
    """`eigenbasis` of each statistic of a [k, n, n] stack; a rejected block is all NaN."""
    stack = np.asarray(matrices)
    count, n = stack.shape[0], stack.shape[1]
    bases = np.full((count, n, n), np.nan)
    errors = np.full(count, np.inf)
    converged = np.zeros(count, dtype=bool)
    for index in range(count):
        try:
            result = eigenbasis(stack[index], failure_threshold=failure_threshold)
        except ValueError:
            continue
        bases[index], errors[index], converged[index] = result.root, result.error, result.converged
    return roots.BatchedRootResult(
        bases, errors, np.zeros(count, np.int64), np.zeros(count), converged, EIGENBASIS_METHOD
    )


def compute(
    matrix: np.ndarray, exponent: int, *, preconditioner: str = "root", **options: object
) -> roots.RootResult:
    """What the statistic asked for: its inverse `exponent`-th root, or its eigenbasis.

    Args:
        matrix: Symmetric PSD [n, n] statistic.
        exponent: p of the inverse root (unused for an eigenbasis).
        preconditioner: One of `PRECONDITIONERS`.
        **options: Keyword arguments of `roots.inverse_pth_root`; an eigenbasis uses
            `failure_threshold` and `symmetry_tolerance` of them.

    Raises:
        ValueError: For an invalid statistic, argument or `preconditioner`.
    """
    if preconditioner == "eigenbasis":
        return eigenbasis(
            matrix,
            failure_threshold=float(options.get("failure_threshold", 0.1)),
            symmetry_tolerance=float(options.get("symmetry_tolerance", 1e-4)),
        )
    if preconditioner != "root":
        raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {preconditioner!r}")
    return roots.inverse_pth_root(matrix, exponent, **options)
