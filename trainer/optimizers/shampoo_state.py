"""What Shampoo keeps per variable, and the seam's view of it: one entry per block key.

`Shampoo` (shampoo.py) creates the state and updates it inside the step; this
module names every block's factor by a stable key, computes the sync mode's roots
on the host (`host_roots`), and does the host-side work of the asynchronous seam:
read statistics out (`Registry.snapshot`, converted by `StatisticsSnapshot.blocks`),
put roots computed elsewhere in (`Registry.install`, newer ones only, by
`precond_service.common.versions.is_newer`), and report what is held.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
import threadpoolctl

from precond_service.common import eigenbasis as eigenbasis_lib
from precond_service.common import roots as roots_lib
from precond_service.common.blocks import PreconditionerBlock, StatisticsBlock
from precond_service.common.versions import NO_VERSION, is_newer
from trainer.optimizers import blocking

GRAFT_TYPES = ("adagrad", "adam", "sgd", "none")
PRECONDITION_MODES = ("sync", "async", "off")
# Where the first moment is taken: "update", an EMA of the grafted update after
# preconditioning; "gradient", a bias-corrected EMA of the gradient before it (the
# reference implementations' form: graft-only is then exactly Adam).
MOMENTUM_TYPES = ("update", "gradient")
# Over what the Shampoo direction takes the grafting update's norm.
GRAFT_SCOPES = ("layer", "block")

# stats_step of a block that has no preconditioner yet.
NO_PRECONDITIONER = NO_VERSION


@dataclasses.dataclass
class Factor:
    """Statistic, root and root's stats_step of one dimension of one block group."""

    dim: int
    statistics: keras.Variable  # [num_blocks, b, b]
    preconditioner: keras.Variable  # [num_blocks, b, b]
    stats_step: keras.Variable  # [num_blocks] int64, NO_PRECONDITIONER if none


@dataclasses.dataclass
class VariableState:
    """Everything Shampoo keeps for one model variable."""

    path: str
    plan: blocking.BlockPlan
    exponent: int  # p of the inverse p-th roots of its factors
    factors: list[list[Factor]]  # per plan group, per preconditioned dim
    graft: keras.Variable | None  # AdaGrad / Adam second-moment accumulator
    momentum: keras.Variable | None
    # Diagnostics, not optimizer state (never checkpointed): the cosine between
    # the Shampoo direction and the graft's update over the preconditioned
    # blocks, at the last step (NaN while no block is preconditioned).
    direction_cosine: tf.Variable | None = None
    # The eigenbasis mode's Adam second moment per plan group, in the blocks' bases.
    rotated_second_moments: list[keras.Variable] = dataclasses.field(default_factory=list)


def block_key(path: str, coords: Sequence[int], dim: int) -> str:
    """The stable key of one block's factor: key path, block coordinates, dimension.

    Args:
        path: The variable's path as `key_paths` gives it.
        coords: The block's coordinates in the variable's block grid.
        dim: The merged dimension the factor preconditions.
    """
    return f"{path}|b{'.'.join(str(c) for c in coords)}|d{dim}"


def key_paths(variables: Sequence[keras.Variable]) -> list[str]:
    """The path each variable's block keys start with.

    The variable's path, less the first component when every variable shares it:
    that is the model's name, which Keras makes unique per process ("sequential",
    then "sequential_1" for a rebuilt model), so keeping it would change the keys.
    """
    paths = [getattr(v, "path", None) or v.name for v in variables]
    roots = {path.split("/", 1)[0] for path in paths}
    if len(roots) == 1 and all("/" in path for path in paths):
        return [path.split("/", 1)[1] for path in paths]
    return paths


