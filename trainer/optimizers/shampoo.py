"""Shampoo for TensorFlow 2 / Keras 3, with a seam for asynchronous preconditioners.

(Over 400 lines: one Keras optimizer class, whose arguments and the five stages of its
step read best in one place; its keyed state and the seam's host work are in
shampoo_state.py.)

Shampoo (Gupta, Koren, Singer 2018; Anil et al. 2020, "Scalable Second Order
Optimization for Deep Learning") keeps, for every block G of a weight and every
preconditioned dimension i of it, a Kronecker-factor statistic

    S_i <- beta2 * S_i + (1 - beta2) * G_(i) G_(i)^T        (beta2 = 1: plain sums)

and moves along G x_1 P_1 x_2 ... x_r P_r with P_i = S_i^(-1/(2r)); for a matrix
that is L^(-1/4) G R^(-1/4). One step of `update_step` is five visible stages:

  1. statistics   every `statistics_compute_steps`, the S_i above;
  2. roots        sync mode only: every `preconditioning_compute_steps`, the
                  P_i from `precond_service.common.roots` (float64 Schur-Newton) on the
                  host; async mode gets them through `assign_preconditioners`;
  3. precondition the Shampoo direction of each block that holds all its P_i
                  (skipped, matmuls and all, while no block of the variable does);
  4. graft        that direction rescaled to the per-layer norm of the grafting
                  optimizer's update ("decoupling step size and direction");
                  blocks without roots, steps before `start_preconditioning_step`
                  and rank-0/1 variables use the grafting update itself;
  5. momentum     an exponential moving average of the update (optionally
                  Nesterov), then `variable -= learning_rate * update`.

Decoupled weight decay is the Keras base class's (`weight_decay=`).

The asynchronous seam: `statistics_snapshot()` returns every block's statistic
under a stable key (variable path without the model's name, block coordinates,
dimension; see `key_paths`), and
`assign_preconditioners()` takes roots computed elsewhere, keeping for each
block only ones newer than what it holds. The stats_step of every preconditioner
in use is kept in optimizer variables, so it is checkpointed with the rest.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from precond_service.common.blocks import PreconditionerBlock, StatisticsBlock
from trainer.optimizers import blocking
from trainer.optimizers.shampoo_state import (  # noqa: F401 (re-exported names)
    GRAFT_SCOPES,
    GRAFT_TYPES,
    MOMENTUM_TYPES,
    NO_PRECONDITIONER,
    PRECONDITION_MODES,
    Factor,
    Registry,
    StatisticsSnapshot,
    VariableState,
    block_key,
    check_arguments,
    host_roots,
    key_paths,
)


@keras.saving.register_keras_serializable(package="trainer")
class Shampoo(keras.optimizers.Optimizer):
    """Shampoo with grafting, blocking, and synchronous or asynchronous roots.

    Example:
        >>> model.compile(optimizer=Shampoo(learning_rate=1e-3), loss="mse", jit_compile=False)

    The sync mode calls NumPy on the host inside the step, which XLA cannot
    compile: pass `jit_compile=False` to `compile` (Keras turns XLA on by default
    on GPUs), or use the async mode with the preconditioner service.

    Args:
        learning_rate: Float or `keras.optimizers.schedules.LearningRateSchedule`.
        block_size: Largest side of a preconditioned block; larger dimensions
            are split (the last block may be smaller), smaller adjacent ones merged.
        beta1: Momentum (an exponential moving average, see `momentum_type`);
            0 disables it.
        beta2: Second-moment decay of the "adam" graft, and of the Kronecker
            statistics unless `statistics_beta2` is given.
        statistics_beta2: Decay of the Kronecker statistics; 1.0 sums them as
            AdaGrad does (also with an Adam graft). None: `beta2`.
        momentum_type: "update" (EMA of the grafted update, after
            preconditioning) or "gradient" (bias-corrected EMA of the gradient,
            before preconditioning and grafting; graft-only then equals Adam).
        graft_scope: "layer" (the Shampoo direction takes the grafting update's
            norm over all preconditioned blocks of a variable) or "block" (each
            block its own).
        nesterov: Use Nesterov momentum.
        weight_decay: Decoupled weight decay (Keras base-class semantics).
        matrix_epsilon: Ridge ε added to every statistic before the inverse root,
            as `ridge_mode` says.
        ridge_mode: "relative" (ε·λmax·I always, the paper's) or
            "absolute_if_needed" (ε·I, only where λmin < ε: the reference PyTorch
            implementation's, with ε around 1e-12).
        diagonal_epsilon: Epsilon of the AdaGrad / Adam grafting denominators.
        graft_type: "adam" (bias-corrected RMS with `beta2`, the default, which
            fits beta2 < 1), "adagrad" (sums; pairs with beta2 = 1), "sgd", or
            "none" (Shampoo's own norm).
        start_preconditioning_step: Steps before this use the grafting update only.
        statistics_compute_steps: Update the statistics every this many steps.
        preconditioning_compute_steps: In sync mode, recompute the roots every
            this many steps (counted from `start_preconditioning_step`).
        skip_preconditioning_dim_size_gt: Dimensions larger than this are not
            preconditioned (the vocabulary side of an embedding).
        exponent_override: If set, every root is S^(-1/exponent_override)
            instead of S^(-1/(2r)).
        inverse_failure_threshold: A root whose residual error is above this (or
            not finite) is not used; the block keeps its previous root.
        root_method: Root solver, "schur_newton" (coupled Newton) or "eigh".
            This, `matrix_epsilon`, `ridge_mode`, `inverse_failure_threshold` and
            the exponent
            travel with every pushed statistic, so that the service computes the
            root the sync mode would.
        preconditioner: "root" (Shampoo: the stages above) or "eigenbasis" (Adam run
            in the eigenbasis of the Kronecker factors, SOAP; see
            `_eigenbasis_update`). An eigenbasis takes `beta1`, `beta2` and
            `diagonal_epsilon` as its Adam's, needs `graft_type="adam"` and
            `momentum_type="gradient"`, and travels to the service like a root.
        precondition_mode: "sync" computes roots inside the step (host NumPy,
            needs `jit_compile=False`); "async" only uses roots given to
            `assign_preconditioners` (by the preconditioner service); "off"
            keeps no statistics and applies the grafting update alone (a
            baseline that differs from Shampoo only in the preconditioner).
        service_address: Async mode in `model.fit` (`service_callback()`): the
            service's "host:port" (comma-separated for shards); None starts a
            local service child.
        service_token: The service's shared token; None reads
            $PRECOND_SERVICE_TOKEN, if set. Never part of `get_config()`.
        service_tls: A `TlsConfig` (or a dict of its fields) for a TLS service;
            None for plaintext.
        name: Optimizer name.
        **kwargs: Further `keras.optimizers.Optimizer` arguments (clipnorm, ...).
    """

    def __init__(
        self,
        learning_rate: float | keras.optimizers.schedules.LearningRateSchedule = 1e-3,
        block_size: int = 128,
        beta1: float = 0.9,
        beta2: float = 0.999,
        statistics_beta2: float | None = None,
        momentum_type: str = "gradient",
        graft_scope: str = "block",
        nesterov: bool = False,
        weight_decay: float | None = None,
        matrix_epsilon: float = 1e-6,
        ridge_mode: str = "relative",
        diagonal_epsilon: float = 1e-10,
        graft_type: str = "adam",
        start_preconditioning_step: int = 5,
        statistics_compute_steps: int = 1,
        preconditioning_compute_steps: int = 10,
        skip_preconditioning_dim_size_gt: int = 4096,
        exponent_override: int | None = None,
        inverse_failure_threshold: float = 0.1,
        root_method: str = "schur_newton",
        preconditioner: str = "root",
        precondition_mode: str = "sync",
        service_address: str | None = None,
        service_token: str | None = None,
        service_tls: Any = None,
        name: str = "shampoo",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            learning_rate=learning_rate, weight_decay=weight_decay, name=name, **kwargs
        )
        check_arguments(
            block_size=block_size,
            beta1=beta1,
            beta2=beta2,
            statistics_beta2=statistics_beta2,
            momentum_type=momentum_type,
            graft_scope=graft_scope,
            graft_type=graft_type,
            precondition_mode=precondition_mode,
            root_method=root_method,
            preconditioner=preconditioner,
            ridge_mode=ridge_mode,
            start_preconditioning_step=start_preconditioning_step,
            statistics_compute_steps=statistics_compute_steps,
            preconditioning_compute_steps=preconditioning_compute_steps,
            skip_preconditioning_dim_size_gt=skip_preconditioning_dim_size_gt,
            exponent_override=exponent_override,
            matrix_epsilon=matrix_epsilon,
            diagonal_epsilon=diagonal_epsilon,
            inverse_failure_threshold=inverse_failure_threshold,
        )
        self.block_size = int(block_size)
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.statistics_beta2 = self.beta2 if statistics_beta2 is None else float(statistics_beta2)
        self.momentum_type = momentum_type
        self.graft_scope = graft_scope
        self.nesterov = bool(nesterov)
        self.matrix_epsilon = float(matrix_epsilon)
        self.ridge_mode = ridge_mode
        self.diagonal_epsilon = float(diagonal_epsilon)
        self.graft_type = graft_type
        self.start_preconditioning_step = int(start_preconditioning_step)
        self.statistics_compute_steps = int(statistics_compute_steps)
        self.preconditioning_compute_steps = int(preconditioning_compute_steps)
        self.skip_preconditioning_dim_size_gt = int(skip_preconditioning_dim_size_gt)
        self.exponent_override = None if exponent_override is None else int(exponent_override)
        self.inverse_failure_threshold = float(inverse_failure_threshold)
        self.root_method = root_method
        self.preconditioner = preconditioner
        self.precondition_mode = precondition_mode
        self.service_address = service_address
        self.service_token = service_token
        self.service_tls = service_tls
        self._registry = Registry(preconditioner)

    # ------------------------------------------------------------------ build

    def build(self, var_list: Sequence[keras.Variable]) -> None:
        """Creates statistics, roots, grafting and momentum state for `var_list`."""
        if self.built:
            return
        super().build(var_list)
        for variable, path in zip(var_list, key_paths(var_list)):
            self._registry.add(self._var_key(variable), self._build_variable(variable, path))

    def statistic_sides(self) -> list[int]:
        """The side n of every block statistic this optimizer pushes (once built)."""
        return blocking.statistic_sides(s.plan for s in self._registry.by_variable.values())

    def _build_variable(self, variable: keras.Variable, path: str) -> VariableState:
        plan = blocking.make_plan(
            variable.shape, self.block_size, self.skip_preconditioning_dim_size_gt
        )
        if self.precondition_mode == "off":
            plan = dataclasses.replace(
                plan, preconditioned=tuple(False for _ in plan.merged_shape), groups=()
            )
        slot = path.replace("/", "_")
        factors = self._build_factors(plan, slot)
        graft = None
        # The eigenbasis mode keeps its blocks' second moments rotated (below).
        if self.graft_type in ("adagrad", "adam") and not (
            self.preconditioner == "eigenbasis" and plan.groups
        ):
            graft = self.add_variable(variable.shape, "zeros", "float32", name=f"{slot}_graft")
        momentum = None
        if self.beta1 > 0:
            momentum = self.add_variable(
                variable.shape, "zeros", "float32", name=f"{slot}_momentum"
            )
        cosine = None
        if plan.groups and self.preconditioner == "root":
            with tf.init_scope():  # a diagnostic outside Keras's tracked state
                cosine = tf.Variable(float("nan"), trainable=False, name=f"{slot}_cosine")
        # The eigenbasis mode's Adam second moment of each block group, in its basis.
        rotated_second_moments = [
            self.add_variable(
                (group.num_blocks,) + group.block_shape, "zeros", "float32", name=f"{slot}_v_g{g}"
            )
            for g, group in enumerate(plan.groups)
            if self.preconditioner == "eigenbasis"
        ]
        return VariableState(
            path,
            plan,
            self.exponent(plan),
            factors,
            graft,
            momentum,
            cosine,
            rotated_second_moments,
        )

    def _build_factors(self, plan: blocking.BlockPlan, slot: str) -> list[list[Factor]]:
        """Per block group and preconditioned dimension: statistic, preconditioner, step."""
        factors = []
        for g, group in enumerate(plan.groups):
            group_factors = []
            for dim, precondition in enumerate(plan.preconditioned):
                if not precondition:
                    continue
                side = group.block_shape[dim]
                shape = (group.num_blocks, side, side)
                group_factors.append(
                    Factor(
                        dim=dim,
                        statistics=self.add_variable(
                            shape, "zeros", "float32", name=f"{slot}_stat_g{g}_d{dim}"
                        ),
                        # An eigenbasis starts as the identity: Adam until one comes.
                        preconditioner=self.add_variable(
                            shape,
                            _identities if self.preconditioner == "eigenbasis" else "zeros",
                            "float32",
                            name=f"{slot}_root_g{g}_d{dim}",
                        ),
                        stats_step=self.add_variable(
                            (group.num_blocks,),
                            keras.initializers.Constant(NO_PRECONDITIONER),
                            "int64",
                            name=f"{slot}_root_step_g{g}_d{dim}",
                        ),
                    )
                )
            factors.append(group_factors)
        return factors

    def exponent(self, plan: blocking.BlockPlan) -> int:
        """p of the inverse p-th root used for a variable with `plan`."""
        return self.exponent_override or 2 * plan.rank

    # ------------------------------------------------------------ update step

    def update_step(
        self, gradient: tf.Tensor, variable: keras.Variable, learning_rate: tf.Tensor
    ) -> None:
        """Applies one Shampoo step to `variable` (the five stages of the module docstring)."""
        state = self._registry.by_variable[self._var_key(variable)]
        step = tf.cast(self.iterations, tf.int64)
        grad = tf.cast(tf.convert_to_tensor(gradient), tf.float32)
        if self.preconditioner == "eigenbasis":
            update = self._eigenbasis_update(grad, state, step)
            lr = tf.cast(learning_rate, tf.float32)
            self.assign_sub(variable, tf.cast(lr * update, variable.dtype))
            return

        gradient_momentum = state.momentum is not None and self.momentum_type == "gradient"
        # What is preconditioned and grafted: the gradient, or its first moment.
        direction = self._momentum(grad, state, step) if gradient_momentum else grad
        graft = self._graft_update(grad, direction, state, step)
        if state.plan.groups:
            # Statistics always come from the raw gradient.
            self._update_statistics(self._blocks(grad, state), state, step)
            if self.precondition_mode == "sync":
                self._compute_roots(state, step)
            # Until a block of this variable has its roots (and preconditioning has
            # started), the update is the graft's: the preconditioning matmuls are
            # skipped, not computed and masked out.
            any_ready = tf.logical_and(
                step >= self.start_preconditioning_step,
                tf.reduce_any(tf.concat([_ready(factors) for factors in state.factors], axis=0)),
            )
            update = tf.cond(
                any_ready,
                lambda: self._precondition_and_graft(
                    self._blocks(direction, state), graft, state, step
                ),
                lambda: self._graft_only(graft, state),
            )
        else:
            update = graft

        if state.momentum is not None and not gradient_momentum:
            update = self._momentum(update, state, step)

        lr = tf.cast(learning_rate, tf.float32)
        self.assign_sub(variable, tf.cast(lr * update, variable.dtype))

    def _eigenbasis_update(
        self, grad: tf.Tensor, state: VariableState, step: tf.Tensor
    ) -> tf.Tensor:
        """Adam in the eigenbasis of each block's factors (SOAP, arXiv 2409.11321).

        For a block G with bases Q_i (eigenvectors of S_i, largest eigenvalue first):
        G' = G ×_1 Q_1ᵀ ... ×_r Q_rᵀ (for a matrix, Q_Lᵀ G Q_R); Adam's second moment
        v ← β2·v + (1 − β2)·G'² lives in that basis; the first moment m is the
        bias-corrected EMA of G kept in the original coordinates and rotated every
        step, which is what carrying it into each new basis amounts to. The update is
        Q_L (m̂' / (√v̂ + ε)) Q_Rᵀ, no graft. A new basis only replaces Q: entry i of v
        stays with the i-th largest eigenvalue (the reference's matching by eigenvalue
        order), and nothing is reset. A side without a factor (above the size limit),
        or a block without a basis yet, uses the identity there, so a variable with no
        blocks (rank ≤ 1), or any variable before `start_preconditioning_step`, is Adam
        exactly.
        """
        first = self._momentum(grad, state, step) if state.momentum is not None else grad
        if not state.plan.groups:
            return self._graft_update(grad, first, state, step)  # Adam: graft_type "adam"
        grad_blocks, first_blocks = self._blocks(grad, state), self._blocks(first, state)
        self._update_statistics(grad_blocks, state, step)
        if self.precondition_mode == "sync":
            self._compute_roots(state, step)
        plan = state.plan
        bias_correction = 1.0 - tf.pow(self.beta2, tf.cast(step + 1, tf.float32))

        def rotated_adam(rotate: bool) -> tf.Tensor:
            updates = []
            for group_factors, g, m, v in zip(
                state.factors, grad_blocks, first_blocks, state.rotated_second_moments
            ):
                by_dim = {f.dim: f.preconditioner for f in group_factors}
                bases = [by_dim.get(d) if rotate else None for d in range(len(plan.merged_shape))]
                second = self.beta2 * v + (1.0 - self.beta2) * tf.square(
                    blocking.precondition_blocks(g, bases, transpose=True)
                )
                self.assign(v, second)
                rotated = blocking.precondition_blocks(m, bases, transpose=True) / (
                    tf.sqrt(second / bias_correction) + self.diagonal_epsilon
                )
                updates.append(blocking.precondition_blocks(rotated, bases))
            return tf.reshape(blocking.from_blocks(updates, plan), plan.shape)

        # While no block has a basis every Q is the identity: skip the rotations. Before
        # `start_preconditioning_step` bases are not used (held ones wait), as roots.
        any_ready = tf.logical_and(
            step >= self.start_preconditioning_step,
            tf.reduce_any(tf.concat([_ready(f) for f in state.factors], axis=0)),
        )
        return tf.cond(any_ready, lambda: rotated_adam(True), lambda: rotated_adam(False))

    @staticmethod
    def _graft_only(graft: tf.Tensor, state: VariableState) -> tf.Tensor:
        """The update while no block is preconditioned: the graft's; no direction to compare."""
        state.direction_cosine.assign(tf.constant(float("nan")))
        return graft

    @staticmethod
    def _blocks(tensor: tf.Tensor, state: VariableState) -> list[tf.Tensor]:
        merged = tf.reshape(tensor, state.plan.merged_shape)
        return [blocking.to_blocks(merged, group) for group in state.plan.groups]

    def _momentum(self, value: tf.Tensor, state: VariableState, step: tf.Tensor) -> tf.Tensor:
        """Stage 5: the EMA of `value` in `state.momentum`, as `momentum_type` says.

        An exponential moving average keeps the scale of what it averages, so the
        learning rate means the same with and without it. The "gradient" form is
        bias-corrected (Adam's first moment); Nesterov looks one step ahead.
        """
        momentum = self.beta1 * state.momentum + (1.0 - self.beta1) * value
        self.assign(state.momentum, momentum)
        if self.nesterov:
            momentum = self.beta1 * momentum + (1.0 - self.beta1) * value
        if self.momentum_type == "gradient":
            momentum /= 1.0 - tf.pow(self.beta1, tf.cast(step + 1, tf.float32))
        return momentum

    def _graft_update(
        self, grad: tf.Tensor, direction: tf.Tensor, state: VariableState, step: tf.Tensor
    ) -> tf.Tensor:
        """The grafting optimizer's update of `direction`, its accumulators fed with `grad`.

        `direction` is the gradient itself, or its first moment with
        `momentum_type="gradient"` (the "adam" graft is then Adam exactly).
        """
        if self.graft_type == "adagrad":
            accumulator = state.graft + tf.square(grad)
            self.assign(state.graft, accumulator)
            return direction / (tf.sqrt(accumulator) + self.diagonal_epsilon)
        if self.graft_type == "adam":
            second_moment = self.beta2 * state.graft + (1.0 - self.beta2) * tf.square(grad)
            self.assign(state.graft, second_moment)
            bias_correction = 1.0 - tf.pow(self.beta2, tf.cast(step + 1, tf.float32))
            return direction / (tf.sqrt(second_moment / bias_correction) + self.diagonal_epsilon)
        return direction  # "sgd", and "none" for blocks that have no root yet.

    def _update_statistics(
        self, grad_blocks: Sequence[tf.Tensor], state: VariableState, step: tf.Tensor
    ) -> None:
        """Stage 1: S_i <- b S_i + (1 - b) G_(i) G_(i)^T, b = statistics_beta2 (1: S_i += ...)."""

        def update() -> None:
            for blocks, factors in zip(grad_blocks, state.factors):
                new = blocking.kronecker_statistics(blocks, state.plan.preconditioned)
                for factor, gg in zip(factors, new):
                    decay = self.statistics_beta2
                    if decay == 1.0:
                        self.assign_add(factor.statistics, gg)
                    else:
                        self.assign(
                            factor.statistics, decay * factor.statistics + (1.0 - decay) * gg
                        )

        if self.statistics_compute_steps == 1:
            update()
        else:
            tf.cond(
                tf.equal(step % self.statistics_compute_steps, 0),
                lambda: run_then_true(update),
                lambda: tf.constant(False),
            )

    def _compute_roots(self, state: VariableState, step: tf.Tensor) -> None:
        """Stage 2 (sync mode): float64 inverse roots on the host, kept only if good."""
        exponent = state.exponent
        due = tf.logical_and(
            step >= self.start_preconditioning_step,
            tf.equal(
                (step - self.start_preconditioning_step) % self.preconditioning_compute_steps, 0
            ),
        )

        def compute() -> tf.Tensor:
            for factors in state.factors:
                for factor in factors:
                    roots, ok = tf.numpy_function(
                        functools.partial(host_roots, exponent=exponent, **self._root_settings()),
                        [factor.statistics],
                        [tf.float32, tf.bool],
                        stateful=False,
                    )
                    roots = tf.ensure_shape(roots, factor.preconditioner.shape)
                    ok = tf.ensure_shape(ok, factor.stats_step.shape)
                    self.assign(
                        factor.preconditioner,
                        tf.where(ok[:, None, None], roots, factor.preconditioner),
                    )
                    # Named like a pushed statistic: by the update count that
                    # includes this step's gradient (iterations after the step).
                    self.assign(
                        factor.stats_step,
                        tf.where(ok, tf.fill(tf.shape(ok), step + 1), factor.stats_step),
                    )
            return tf.constant(True)

        tf.cond(due, compute, lambda: tf.constant(False))

    def _precondition_and_graft(
        self,
        grad_blocks: Sequence[tf.Tensor],
        graft: tf.Tensor,
        state: VariableState,
        step: tf.Tensor,
    ) -> tf.Tensor:
        """Stages 3 and 4: Shampoo direction where roots exist, grafted (`graft_scope`)."""
        plan = state.plan
        started = step >= self.start_preconditioning_step
        merged_graft = tf.reshape(graft, plan.merged_shape)
        directions, grafts, masks = [], [], []
        for group, blocks, factors in zip(plan.groups, grad_blocks, state.factors):
            by_dim = {f.dim: f for f in factors}
            preconditioners = [
                by_dim[d].preconditioner if d in by_dim else None
                for d in range(len(plan.merged_shape))
            ]
            directions.append(blocking.precondition_blocks(blocks, preconditioners))
            grafts.append(blocking.to_blocks(merged_graft, group))
            mask = tf.cast(tf.logical_and(_ready(factors), started), tf.float32)
            masks.append(tf.reshape(mask, [-1] + [1] * len(group.block_shape)))

        # Masked sums over the variable's blocks, shared by the per-layer graft
        # scale and the direction cosine: d·g, |d|², |g|².
        dot, d_sq, g_sq = (
            tf.add_n([tf.reduce_sum(m * x * y) for m, x, y in zip(masks, xs, ys)])
            for xs, ys in ((directions, grafts), (directions, directions), (grafts, grafts))
        )
        scales = self._graft_scales(directions, grafts, tf.sqrt(g_sq), tf.sqrt(d_sq))
        norms = tf.sqrt(d_sq) * tf.sqrt(g_sq)
        state.direction_cosine.assign(
            tf.where(norms > 0, dot / tf.maximum(norms, 1e-30), float("nan"))
        )
        updates = [
            m * scale * d + (1.0 - m) * g
            for m, scale, d, g in zip(masks, scales, directions, grafts)
        ]
        return tf.reshape(blocking.from_blocks(updates, plan), plan.shape)

    def _graft_scales(
        self,
        directions: Sequence[tf.Tensor],
        grafts: Sequence[tf.Tensor],
        graft_norm: tf.Tensor,
        shampoo_norm: tf.Tensor,
    ) -> list[tf.Tensor]:
        """Per block group, what the Shampoo direction is multiplied by.

        "Decoupling step size and direction": the direction takes the norm of the
        grafting update, over the preconditioned blocks of the whole variable
        (`graft_scope="layer"`, from `graft_norm` and `shampoo_norm` over the
        preconditioned blocks) or of each block alone ("block").
        """
        if self.graft_type == "none":
            return [tf.constant(1.0) for _ in directions]
        if self.graft_scope == "block":
            scales = []
            for d, g in zip(directions, grafts):
                axes = list(range(1, len(d.shape)))  # all but the block index
                graft_sq = tf.reduce_sum(tf.square(g), axis=axes, keepdims=True)
                shampoo_sq = tf.reduce_sum(tf.square(d), axis=axes, keepdims=True)
                scales.append(tf.math.divide_no_nan(tf.sqrt(graft_sq), tf.sqrt(shampoo_sq)))
            return scales
        scale = tf.math.divide_no_nan(graft_norm, shampoo_norm)
        return [scale for _ in directions]

    def direction_cosines(self) -> dict[str, float]:
        """Per variable (key path): cosine of Shampoo's direction with the graft's update.

        Over the blocks preconditioned at the last step; NaN while none is. 1 means
        Shampoo moved like the grafting optimizer; lower, how much it turned the step.
        """
        self._check_built("direction_cosines")
        return self._registry.direction_cosines()

    # ------------------------------------------------------- asynchronous seam

    def statistics_snapshot(self) -> list[StatisticsBlock]:
        """Every block's current statistic, for the preconditioner service.

        Call it on the host, between steps (eagerly). Blocks whose statistic is
        still all zero are left out: they carry no information yet.

        Returns:
            One `StatisticsBlock` per (block, preconditioned dimension), with the
            current step (the update count), the root settings (exponent p, ridge,
            failure threshold, method) and a float32 copy.
        """
        return self.read_statistics().blocks()

    def read_statistics(self) -> StatisticsSnapshot:
        """The statistics as they are now; `.blocks()` converts them, on any thread.

        Reading is cheap, so the training thread can hand the conversion and the
        push to another thread (see `ServicePreconditioning`).
        """
        self._check_built("read_statistics")
        return self._registry.snapshot(int(self.iterations.numpy()), **self._root_settings())

    def _root_settings(self) -> dict[str, Any]:
        """How every root is computed, in the sync mode and by the service alike."""
        return {
            "ridge_epsilon": self.matrix_epsilon,
            "ridge_mode": self.ridge_mode,
            "failure_threshold": self.inverse_failure_threshold,
            "method": self.root_method,
            "preconditioner": self.preconditioner,
        }

    def assign_preconditioners(
        self, entries: Iterable[PreconditionerBlock | tuple[str, int, np.ndarray]]
    ) -> int:
        """Installs roots computed elsewhere, keeping only ones newer than held.

        Call it on the host, between steps (eagerly).

        Args:
            entries: `PreconditionerBlock`s, or (key, stats_step, root) tuples.

        Returns:
            How many blocks took a new root.

        Raises:
            KeyError: A key that no block of this optimizer has.
            ValueError: A root of the wrong shape or with non-finite values.
        """
        self._check_built("assign_preconditioners")
        return self._registry.install(entries)

    def root_variables(self) -> list[keras.Variable]:
        """Every variable `assign_preconditioners` writes: each factor's roots and stats_steps."""
        self._check_built("root_variables")
        return self._registry.root_variables()

    def preconditioner_stats_steps(self) -> dict[str, int]:
        """Key -> stats_step of the root each block uses (NO_PRECONDITIONER if none)."""
        self._check_built("preconditioner_stats_steps")
        return self._registry.held_steps()

    def _check_built(self, what: str) -> None:
        if not self.built:
            raise RuntimeError(
                f"Shampoo.{what}() needs the optimizer built: call "
                "optimizer.build(model.trainable_variables) or apply gradients once first"
            )

    # ----------------------------------------------------------------- config

    def get_config(self) -> dict[str, Any]:
        from trainer.optimizers import fit_service  # imports this module

        config = super().get_config()
        config.update(
            {
                "block_size": self.block_size,
                "beta1": self.beta1,
                "beta2": self.beta2,
                "statistics_beta2": self.statistics_beta2,
                "momentum_type": self.momentum_type,
                "graft_scope": self.graft_scope,
                "nesterov": self.nesterov,
                "matrix_epsilon": self.matrix_epsilon,
                "ridge_mode": self.ridge_mode,
                "diagonal_epsilon": self.diagonal_epsilon,
                "graft_type": self.graft_type,
                "start_preconditioning_step": self.start_preconditioning_step,
                "statistics_compute_steps": self.statistics_compute_steps,
                "preconditioning_compute_steps": self.preconditioning_compute_steps,
                "skip_preconditioning_dim_size_gt": self.skip_preconditioning_dim_size_gt,
                "exponent_override": self.exponent_override,
                "inverse_failure_threshold": self.inverse_failure_threshold,
                "root_method": self.root_method,
                "preconditioner": self.preconditioner,
                "precondition_mode": self.precondition_mode,
                "service_address": self.service_address,
                # The token is a secret: a saved model does not carry it.
                "service_tls": fit_service.tls_fields(self.service_tls),
            }
        )
        return config

    def service_callback(self) -> keras.callbacks.Callback:
        """The `model.fit` callback of the async mode: service, client, pushes, installs.

        See `trainer.optimizers.fit_service` (it closes them when training ends).

        Raises:
            ValueError: The optimizer is not in async mode.
        """
        from trainer.optimizers import fit_service  # imports this module

        return fit_service.ShampooFitCallback(self)


def _ready(factors: Sequence[Factor]) -> tf.Tensor:
    """Per block of a group: whether every one of its factors has a root (it is preconditioned)."""
    return tf.reduce_all(tf.stack([f.stats_step >= 0 for f in factors], axis=0), axis=0)


def _identities(shape: Sequence[int], dtype: Any = "float32") -> tf.Tensor:
    """Initializer of a [k, n, n] stack of identity matrices (the eigenbasis mode's start)."""
    return tf.eye(shape[-1], batch_shape=shape[:-2], dtype=dtype)


def run_then_true(fn) -> tf.Tensor:
    """Runs `fn` for its assignments; `tf.cond` needs both branches to return alike."""
    fn()
    return tf.constant(True)
