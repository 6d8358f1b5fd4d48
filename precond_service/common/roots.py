# Over 400 lines: the solvers, their scaling and stopping rules are one piece of numerics.
"""Inverse p-th roots of symmetric PSD statistics, in float64 NumPy.

The preconditioner service turns each Shampoo statistic `A` into `(A + ridge·I)^(-1/p)`
here. Two methods:

* `"schur_newton"`: the coupled Newton iteration of Higham, *Functions of Matrices*,
  eq. 7.18 (the method of Anil et al., arXiv 2002.09018). Only matrix products, so it
  runs at BLAS-3 speed. The production method.
* `"eigh"`: an eigendecomposition. The reference the first is checked against.

Two ridges (`RIDGE_MODES`):

* `"relative"` (the default, Anil et al.'s): `A_r = A + ε·λmax(A)·I` always, with λmax
  from a seeded power iteration (`estimate_max_eigenvalue`). When λmax is not positive
  (the all-zero statistic early in training) the ridge falls back to the absolute `ε·I`,
  so the root `ε^(-1/p)·I` is finite.
* `"absolute_if_needed"` (the choice of Meta's DistributedShampoo): `A_r = A` when its
  smallest eigenvalue is at least ε (a Cholesky factorization of `A − ε·I` succeeds),
  else `A + ε·I`. Either way ε bounds the spectrum of A_r from below. ε is then an
  absolute value (the reference uses 1e-12); a retry adds ε ten times larger.

Coupled Newton keeps `M = H^p·A_r` invariant while M goes to I, so H goes to
`A_r^(-1/p)`. One step, with a positive scalar c:

    M_i = ((p+1)·I − c·M) / p;    M ← M_i^p · (c·M);    H ← c^(1/p) · H · M_i.

On an eigenvalue x of M the step is the scalar map `x ↦ f(c·x)` with
`f(y) = y·((p+1−y)/p)^p`, which rises on [0, 1] to f(1) = 1 and falls to 0 at p+1.
Higham's iteration takes `c = z = (1+p)/(2‖A_r‖_F)` on the first step and c = 1
afterwards (`scaling="none"`); small eigenvalues then grow only by about
`((p+1)/p)^p` per step (≈2.4 for p = 4). With `scaling="dynamic"` (the default) an
interval [lo, hi] holding the spectrum of M is carried along as scalars (initially the
ridge and an upper bound of λmax(A_r)) and each step takes the c with
`f(c·lo) = f(c·hi)`, which maps the interval into the narrowest `[lo', 1]`; lo/hi then
grows about 12× per step for p = 4, and half as many steps are needed at condition
number 1e6. (The lower end is the ridge whatever the true condition number, so the
step count is about that of condition number 1/ε.) Once the interval is within
`_SCALING_STOP` of 1 the iteration goes on unscaled and converges quadratically.

Stopping, as in DESIGN.md: when `max|M − I|` is below the tolerance, after
`max_iterations`, or when the error stops shrinking; a step whose error grows more
than 1.2× is dropped and the previous iterate kept. In the scaled phase the error is not
expected to shrink (the interval is), so there a step is dropped when its error exceeds
1.2× the largest value the interval allows, 1. In the unscaled phase, when the tracked
interval (checked against a power-iteration estimate of ‖M − I‖₂) shows that
multiplying H by a low-order Taylor polynomial of `M^(-1/p)` will bring the error under
the tolerance, that last step updates H only (M is not formed), and the error reported
is the bound it was chosen by (see `_finishing_order`).

Cost: every product is between commuting symmetric matrices, so only the upper block
triangle is multiplied (`_symmetric_product`, about 0.65 of a general product's time at
n = 1024). A step costs log2(p) + 2 such products when p is a power of two.

A result whose error is above `failure_threshold` or not finite is retried with a ridge
ten times larger (always added), up to `max_retries` times, and then returned with
`converged=False`.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
from typing import Any

import numpy as np

METHODS = ("schur_newton", "eigh")
RIDGE_MODES = ("relative", "absolute_if_needed")
SCALINGS = ("dynamic", "none")

# Power-iteration steps for λmax. After this many, a random start underestimates λmax
# by more than the 1/_LAMBDA_MARGIN slack below with probability of order √n·0.8^100,
# about 1e-8 (Kuczyński & Woźniakowski 1992).
_POWER_ITERATIONS = 100
# Safety factor on the power-iteration λmax when it bounds the spectrum of A_r from
# above on the first attempt. Overestimating costs a small part of a step; an
# underestimate makes the first step overshoot (for even p only a slower start; for odd
# p the guard stops it and the retry uses the Frobenius norm instead).
_LAMBDA_MARGIN = 1.25
# Dynamic scaling stops once the spectrum interval lies within this distance of 1.
_SCALING_STOP = 1e-2
# Highest Taylor order of the H-only finishing step (see `_finishing_order`).
_MAX_FINISH_ORDER = 3
# Power-iteration steps for the estimate of ‖M − I‖₂ that confirms a finishing step,
# and the factor it is taken up by (the estimate is never above the true norm).
_DISTANCE_ITERATIONS = 20
_DISTANCE_MARGIN = 1.5
# The DESIGN's divergence guard: a step whose error grows more than this is dropped.
_GROWTH_LIMIT = 1.2
# Each retry multiplies the relative ridge by this.
_RIDGE_GROWTH = 10.0
# Bisection halvings for the dynamic scale (interval shrinks by 2^-60, below float64).
_BISECTION_STEPS = 60
# Symmetric products split into at most this many row blocks of at least this many rows.
_PRODUCT_BLOCKS = 8
_MIN_PRODUCT_BLOCK = 128

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RootResult:
    """The inverse p-th root of one statistic.

    Attributes:
        root: float64 [n, n] approximation of `(A + ridge·I)^(-1/p)`.
        error: Final residual `max|M − I|` of the iteration's `M = root^p·A_r` (an
            upper bound of it when the last step updated H only, see the module
            docstring); for eigh, `max|root^p·A_r − I|`. inf when the iteration broke
            down. Recomputed from the returned root, the residual also carries rounding
            amplified by about `cond(A_r)^(2/p)`: 4e-7 at condition 1e5 and p = 2 for a
            root within 1e-11 of the exact one.
        iterations: Iterations of the last attempt (0 for eigh).
        ridge_epsilon: The ridge ε of the last attempt (relative or absolute, as the
            ridge mode says); for "absolute_if_needed" it was added only if needed.
        method: "schur_newton" or "eigh".
        converged: True when `error` is finite and at most `failure_threshold`.
    """

    root: np.ndarray
    error: float
    iterations: int
    ridge_epsilon: float
    method: str
    converged: bool


@dataclasses.dataclass(frozen=True)
class BatchedRootResult:
    """Inverse p-th roots of a stack of statistics, one entry per block.

    Attributes:
        roots: float64 [k, n, n]; all-NaN for a block whose input was rejected.
        errors: float64 [k]; inf for a rejected block.
        iterations: int64 [k].
        ridge_epsilons: float64 [k].
        converged: bool [k].
        method: "schur_newton" or "eigh".
    """

    roots: np.ndarray
    errors: np.ndarray
    iterations: np.ndarray
    ridge_epsilons: np.ndarray
    converged: np.ndarray
    method: str


def validate_statistic(
    matrix: np.ndarray, p: int, *, symmetry_tolerance: float = 1e-4
) -> np.ndarray:
    """Checks one statistic and returns it as a symmetric float64 array.

    Args:
        matrix: Square symmetric [n, n] array, float32 or float64.
        p: Exponent of the inverse root; a positive integer.
        symmetry_tolerance: Largest accepted `max|A − Aᵀ| / max|A|`. The default lets
            float32 rounding in an accumulated `G·Gᵀ` through and rejects a matrix
            that is not meant to be symmetric.

    Returns:
        A new float64 array `(A + Aᵀ)/2`.

    Raises:
        ValueError: If the matrix is not 2-D, not square, empty, not real, has
            non-finite entries or is asymmetric beyond the tolerance, or if p is not a
            positive integer.
    """
    _check_exponent(p)
    array = np.asarray(matrix)
    if array.ndim != 2 or array.shape[0] != array.shape[1]:
        raise ValueError(f"statistic must be a square 2-D matrix, got shape {array.shape}")
    if array.shape[0] == 0:
        raise ValueError(f"statistic must be non-empty, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"statistic must be real-valued, got dtype {array.dtype}")
    array = array.astype(np.float64, copy=False)
    finite = np.isfinite(array)
    if not finite.all():
        bad = array.size - int(np.count_nonzero(finite))
        raise ValueError(f"statistic has {bad} non-finite entries (NaN or inf) out of {array.size}")
    symmetric = array + array.T
    difference = symmetric - array  # A^T, then A^T - A below, without transposed passes.
    difference -= array
    scale = max(float(array.max()), -float(array.min()))
    spread = max(float(difference.max()), -float(difference.min()))
    asymmetry = spread / scale if scale > 0 else 0.0
    if asymmetry > symmetry_tolerance:
        raise ValueError(
            f"statistic is not symmetric: max|A - A^T| / max|A| = {asymmetry:.3g} exceeds "
            f"symmetry_tolerance {symmetry_tolerance:.3g}"
        )
    symmetric *= 0.5
    return symmetric


def estimate_max_eigenvalue(matrix: np.ndarray, *, iterations: int = _POWER_ITERATIONS) -> float:
    """Largest eigenvalue of a symmetric PSD matrix by power iteration.

    The start vector comes from a fixed seed, so the estimate is reproducible:
    `inverse_pth_root` calls this on `validate_statistic(matrix, p)`, and the ridge
    `ε·λmax` it used can be rebuilt the same way. The Rayleigh quotient never exceeds
    λmax and is usually within a fraction of a percent of it.

    Args:
        matrix: Symmetric float64 [n, n] matrix.
        iterations: Matrix-vector products.

    Returns:
        The Rayleigh quotient of the last iterate; 0.0 for the zero matrix.
    """
    n = matrix.shape[0]
    vector = np.random.default_rng(0).standard_normal(n)
    vector /= np.linalg.norm(vector)
    for _ in range(iterations):
        image = matrix @ vector
        norm = np.linalg.norm(image)
        if not norm > 0:
            return 0.0
        vector = image / norm
    return float(vector @ (matrix @ vector))


def inverse_pth_root(
    matrix: np.ndarray,
    p: int,
    *,
    ridge_epsilon: float = 1e-6,
    ridge_mode: str = "relative",
    method: str = "schur_newton",
    tolerance: float = 1e-6,
    max_iterations: int = 100,
    failure_threshold: float = 0.1,
    max_retries: int = 2,
    scaling: str = "dynamic",
    symmetry_tolerance: float = 1e-4,
) -> RootResult:
    """Computes `(A + ε·λmax(A)·I)^(-1/p)` in float64 (or another ridge, see `ridge_mode`).

    Args:
        matrix: Symmetric PSD [n, n] statistic, float32 or float64.
        p: Exponent; the result is the inverse p-th root. A positive integer.
        ridge_epsilon: Ridge ε: relative to λmax(A) (absolute when λmax(A) is not
            positive), or absolute, as `ridge_mode` says.
        ridge_mode: One of `RIDGE_MODES`: "relative" adds ε·λmax(A)·I always;
            "absolute_if_needed" adds ε·I only when λmin(A) < ε.
        method: One of `METHODS`.
        tolerance: Schur–Newton stops when `max|M − I|` falls below this. With the
            default the roots agree with the eigendecomposition's to about 1e-9
            (relative Frobenius distance) in `scripts/bench_roots.py`.
        max_iterations: Schur–Newton iteration limit per attempt.
        failure_threshold: A result with a larger (or non-finite) error is retried and,
            if still above it, returned with `converged=False`.
        max_retries: Retries, each with a ridge `_RIDGE_GROWTH` times larger.
        scaling: "dynamic" (scaled steps, default) or "none" (Higham's plain
            iteration); Schur–Newton only.
        symmetry_tolerance: See `validate_statistic`.

    Returns:
        A `RootResult`; a failed result is returned, not raised.

    Raises:
        ValueError: For an invalid statistic (see `validate_statistic`) or argument.
    """
    options = _checked_options(locals())
    statistic = validate_statistic(matrix, p, symmetry_tolerance=symmetry_tolerance)
    return _solve(statistic, p, *options)


def batched_inverse_pth_root(
    matrices: np.ndarray,
    p: int,
    *,
    ridge_epsilon: float = 1e-6,
    ridge_mode: str = "relative",
    method: str = "schur_newton",
    tolerance: float = 1e-6,
    max_iterations: int = 100,
    failure_threshold: float = 0.1,
    max_retries: int = 2,
    scaling: str = "dynamic",
    symmetry_tolerance: float = 1e-4,
) -> BatchedRootResult:
    """Inverse p-th roots of a stack of statistics, each block on its own.

    A block that fails, or whose input is rejected (non-finite or asymmetric; logged
    as a warning), is marked `converged=False` (rejected: NaN root, inf error) and does
    not affect the others. Arguments as for `inverse_pth_root`.

    Args:
        matrices: [k, n, n] stack of symmetric PSD statistics.
        p: Exponent of the inverse root.
        ridge_epsilon, ridge_mode, method, tolerance, max_iterations,
            failure_threshold, max_retries, scaling, symmetry_tolerance: See
            `inverse_pth_root`.

    Returns:
        A `BatchedRootResult` with one entry per block.

    Raises:
        ValueError: If the stack is not 3-D with square blocks, or an argument is
            invalid.
    """
    options = _checked_options(locals())
    _check_exponent(p)
    stack = np.asarray(matrices)
    if stack.ndim != 3 or stack.shape[1] != stack.shape[2]:
        raise ValueError(
            f"matrices must be a [k, n, n] stack of square blocks, got shape {stack.shape}"
        )
    count, n = stack.shape[0], stack.shape[1]
    roots = np.full((count, n, n), np.nan)
    errors = np.full(count, np.inf)
    iterations = np.zeros(count, dtype=np.int64)
    ridge_epsilons = np.full(count, float(ridge_epsilon))
    converged = np.zeros(count, dtype=bool)
    for index in range(count):
        try:
            statistic = validate_statistic(stack[index], p, symmetry_tolerance=symmetry_tolerance)
        except ValueError as error:
            _log.warning("block %d of %d rejected: %s", index, count, error)
            continue
        result = _solve(statistic, p, *options)
        roots[index] = result.root
        errors[index] = result.error
        iterations[index] = result.iterations
        ridge_epsilons[index] = result.ridge_epsilon
        converged[index] = result.converged
    return BatchedRootResult(roots, errors, iterations, ridge_epsilons, converged, method)


def _check_exponent(p: int) -> None:
    if isinstance(p, bool) or not isinstance(p, numbers.Integral) or p < 1:
        raise ValueError(f"p must be a positive integer, got {p!r}")


# The solver options, in the order `_solve` takes them after the statistic and p.
_OPTION_NAMES = (
    "ridge_epsilon",
    "ridge_mode",
    "method",
    "tolerance",
    "max_iterations",
    "failure_threshold",
    "max_retries",
    "scaling",
)


def _checked_options(
    arguments: dict[str, Any],
) -> tuple[float, str, str, float, int, float, int, str]:
    """Checks the solver options among a caller's `arguments` (its `locals()`).

    Returns them in the order `_solve` takes them.
    """
    options = tuple(arguments[name] for name in _OPTION_NAMES)
    ridge_epsilon, ridge_mode, method, tolerance = options[:4]
    max_iterations, failure_threshold, max_retries, scaling = options[4:]
    if ridge_mode not in RIDGE_MODES:
        raise ValueError(f"ridge_mode must be one of {RIDGE_MODES}, got {ridge_mode!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    if not ridge_epsilon > 0:
        raise ValueError(f"ridge_epsilon must be positive, got {ridge_epsilon!r}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be non-negative, got {tolerance!r}")
    if (
        isinstance(max_iterations, bool)
        or not isinstance(max_iterations, numbers.Integral)
        or max_iterations < 1
    ):
        raise ValueError(f"max_iterations must be a positive integer, got {max_iterations!r}")
    if not failure_threshold > 0:
        raise ValueError(f"failure_threshold must be positive, got {failure_threshold!r}")
    if (
        isinstance(max_retries, bool)
        or not isinstance(max_retries, numbers.Integral)
        or max_retries < 0
    ):
        raise ValueError(f"max_retries must be a non-negative integer, got {max_retries!r}")
    return options


def _solve(
    statistic: np.ndarray,
    p: int,
    ridge_epsilon: float,
    ridge_mode: str,
    method: str,
    tolerance: float,
    max_iterations: int,
    failure_threshold: float,
    max_retries: int,
    scaling: str,
) -> RootResult:
    """Runs the attempts with growing ridge on a validated statistic."""
    p = int(p)
    lambda_max = estimate_max_eigenvalue(statistic)
    relative = ridge_mode == "relative"
    ridge_scale = lambda_max if relative and lambda_max > 0 else 1.0
    frobenius = float(np.linalg.norm(statistic))
    epsilon = float(ridge_epsilon)
    needed = relative or not _smallest_eigenvalue_at_least(statistic, epsilon)
    for attempt in range(max_retries + 1):
        # `lower` bounds the spectrum of A_r from below; the ridge is what is added.
        lower = epsilon * ridge_scale
        ridge = lower if needed or attempt > 0 else 0.0
        damped = statistic.copy()
        damped.reshape(-1)[:: damped.shape[0] + 1] += ridge
        if method == "eigh":
            root, error = _eigh_root(damped, p, lower)
            iterations = 0
        else:
            # Upper end of the spectrum of A_r: the Frobenius norm always bounds it;
            # the power-iteration value with a margin is tighter. A retry uses only
            # the rigorous bound, in case the estimate was what went wrong.
            upper = frobenius + ridge
            if attempt == 0:
                upper = min(upper, _LAMBDA_MARGIN * max(lambda_max, 0.0) + ridge)
            root, error, iterations = _coupled_newton(
                damped, p, lower, upper, tolerance, max_iterations, scaling
            )
        converged = bool(np.isfinite(error) and error <= failure_threshold)
        if converged or attempt == max_retries:
            break
        epsilon *= _RIDGE_GROWTH
    return RootResult(root, float(error), int(iterations), epsilon, method, converged)


def _smallest_eigenvalue_at_least(statistic: np.ndarray, epsilon: float) -> bool:
    """Whether λmin(A) ≥ ε, decided by a Cholesky factorization of `A − ε·I`."""
    shifted = statistic.copy()
    shifted.reshape(-1)[:: shifted.shape[0] + 1] -= epsilon
    try:
        np.linalg.cholesky(shifted)
    except np.linalg.LinAlgError:
        return False
    return True


def _eigh_root(damped: np.ndarray, p: int, lower: float) -> tuple[np.ndarray, float]:
    """Root by eigendecomposition, eigenvalues clamped from below at `lower` (the ridge).

    Returns the root and the residual `max|root^p · A_r − I|`, the measure that
    Schur–Newton reports (it is large where the clamp changed an eigenvalue, that
    is, where A had a negative eigenvalue beyond the ridge).
    """
    eigenvalues, vectors = np.linalg.eigh(damped)
    eigenvalues = np.maximum(eigenvalues, lower)
    root = (vectors * eigenvalues ** (-1.0 / p)) @ vectors.T
    root = 0.5 * (root + root.T)
    scratch = [np.empty_like(root) for _ in range(3)]
    residual = _power(root, p, scratch) @ damped
    return root, _distance_to_identity(residual)


def _coupled_newton(
    damped: np.ndarray,
    p: int,
    lower: float,
    upper: float,
    tolerance: float,
    max_iterations: int,
    scaling: str,
) -> tuple[np.ndarray, float, int]:
    """Coupled Newton iteration for `damped^(-1/p)`.

    The scale c is folded into the step matrix, `S = c^(1/p)·((p+1)·I − c·M)/p`, so
    that `M ← S^p·M` and `H ← H·S`. H starts as I (`h` None), so the first step sets
    H = S without a product.

    Args:
        damped: A_r, symmetric positive definite; overwritten.
        p: Exponent.
        lower: Lower bound of the spectrum of A_r (the ridge).
        upper: Upper bound of the spectrum of A_r.
        tolerance: Stop when `max|M − I|` is below it.
        max_iterations: Iteration limit.
        scaling: "dynamic" or "none".

    Returns:
        Root, final error and accepted iterations.
    """
    n = damped.shape[0]
    # Buffers; a step writes into the "next" ones, swapped in only if the step is kept.
    m, m_next = damped, np.empty_like(damped)
    h, h_next = None, np.empty_like(damped)  # h None: H = I.
    step = np.empty_like(damped)
    scratch = [np.empty_like(damped) for _ in range(3)]
    lo, hi = lower, upper
    error = np.inf
    iterations = 0
    for iteration in range(max_iterations):
        c, scaled = _step_scale(scaling, iteration, lo, hi, m, p)
        if not scaled and np.isfinite(error):
            order, bound = _finishing_step(m, lo, hi, error, p, tolerance)
            if order:
                h = _finish(h, m, p, order, h_next, step, scratch)
                error, iterations = bound, iterations + 1
                break

        new_error = _newton_step(m, h, c, p, step, h_next, m_next, scratch)

        # In the scaled phase the error need not shrink, but it stays at most 1.
        reference = max(error, 1.0) if scaled else error
        if not np.isfinite(new_error) or new_error > _GROWTH_LIMIT * reference:
            break  # Keep the previous iterate.
        m, m_next = m_next, m
        h, h_next = h_next, (np.empty_like(damped) if h is None else h)
        lo, hi = _interval_image(lo, hi, c, p)
        stalled = not scaled and new_error >= error  # At the rounding floor.
        error = new_error
        iterations += 1
        if error < tolerance or stalled:
            break

    root = np.eye(n) if h is None else h
    return 0.5 * (root + root.T), float(error), iterations


def _newton_step(
    m: np.ndarray,
    h: np.ndarray | None,
    c: float,
    p: int,
    step: np.ndarray,
    h_next: np.ndarray,
    m_next: np.ndarray,
    scratch: list[np.ndarray],
) -> float:
    """One step with scale c: `S` into `step`, `H·S` into `h_next`, `S^p·M` into `m_next`.

    Returns:
        The new error `max|M_next − I|`.
    """
    np.multiply(m, -(c ** (1.0 + 1.0 / p)) / p, out=step)
    step.reshape(-1)[:: m.shape[0] + 1] += c ** (1.0 / p) * (p + 1.0) / p
    if h is None:
        np.copyto(h_next, step)
    else:
        _symmetric_product(h, step, h_next)
    _symmetric_product(_power(step, p, scratch), m, m_next)
    return _distance_to_identity(m_next)


def _step_scale(
    scaling: str, iteration: int, lo: float, hi: float, m: np.ndarray, p: int
) -> tuple[float, bool]:
    """The scale c of the next coupled Newton step, and whether that step is scaled."""
    if scaling == "dynamic" and not (1.0 - _SCALING_STOP <= lo and hi <= 1.0 + _SCALING_STOP):
        return _dynamic_scale(lo, hi, p), True
    if scaling == "none" and iteration == 0:
        return (1.0 + p) / (2.0 * float(np.linalg.norm(m))), True
    return 1.0, False


def _finishing_step(
    m: np.ndarray, lo: float, hi: float, error: float, p: int, tolerance: float
) -> tuple[int, float]:
    """(order, error bound) of an H-only finishing step that reaches the tolerance; order 0: none.

    The radius of the spectrum of M around 1 is the tracked interval (which assumes
    A ⪰ 0), at least the measured error; if that allows the H-only finish, it is
    confirmed against an estimate of ‖M − I‖₂ in case A was indefinite.
    """
    radius = max(1.0 - lo, hi - 1.0, error)
    if not _finishing_order(radius, p, tolerance)[0]:
        return 0, np.inf
    radius = max(radius, _DISTANCE_MARGIN * _spectral_distance(m))
    return _finishing_order(radius, p, tolerance)


def _taylor_coefficients(p: int, order: int) -> list[float]:
    """Coefficients of `x^(-1/p) = Σ_j a_j·(x − 1)^j` up to `order`."""
    coefficients = [1.0]
    for j in range(1, order + 1):
        coefficients.append(coefficients[-1] * (-1.0 / p - (j - 1)) / j)
    return coefficients


def _finishing_order(radius: float, p: int, tolerance: float) -> tuple[int, float]:
    """Lowest Taylor order J whose H-only finishing step is sure to meet the tolerance.

    Multiplying H by `T_J(M)`, the order-J Taylor polynomial of `M^(-1/p)` at I, turns
    an eigenvalue x of M into `x·T_J(x)^p`, within `O(|x − 1|^(J+1))` of 1. With the
    spectrum of M within `radius` of 1, the largest entry of `M − I` after the step is
    at most the largest `|x·T_J(x)^p − 1|` over `[1 − radius, 1 + radius]`.

    Returns:
        (J, that bound), or (0, inf) when no order up to `_MAX_FINISH_ORDER` suffices.
    """
    if not radius < 1.0:
        return 0, np.inf
    x = np.linspace(1.0 - radius, 1.0 + radius, 65)
    coefficients = _taylor_coefficients(p, _MAX_FINISH_ORDER)
    taylor = np.full_like(x, coefficients[0])
    for order in range(1, _MAX_FINISH_ORDER + 1):
        taylor += coefficients[order] * (x - 1.0) ** order
        bound = float(np.max(np.abs(x * taylor**p - 1.0)))
        if bound < tolerance:
            return order, bound
    return 0, np.inf


def _spectral_distance(m: np.ndarray) -> float:
    """Estimate of ‖M − I‖₂ by power iteration on M − I (seeded start, never above it)."""
    vector = np.random.default_rng(1).standard_normal(m.shape[0])
    vector /= np.linalg.norm(vector)
    for _ in range(_DISTANCE_ITERATIONS):
        image = m @ vector - vector
        norm = np.linalg.norm(image)
        if not norm > 0:
            return 0.0
        vector = image / norm
    return abs(float(vector @ (m @ vector - vector)))


def _finish(
    h: np.ndarray | None,
    m: np.ndarray,
    p: int,
    order: int,
    out: np.ndarray,
    work: np.ndarray,
    scratch: list[np.ndarray],
) -> np.ndarray:
    """Returns `H·T_J(M)` (see `_finishing_order`), evaluated by Horner's rule in E = M − I.

    Writes into `out` (or a scratch buffer); m is left unchanged.
    """
    n = m.shape[0]
    coefficients = _taylor_coefficients(p, order)
    np.copyto(work, m)
    work.reshape(-1)[:: n + 1] -= 1.0  # E
    polynomial = scratch[0]
    np.multiply(work, coefficients[order], out=polynomial)
    polynomial.reshape(-1)[:: n + 1] += coefficients[order - 1]
    for j in range(order - 2, -1, -1):
        spare = scratch[1] if polynomial is scratch[0] else scratch[0]
        _symmetric_product(polynomial, work, spare)
        spare.reshape(-1)[:: n + 1] += coefficients[j]
        polynomial = spare
    if h is None:
        return polynomial
    _symmetric_product(h, polynomial, out)
    return out


def _newton_map(x: float, p: int) -> float:
    """f(x) = x·((p+1−x)/p)^p, one unscaled step on an eigenvalue x of M."""
    return x * ((p + 1.0 - x) / p) ** p


def _dynamic_scale(lo: float, hi: float, p: int) -> float:
    """The c in [1/hi, (p+1)/hi] with f(c·lo) = f(c·hi), by bisection.

    With c·lo ≤ 1 ≤ c·hi ≤ p+1 the step maps [lo, hi] into [f(c·lo), 1]; equal end
    values make that interval the narrowest. Of the final bracket the smaller c is
    returned, the one further from the zero of f at p+1.
    """
    below, above = 1.0 / hi, (p + 1.0) / hi
    for _ in range(_BISECTION_STEPS):
        middle = 0.5 * (below + above)
        if _newton_map(middle * lo, p) < _newton_map(middle * hi, p):
            below = middle
        else:
            above = middle
    return below


def _interval_image(lo: float, hi: float, c: float, p: int) -> tuple[float, float]:
    """Interval holding the spectrum after a step with scale c (needs c·hi ≤ p+1)."""
    low_end, high_end = _newton_map(c * lo, p), _newton_map(c * hi, p)
    top = 1.0 if c * lo <= 1.0 <= c * hi else max(low_end, high_end)
    return min(low_end, high_end), top


def _distance_to_identity(m: np.ndarray) -> float:
    """max|M − I| over all entries, without a temporary copy of M."""
    n = m.shape[0]
    diagonal = m.reshape(-1)[:: n + 1]
    diagonal -= 1.0
    distance = max(float(m.max()), -float(m.min()))
    diagonal += 1.0
    return distance


def _power(x: np.ndarray, p: int, scratch: list[np.ndarray]) -> np.ndarray:
    """x^p of a symmetric matrix by repeated squaring, in three scratch buffers.

    Returns x itself for p = 1, else one of the scratch buffers.
    """
    result = None
    square = x
    while True:
        if p & 1:
            if result is None:
                result = square
            else:
                out = _free_buffer(scratch, result, square)
                _symmetric_product(result, square, out)
                result = out
        p >>= 1
        if not p:
            return result
        out = _free_buffer(scratch, result, square)
        _symmetric_product(square, square, out)
        square = out


def _symmetric_product(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """out = a·b for commuting symmetric a and b, whose product is symmetric.

    Only the blocks on and above the diagonal are multiplied (one row block at a
    time, `_PRODUCT_BLOCKS` of them) and the rest is mirrored: 9/16 of the
    arithmetic of a full product, about 60% of its time at n ≥ 1024. The result is
    exactly symmetric.
    """
    n = a.shape[0]
    blocks = min(_PRODUCT_BLOCKS, n // _MIN_PRODUCT_BLOCK)
    if blocks < 2:
        np.matmul(a, b, out=out)
        return
    edges = [n * index // blocks for index in range(blocks + 1)]
    for start, stop in zip(edges[:-1], edges[1:], strict=True):
        np.matmul(a[start:stop], b[:, start:], out=out[start:stop, start:])
    for start, stop in zip(edges[:-1], edges[1:], strict=True):
        out[stop:, start:stop] = out[start:stop, stop:].T


def _free_buffer(scratch: list[np.ndarray], *busy: np.ndarray | None) -> np.ndarray:
    return next(buffer for buffer in scratch if all(buffer is not used for used in busy))