@dataclasses.dataclass(frozen=True)
class StatisticsSnapshot:
    """The statistics of every factor at one step, read but not yet converted.

    Attributes:
        step: The update count the statistics include.
        entries: Per factor: variable key path, block coordinates, dimension,
            exponent, and the [num_blocks, n, n] statistics tensor.
        root_settings: ridge_epsilon, ridge_mode, failure_threshold, method,
            preconditioner of every
            block.
    """

    step: int
    entries: list[tuple[str, tuple[tuple[int, ...], ...], int, int, Any]]
    root_settings: dict[str, Any]

    def blocks(self) -> list[StatisticsBlock]:
        """One `StatisticsBlock` per non-zero block statistic (zero ones carry nothing yet)."""
        blocks = []
        for path, coords_list, dim, exponent, tensor in self.entries:
            values = np.asarray(tensor)
            nonzero = values.reshape(len(coords_list), -1).any(axis=1)
            for index, coords in enumerate(coords_list):
                if nonzero[index]:
                    blocks.append(
                        StatisticsBlock(
                            key=block_key(path, coords, dim),
                            step=self.step,
                            exponent=exponent,
                            statistics=values[index],
                            **self.root_settings,
                        )
                    )
        return blocks


class Registry:
    """Plain (untracked) holder of the per-variable state and the key index.

    Keras tracks the optimizer's variables itself; keeping this structure out of
    TensorFlow's automatic tracking avoids a second, differently named path to
    the same variables in checkpoints.
    """

    def __init__(self, preconditioner: str = "root") -> None:
        # What each block's preconditioner variable holds: "root" or "eigenbasis".
        self.preconditioner = preconditioner
        self.by_variable: dict[Any, VariableState] = {}
        # Block key -> (factor, index of the block in the factor's batch).
        self.by_key: dict[str, tuple[Factor, int]] = {}

    def add(self, variable_key: Any, state: VariableState) -> None:
        """Registers a variable's state and indexes its blocks by key.

        Raises:
            ValueError: Two variables would give the same block keys.
        """
        self.by_variable[variable_key] = state
        for group, factors in zip(state.plan.groups, state.factors):
            for factor in factors:
                for index, coords in enumerate(group.coords):
                    key = block_key(state.path, coords, factor.dim)
                    if key in self.by_key:
                        raise ValueError(
                            f"two variables share the path {state.path!r}; give the "
                            "layers distinct names so that block keys are unique"
                        )
                    self.by_key[key] = (factor, index)

    def snapshot(self, step: int, **root_settings: Any) -> StatisticsSnapshot:
        """Every factor's statistics as they are now, for `StatisticsSnapshot.blocks`.

        Cheap: it reads each variable once (TensorFlow copies a variable's buffer
        before a later update writes to it, so the snapshot stays as read). The
        conversion to blocks can then run on another thread.

        Args:
            step: The update count the statistics include.
            **root_settings: ridge_epsilon, ridge_mode, failure_threshold, method,
                preconditioner.
        """
        entries = [
            (state.path, group.coords, factor.dim, state.exponent, tf.identity(factor.statistics))
            for state in self.by_variable.values()
            for group, factors in zip(state.plan.groups, state.factors)
            for factor in factors
        ]
        return StatisticsSnapshot(step, entries, root_settings)

    def install(self, entries: Iterable[PreconditionerBlock | tuple[str, int, np.ndarray]]) -> int:
        """Assigns the roots in `entries` that are newer than held; returns how many.

        Raises:
            KeyError: A key that no block has.
            ValueError: A root of the wrong shape or with non-finite values.
        """
        pending: dict[int, tuple[Factor, dict[int, tuple[int, np.ndarray]]]] = {}
        for entry in entries:
            if isinstance(entry, PreconditionerBlock):
                key, stats_step, root = entry.key, entry.stats_step, entry.root
                self._check_kind(key, entry.method)
            else:
                key, stats_step, root = entry
            factor, index = self._checked(key, np.asarray(root))
            updates = pending.setdefault(id(factor), (factor, {}))[1]
            if index not in updates or is_newer(stats_step, updates[index][0]):
                updates[index] = (int(stats_step), np.asarray(root))

        applied = 0
        for factor, updates in pending.values():
            held_steps = factor.stats_step.numpy()
            fresh = {i: u for i, u in updates.items() if is_newer(u[0], held_steps[i])}
            if not fresh:
                continue
            roots = factor.preconditioner.numpy()
            for index, (stats_step, root) in fresh.items():
                roots[index] = root
                held_steps[index] = stats_step
            factor.preconditioner.assign(roots)
            factor.stats_step.assign(held_steps)
            applied += len(fresh)
        return applied

    def _check_kind(self, key: str, method: str) -> None:
        """Raises ValueError if a published block is a root where a basis is wanted, or back."""
        is_basis = method == eigenbasis_lib.EIGENBASIS_METHOD
        if is_basis != (self.preconditioner == "eigenbasis"):
            raise ValueError(
                f"{key!r}: the service sent {'an eigenbasis' if is_basis else 'a root'} "
                f"(method {method!r}) to an optimizer with preconditioner="
                f"{self.preconditioner!r}; a service that predates eigenbases ignores "
                "the request for one: upgrade it"
            )

    def _checked(self, key: str, root: np.ndarray) -> tuple[Factor, int]:
        if key not in self.by_key:
            raise KeyError(f"no Shampoo block has the key {key!r}")
        factor, index = self.by_key[key]
        expected = tuple(factor.preconditioner.shape[1:])
        if root.shape != expected:
            raise ValueError(f"root for {key!r} has shape {root.shape}, expected {expected}")
        if not np.all(np.isfinite(root)):
            raise ValueError(f"root for {key!r} has non-finite values")
        return factor, index

    def root_variables(self) -> list[keras.Variable]:
        """Each factor's preconditioner and stats_step variables, in a fixed order."""
        return [
            variable
            for state in self.by_variable.values()
            for factors in state.factors
            for factor in factors
            for variable in (factor.preconditioner, factor.stats_step)
        ]

    def direction_cosines(self) -> dict[str, float]:
        """Variable key path -> its `direction_cosine` (NaN while none is preconditioned)."""
        return {
            state.path: float(state.direction_cosine.numpy())
            for state in self.by_variable.values()
            if state.direction_cosine is not None
        }

    def held_steps(self) -> dict[str, int]:
        """Key -> stats_step of the root each block uses (NO_PRECONDITIONER if none)."""
        held: dict[int, np.ndarray] = {}
        steps = {}
        for key, (factor, index) in self.by_key.items():
            if id(factor) not in held:
                held[id(factor)] = factor.stats_step.numpy()
            steps[key] = int(held[id(factor)][index])
        return steps


