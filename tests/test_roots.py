"""Tests of `precond_service.common.roots` against an eigendecomposition written here.

The reference root of a matrix built as `V·diag(w)·Vᵀ` is `V·diag((w + ridge)^(-1/p))·Vᵀ`,
with the ridge rebuilt from the `ridge_epsilon` the solver reports and the (seeded,
reproducible) λmax estimate it used.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from precond_service.common import roots


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-random orthogonal matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def build(vectors: np.ndarray, eigenvalues: np.ndarray) -> np.ndarray:
    """`V·diag(w)·Vᵀ`, exactly symmetric."""
    matrix = (vectors * eigenvalues) @ vectors.T
    return 0.5 * (matrix + matrix.T)


def ridge_of(matrix: np.ndarray, p: int, epsilon: float) -> float:
    """The absolute ridge the solver used: ε·λmax, or ε when λmax is not positive."""
    lambda_max = roots.estimate_max_eigenvalue(roots.validate_statistic(matrix, p))
    return epsilon * (lambda_max if lambda_max > 0 else 1.0)


def reference_root(
    matrix: np.ndarray, vectors: np.ndarray, eigenvalues: np.ndarray, p: int, epsilon: float
) -> np.ndarray:
    """`(A + ridge·I)^(-1/p)` from the known eigendecomposition of A."""
    ridge = ridge_of(matrix, p, epsilon)
    return (vectors * (eigenvalues + ridge) ** (-1.0 / p)) @ vectors.T


def relative_distance(root: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(root - reference) / np.linalg.norm(reference))


def residual(root: np.ndarray, matrix: np.ndarray, p: int, epsilon: float) -> float:
    """max|root^p·A_r − I|, computed here."""
    damped = matrix + ridge_of(matrix, p, epsilon) * np.eye(len(matrix))
    return float(np.max(np.abs(np.linalg.matrix_power(root, p) @ damped - np.eye(len(matrix)))))


# Mostly small sizes; a few of several hundred keep the run short.
sizes = st.one_of(st.integers(1, 40), st.integers(41, 160), st.sampled_from([257, 400]))


@settings(max_examples=60, deadline=None)
@given(
    n=sizes,
    log_condition=st.floats(0.0, 6.0),
    p=st.sampled_from([2, 4, 8]),
    scaling=st.sampled_from(roots.SCALINGS),
    seed=st.integers(0, 2**32 - 1),
)
def test_schur_newton_matches_eigendecomposition(n, log_condition, p, scaling, seed):
    rng = np.random.default_rng(seed)
    vectors = random_orthogonal(n, rng)
    eigenvalues = np.geomspace(1.0, 10.0 ** (-log_condition), n) * 10.0 ** rng.uniform(-3, 3)
    matrix = build(vectors, eigenvalues)

    result = roots.inverse_pth_root(matrix, p, scaling=scaling)

    assert result.converged
    assert result.method == "schur_newton"
    assert result.ridge_epsilon == 1e-6
    assert result.root.dtype == np.float64
    np.testing.assert_array_equal(result.root, result.root.T)
    reference = reference_root(matrix, vectors, eigenvalues, p, result.ridge_epsilon)
    # The plain iteration stops once the largest entry of M − I is under the tolerance,
    # which can understate ‖M − I‖₂ a few times; the dynamic one mostly ends on a bound
    # of ‖M − I‖₂ far below it (see the module docstring).
    assert relative_distance(result.root, reference) <= (1e-6 if scaling == "dynamic" else 1e-5)
    assert result.error <= 1e-6


@pytest.mark.parametrize("p", [2, 4, 8])
def test_reported_error_bounds_the_residual(p):
    # The error is that of the iteration's M = H^p·A_r. The residual of the returned root
    # also carries rounding amplified by about cond(A_r)^(2/p), so take a mild condition.
    rng = np.random.default_rng(p)
    matrix = build(random_orthogonal(120, rng), np.geomspace(1.0, 1e-2, 120))
    result = roots.inverse_pth_root(matrix, p)
    assert result.converged and result.error <= 1e-6
    assert residual(result.root, matrix, p, result.ridge_epsilon) <= result.error + 1e-12


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 60),
    log_condition=st.floats(0.0, 6.0),
    p=st.sampled_from([2, 4, 8]),
    seed=st.integers(0, 2**32 - 1),
)
def test_eigh_method_matches_eigendecomposition(n, log_condition, p, seed):
    rng = np.random.default_rng(seed)
    vectors = random_orthogonal(n, rng)
    eigenvalues = np.geomspace(1.0, 10.0 ** (-log_condition), n)
    matrix = build(vectors, eigenvalues)

    result = roots.inverse_pth_root(matrix, p, method="eigh")

    assert result.converged and result.iterations == 0 and result.method == "eigh"
    reference = reference_root(matrix, vectors, eigenvalues, p, result.ridge_epsilon)
    assert relative_distance(result.root, reference) <= 1e-9
    assert result.error == pytest.approx(
        residual(result.root, matrix, p, result.ridge_epsilon), rel=0.5, abs=1e-12
    )


@pytest.mark.parametrize("p", [1, 3, 6])
def test_other_exponents(p):
    rng = np.random.default_rng(p)
    vectors = random_orthogonal(50, rng)
    eigenvalues = np.geomspace(1.0, 1e-5, 50)
    matrix = build(vectors, eigenvalues)
    result = roots.inverse_pth_root(matrix, p)
    assert result.converged
    reference = reference_root(matrix, vectors, eigenvalues, p, result.ridge_epsilon)
    assert relative_distance(result.root, reference) <= 1e-6


@pytest.mark.parametrize("method", roots.METHODS)
@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("rank", [0, 1, 5, 30])
def test_singular_statistics_give_finite_converged_roots(method, p, rank):
    n = 60
    gradients = np.random.default_rng(rank).standard_normal((n, rank))
    matrix = gradients @ gradients.T  # All-zero for rank 0.

    result = roots.inverse_pth_root(matrix, p, method=method)

    assert result.converged
    assert result.ridge_epsilon == 1e-6
    assert np.isfinite(result.root).all()
    eigenvalues, vectors = np.linalg.eigh(roots.validate_statistic(matrix, p))
    eigenvalues = np.maximum(eigenvalues, 0.0)  # Rounding can leave tiny negatives.
    reference = reference_root(matrix, vectors, eigenvalues, p, result.ridge_epsilon)
    assert relative_distance(result.root, reference) <= 1e-6


@pytest.mark.parametrize("method", roots.METHODS)
def test_zero_statistic_uses_absolute_ridge(method):
    result = roots.inverse_pth_root(np.zeros((7, 7)), 4, method=method, ridge_epsilon=1e-4)
    np.testing.assert_allclose(result.root, 1e-4 ** (-1 / 4) * np.eye(7), rtol=1e-12)
    assert result.converged and result.error <= 1e-12


@pytest.mark.parametrize("method", roots.METHODS)
def test_absolute_ridge_is_not_added_where_the_smallest_eigenvalue_is_above_it(method):
    vectors = random_orthogonal(30, np.random.default_rng(3))
    eigenvalues = np.geomspace(1e-3, 10.0, 30)
    matrix = build(vectors, eigenvalues)

    result = roots.inverse_pth_root(
        matrix, 4, method=method, ridge_epsilon=1e-4, ridge_mode="absolute_if_needed"
    )

    exact = (vectors * eigenvalues ** (-1 / 4)) @ vectors.T
    assert result.converged
    assert relative_distance(result.root, exact) <= 1e-6
    # The relative ridge (1e-4 * 10 = 1e-3, as large as the smallest eigenvalue) is not.
    relative = roots.inverse_pth_root(matrix, 4, method=method, ridge_epsilon=1e-4)
    assert relative_distance(relative.root, exact) > 1e-2


@pytest.mark.parametrize("method", roots.METHODS)
@pytest.mark.parametrize("rank", [0, 5])
def test_absolute_ridge_is_added_where_the_statistic_is_singular(method, rank):
    n = 40
    gradients = np.random.default_rng(rank).standard_normal((n, rank))
    matrix = 100.0 * gradients @ gradients.T

    result = roots.inverse_pth_root(
        matrix, 4, method=method, ridge_epsilon=1e-6, ridge_mode="absolute_if_needed"
    )

    eigenvalues, vectors = np.linalg.eigh(matrix)
    eigenvalues = np.maximum(eigenvalues, 0.0)
    expected = (vectors * (eigenvalues + 1e-6) ** (-1 / 4)) @ vectors.T  # ε·I, not ε·λmax·I
    assert result.converged and result.ridge_epsilon == 1e-6
    assert relative_distance(result.root, expected) <= 1e-6


def test_one_by_one():
    result = roots.inverse_pth_root(np.array([[16.0]]), 4)
    np.testing.assert_allclose(result.root, [[(16.0 * (1 + 1e-6)) ** -0.25]], rtol=1e-6)


def test_too_few_iterations_is_reported_not_raised():
    rng = np.random.default_rng(0)
    matrix = build(random_orthogonal(40, rng), np.geomspace(1.0, 1e-6, 40))

    result = roots.inverse_pth_root(matrix, 4, max_iterations=2)

    assert not result.converged
    assert result.iterations == 2
    assert np.isfinite(result.error) and result.error > 0.1
    assert result.ridge_epsilon == pytest.approx(1e-4)  # Both retries were spent.
    assert residual(result.root, matrix, 4, result.ridge_epsilon) == pytest.approx(
        result.error, rel=1e-6
    )


@pytest.mark.parametrize("scaling", roots.SCALINGS)
def test_unreachable_tolerance_stops_at_the_rounding_floor(scaling):
    # With tolerance 0 only the "stops shrinking" rule can end the iteration.
    rng = np.random.default_rng(1)
    vectors = random_orthogonal(80, rng)
    eigenvalues = np.geomspace(1.0, 1e-6, 80)
    matrix = build(vectors, eigenvalues)

    result = roots.inverse_pth_root(matrix, 4, tolerance=0.0, scaling=scaling)

    assert result.converged and result.iterations < 100
    assert result.error < 1e-12
    reference = reference_root(matrix, vectors, eigenvalues, 4, result.ridge_epsilon)
    assert relative_distance(result.root, reference) <= 1e-9


def indefinite_statistic() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An eigenvalue of −3e-6·λmax: the ridge 1e-6 leaves A_r indefinite, 1e-5 does not."""
    rng = np.random.default_rng(2)
    vectors = random_orthogonal(50, rng)
    eigenvalues = np.geomspace(1.0, 1e-3, 50)
    eigenvalues[-1] = -3e-6
    return build(vectors, eigenvalues), vectors, eigenvalues