def host_roots(
    statistics: np.ndarray,
    *,
    exponent: int,
    ridge_epsilon: float,
    ridge_mode: str,
    failure_threshold: float,
    method: str,
    preconditioner: str = "root",
) -> tuple[np.ndarray, np.ndarray]:
    """The sync mode's roots: [k, n, n] float32 statistics -> (float32 roots, ok mask).

    The same float64 solver and settings the service uses; with
    `preconditioner="eigenbasis"`, eigenbases instead of roots. `ok` is False where a
    root failed (error above `failure_threshold` or not finite) or the statistic is
    still all zero (no information yet): those blocks keep what they hold.
    """
    # One BLAS thread: OpenBLAS threads spinning beside TensorFlow's own
    # pools slowed whole training steps down about 7x (measured).
    with _blas_controller().limit(limits=1, user_api="blas"):
        if preconditioner == "eigenbasis":
            result = eigenbasis_lib.batched_eigenbasis(
                statistics, failure_threshold=failure_threshold
            )
        else:
            result = roots_lib.batched_inverse_pth_root(
                statistics,
                exponent,
                ridge_epsilon=ridge_epsilon,
                ridge_mode=ridge_mode,
                failure_threshold=failure_threshold,
                method=method,
            )
    ok = np.isfinite(result.errors) & (result.errors <= failure_threshold)
    ok &= np.all(np.isfinite(result.roots), axis=(1, 2))
    ok &= np.any(statistics != 0, axis=(1, 2))
    return result.roots.astype(np.float32), ok


@functools.cache
def _blas_controller() -> threadpoolctl.ThreadpoolController:
    """The process's BLAS thread pools, inspected once."""
    return threadpoolctl.ThreadpoolController()


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """Raises ValueError naming `name`, the allowed values and `value` if not allowed."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def check_positive_int(name: str, value: Any) -> None:
    """Raises ValueError unless `value` is an integer >= 1."""
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_unit_interval(name: str, value: Any) -> None:
    """Raises ValueError unless `value` is a number in [0, 1]."""
    if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def check_arguments(
    *,
    block_size: Any,
    beta1: Any,
    beta2: Any,
    statistics_beta2: Any,
    momentum_type: Any,
    graft_scope: Any,
    graft_type: Any,
    precondition_mode: Any,
    root_method: Any,
    preconditioner: Any,
    ridge_mode: Any,
    start_preconditioning_step: Any,
    statistics_compute_steps: Any,
    preconditioning_compute_steps: Any,
    skip_preconditioning_dim_size_gt: Any,
    exponent_override: Any,
    matrix_epsilon: Any,
    diagonal_epsilon: Any,
    inverse_failure_threshold: Any,
) -> None:
    """Raises ValueError naming the first of Shampoo's arguments that is out of range."""
    check_positive_int("block_size", block_size)
    check_unit_interval("beta1", beta1)
    check_unit_interval("beta2", beta2)
    if statistics_beta2 is not None:
        check_unit_interval("statistics_beta2", statistics_beta2)
    check_choice("momentum_type", momentum_type, MOMENTUM_TYPES)
    check_choice("graft_scope", graft_scope, GRAFT_SCOPES)
    check_choice("graft_type", graft_type, GRAFT_TYPES)
    check_choice("precondition_mode", precondition_mode, PRECONDITION_MODES)
    check_choice("root_method", root_method, roots_lib.METHODS)
    check_choice("ridge_mode", ridge_mode, roots_lib.RIDGE_MODES)
    check_choice("preconditioner", preconditioner, eigenbasis_lib.PRECONDITIONERS)
    if preconditioner == "eigenbasis" and (graft_type, momentum_type) != ("adam", "gradient"):
        raise ValueError(
            "preconditioner='eigenbasis' is Adam in rotated coordinates: it needs "
            "graft_type='adam' (its unrotated variables are Adam) and momentum_type="
            f"'gradient', got graft_type={graft_type!r}, momentum_type={momentum_type!r}"
        )
    if graft_type == "adam" and beta2 >= 1.0:
        raise ValueError(
            "graft_type='adam' needs beta2 < 1 (its second moment decays with beta2), "
            f"got beta2={beta2}; use graft_type='adagrad' for sums"
        )
    if not isinstance(start_preconditioning_step, int) or start_preconditioning_step < 0:
        raise ValueError(
            "start_preconditioning_step must be a non-negative integer, "
            f"got {start_preconditioning_step!r}"
        )
    check_positive_int("statistics_compute_steps", statistics_compute_steps)
    check_positive_int("preconditioning_compute_steps", preconditioning_compute_steps)
    check_positive_int("skip_preconditioning_dim_size_gt", skip_preconditioning_dim_size_gt)
    if exponent_override is not None:
        check_positive_int("exponent_override", exponent_override)
    for field, value in (
        ("matrix_epsilon", matrix_epsilon),
        ("diagonal_epsilon", diagonal_epsilon),
        ("inverse_failure_threshold", inverse_failure_threshold),
    ):
        if not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"{field} must be a positive number, got {value!r}")