@pytest.mark.parametrize("method", roots.METHODS)
def test_failed_attempt_is_retried_with_a_larger_ridge(method):
    matrix, vectors, eigenvalues = indefinite_statistic()

    first_only = roots.inverse_pth_root(matrix, 4, method=method, max_retries=0)
    retried = roots.inverse_pth_root(matrix, 4, method=method)

    assert not first_only.converged and first_only.error > 0.1
    assert first_only.ridge_epsilon == 1e-6
    if method == "schur_newton":
        # The negative eigenvalue grows each step until the 1.2× guard stops the
        # iteration; the root returned is the kept iterate, with its own error.
        assert first_only.iterations < 100
        assert residual(first_only.root, matrix, 4, 1e-6) == pytest.approx(
            first_only.error, rel=1e-3
        )
    assert retried.converged
    assert retried.ridge_epsilon == pytest.approx(1e-5)
    if method == "schur_newton":  # eigh clamps the negative eigenvalue instead.
        reference = reference_root(matrix, vectors, eigenvalues, 4, retried.ridge_epsilon)
        assert relative_distance(retried.root, reference) <= 1e-6


def test_batched_equals_one_at_a_time():
    rng = np.random.default_rng(3)
    stack = np.stack(
        [build(random_orthogonal(30, rng), np.geomspace(1.0, 10.0**-k, 30)) for k in range(5)]
    )
    for method in roots.METHODS:
        batched = roots.batched_inverse_pth_root(stack, 4, method=method)
        assert batched.method == method
        assert batched.roots.shape == stack.shape and batched.roots.dtype == np.float64
        assert batched.iterations.dtype == np.int64
        for index, matrix in enumerate(stack):
            single = roots.inverse_pth_root(matrix, 4, method=method)
            np.testing.assert_array_equal(batched.roots[index], single.root)
            assert batched.errors[index] == single.error
            assert batched.iterations[index] == single.iterations
            assert batched.ridge_epsilons[index] == single.ridge_epsilon
            assert batched.converged[index] == single.converged


def test_bad_blocks_do_not_affect_the_others():
    rng = np.random.default_rng(4)
    good = build(random_orthogonal(50, rng), np.geomspace(1.0, 1e-4, 50))
    with_nan = good.copy()
    with_nan[3, 4] = np.nan
    asymmetric = good.copy()
    asymmetric[0, 1] += 1.0
    indefinite, _, _ = indefinite_statistic()
    stack = np.stack([good, with_nan, asymmetric, indefinite, 2.0 * good])

    batched = roots.batched_inverse_pth_root(stack, 4, max_retries=0)

    np.testing.assert_array_equal(batched.converged, [True, False, False, False, True])
    for index in (1, 2):  # Rejected input: NaN root, infinite error.
        assert np.isnan(batched.roots[index]).all() and batched.errors[index] == np.inf
    assert batched.errors[3] > 0.1 and np.isfinite(batched.roots[3]).all()
    for index, matrix in ((0, good), (4, 2.0 * good)):
        np.testing.assert_array_equal(batched.roots[index], roots.inverse_pth_root(matrix, 4).root)


def test_float32_input_gives_float64_output():
    rng = np.random.default_rng(5)
    matrix = build(random_orthogonal(20, rng), np.geomspace(1.0, 1e-3, 20)).astype(np.float32)
    for method in roots.METHODS:
        assert roots.inverse_pth_root(matrix, 4, method=method).root.dtype == np.float64
    batched = roots.batched_inverse_pth_root(np.stack([matrix, matrix]), 4)
    assert batched.roots.dtype == np.float64 and batched.errors.dtype == np.float64
    assert roots.validate_statistic(matrix, 4).dtype == np.float64


def test_float32_rounding_asymmetry_is_accepted():
    gradients = np.random.default_rng(6).standard_normal((64, 300)).astype(np.float32)
    matrix = gradients @ gradients.T  # float32 accumulation need not be exactly symmetric.
    assert roots.inverse_pth_root(matrix, 4).converged


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        (np.ones(3), r"shape \(3,\)"),
        (np.ones((2, 3)), r"shape \(2, 3\)"),
        (np.ones((2, 2, 2)), r"shape \(2, 2, 2\)"),
        (np.ones((0, 0)), r"shape \(0, 0\)"),
        (np.eye(2, dtype=complex), "complex128"),
        (np.array([[1.0, np.nan, 0.0], [np.nan, 1.0, np.inf], [0.0, np.inf, 1.0]]), "4 non-finite"),
        (np.array([[1.0, 0.5], [0.0, 1.0]]), "= 0.5 exceeds"),
    ],
)
def test_invalid_statistic_is_rejected(matrix, message):
    with pytest.raises(ValueError, match=message):
        roots.validate_statistic(matrix, 4)
    with pytest.raises(ValueError, match=message):
        roots.inverse_pth_root(matrix, 4)


def test_symmetry_tolerance_is_adjustable():
    matrix = np.array([[1.0, 0.5], [0.0, 1.0]])
    np.testing.assert_array_equal(
        roots.validate_statistic(matrix, 4, symmetry_tolerance=0.6), [[1.0, 0.25], [0.25, 1.0]]
    )


@pytest.mark.parametrize(
    ("p", "shown"),
    [(0, "got 0"), (-2, "got -2"), (2.5, "got 2.5"), (4.0, "got 4.0"), (True, "got True")],
)
def test_invalid_exponent_is_rejected(p, shown):
    with pytest.raises(ValueError, match=f"p must be a positive integer, {shown}"):
        roots.inverse_pth_root(np.eye(2), p)
    with pytest.raises(ValueError, match=shown):
        roots.batched_inverse_pth_root(np.eye(2)[None], p)


def test_numpy_integer_exponent_is_accepted():
    assert roots.inverse_pth_root(np.eye(2), np.int64(4)).converged


@pytest.mark.parametrize(
    ("keyword", "value", "message"),
    [
        ("method", "cholesky", r"one of \('schur_newton', 'eigh'\), got 'cholesky'"),
        ("ridge_mode", "absolute", r"\('relative', 'absolute_if_needed'\), got 'absolute'"),
        ("scaling", "static", "got 'static'"),
        ("ridge_epsilon", 0.0, "ridge_epsilon must be positive, got 0.0"),
        ("tolerance", -1.0, "got -1.0"),
        ("max_iterations", 0, "max_iterations must be a positive integer, got 0"),
        ("failure_threshold", 0.0, "got 0.0"),
        ("max_retries", -1, "got -1"),
    ],
)
def test_invalid_options_are_rejected(keyword, value, message):
    with pytest.raises(ValueError, match=message):
        roots.inverse_pth_root(np.eye(2), 4, **{keyword: value})
    with pytest.raises(ValueError, match=message):
        roots.batched_inverse_pth_root(np.eye(2)[None], 4, **{keyword: value})


@pytest.mark.parametrize("shape", [(3, 3), (2, 3, 4), (3,)])
def test_batched_rejects_a_stack_of_the_wrong_shape(shape):
    with pytest.raises(
        ValueError, match=f"got shape {tuple(shape)}".replace("(", r"\(").replace(")", r"\)")
    ):
        roots.batched_inverse_pth_root(np.ones(shape), 4)


def test_power_iteration_estimate():
    rng = np.random.default_rng(7)
    eigenvalues = np.geomspace(3.0, 1e-4, 100)
    matrix = build(random_orthogonal(100, rng), eigenvalues)
    estimate = roots.estimate_max_eigenvalue(matrix)
    assert 0.99 * 3.0 <= estimate <= 3.0 * (1 + 1e-12)
    assert roots.estimate_max_eigenvalue(matrix) == estimate  # Seeded.
    assert roots.estimate_max_eigenvalue(np.zeros((4, 4))) == 0.0
