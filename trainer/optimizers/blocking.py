"""How Shampoo cuts one variable into blocks: a static plan, then the tensor moves.

The plan is pure Python (shapes only), made once per variable when the optimizer
is built; the helpers below it apply the plan to tensors inside `tf.function`.

A variable's shape is first *merged*: dimensions of size 1 are dropped and
adjacent dimensions are merged while their product stays within `block_size`,
never below two dimensions (a [3, 3, 64, 128] kernel with block size 1024 becomes
[576, 128]; a [6, 4] matrix stays as it is). Each merged
dimension is then either *preconditioned* (size <= `skip_preconditioning_dim_size_gt`)
or left alone (the vocabulary side of an embedding). Preconditioned dimensions
larger than `block_size` are split into blocks of `block_size` with one ragged
block at the end; dimensions left alone are never split, since splitting them
would only multiply the number of statistics.

Blocks of equal shape form a *group* and are stored and processed as one batch:
the full blocks, the ragged row, the ragged column and so on (at most 2^r groups
for r merged dimensions), so that every statistic and every preconditioning is a
batched matmul rather than one small op per block.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Sequence

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class BlockGroup:
    """Equally shaped blocks of one variable, processed as one batch.

    Attributes:
        parts: Per merged dimension, 0 for the part made of full blocks and 1
            for the ragged remainder.
        slices: Per merged dimension, the (start, stop) range that the group covers.
        grid: Per merged dimension, how many blocks the group has along it.
        block_shape: Shape of each block.
        coords: Per block (row-major over `grid`), its block coordinates in the
            whole variable's block grid.
    """

    parts: tuple[int, ...]
    slices: tuple[tuple[int, int], ...]
    grid: tuple[int, ...]
    block_shape: tuple[int, ...]
    coords: tuple[tuple[int, ...], ...]

    @property
    def num_blocks(self) -> int:
        return len(self.coords)


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """How one variable is merged, blocked and preconditioned.

    Attributes:
        shape: The variable's own shape.
        merged_shape: Shape after dropping size-1 dimensions and merging small ones.
        preconditioned: Per merged dimension, whether it gets a Kronecker factor.
        groups: The block groups, covering the merged tensor exactly once.
    """

    shape: tuple[int, ...]
    merged_shape: tuple[int, ...]
    preconditioned: tuple[bool, ...]
    groups: tuple[BlockGroup, ...]

    @property
    def rank(self) -> int:
        """Number of preconditioned dimensions (r in the exponent -1/(2r))."""
        return sum(self.preconditioned)

    @property
    def num_blocks(self) -> int:
        return sum(group.num_blocks for group in self.groups)


def merge_small_dims(shape: Sequence[int], block_size: int) -> tuple[int, ...]:
    """Drops size-1 dimensions and merges adjacent ones while the product fits.

    Merging stops at two dimensions, so a small matrix keeps both of its factors.

    Args:
        shape: The variable's shape.
        block_size: Largest product that adjacent dimensions are merged into.

    Returns:
        The merged shape; () for a scalar or a tensor of size-1 dimensions only.
    """
    dims = [dim for dim in shape if dim != 1]
    merged: list[int] = []
    for i, dim in enumerate(dims):
        # Never merge below two dimensions: a [6, 4] matrix keeps both factors.
        keeps_rank_2 = len(merged) + len(dims) - i - 1 >= 2
        if merged and merged[-1] * dim <= block_size and keeps_rank_2:
            merged[-1] *= dim
        else:
            merged.append(dim)
    return tuple(merged)


def make_plan(
    shape: Sequence[int], block_size: int, skip_preconditioning_dim_size_gt: int
) -> BlockPlan:
    """Plans the blocking of a variable of `shape`.

    Args:
        shape: The variable's shape (fully defined).
        block_size: Largest block side.
        skip_preconditioning_dim_size_gt: Merged dimensions larger than this are
            not preconditioned.

    Returns:
        The plan. A variable of merged rank <= 1, or whose dimensions are all
        skipped, gets a plan with rank 0 and no groups: it uses the grafting
        optimizer alone.
    """
    shape = tuple(int(d) for d in shape)
    merged = merge_small_dims(shape, block_size)
    preconditioned = tuple(d <= skip_preconditioning_dim_size_gt for d in merged)
    if len(merged) < 2 or not any(preconditioned):
        return BlockPlan(shape, merged, tuple(False for _ in merged), ())

    # Per dimension, the parts it has: (part id, start, stop, block side, count).
    parts_per_dim = []
    for size, precondition in zip(merged, preconditioned):
        if not precondition or size <= block_size:
            parts_per_dim.append([(0, 0, size, size, 1)])
            continue
        full, rest = divmod(size, block_size)
        dim_parts = [(0, 0, full * block_size, block_size, full)]
        if rest:
            dim_parts.append((1, full * block_size, size, rest, 1))
        parts_per_dim.append(dim_parts)

    groups = []
    for combo in itertools.product(*parts_per_dim):
        grid = tuple(part[4] for part in combo)
        # A ragged part's only block sits after the full blocks of its dimension.
        offsets = tuple(
            0 if part[0] == 0 else dim_parts[0][4] for part, dim_parts in zip(combo, parts_per_dim)
        )
        coords = tuple(
            tuple(o + i for o, i in zip(offsets, index))
            for index in itertools.product(*(range(n) for n in grid))
        )
        groups.append(
            BlockGroup(
                parts=tuple(part[0] for part in combo),
                slices=tuple((part[1], part[2]) for part in combo),
                grid=grid,
                block_shape=tuple(part[3] for part in combo),
                coords=coords,
            )
        )
    return BlockPlan(shape, merged, preconditioned, tuple(groups))


def statistic_sides(plans: Iterable[BlockPlan]) -> list[int]:
    """The side n of every block statistic (one per block and preconditioned dimension).

    What a run pushes to the service: `len` is its number of keys, and each key holds
    an n x n float32 statistic and, at the service, an n x n float64 root.
    """
    return [
        group.block_shape[dim]
        for plan in plans
        for group in plan.groups
        for dim, preconditioned in enumerate(plan.preconditioned)
        if preconditioned
        for _ in range(group.num_blocks)
    ]


def to_blocks(merged: tf.Tensor, group: BlockGroup) -> tf.Tensor:
    """Cuts `group`'s blocks out of a merged-shape tensor.

    Args:
        merged: Tensor of the plan's merged shape.
        group: The group to cut.

    Returns:
        [num_blocks, *block_shape], blocks in the row-major order of `group.coords`.
    """
    rank = len(group.grid)
    part = merged[tuple(slice(start, stop) for start, stop in group.slices)]
    interleaved = [n for pair in zip(group.grid, group.block_shape) for n in pair]
    part = tf.reshape(part, interleaved)
    part = tf.transpose(part, [2 * i for i in range(rank)] + [2 * i + 1 for i in range(rank)])
    return tf.reshape(part, (group.num_blocks,) + group.block_shape)


def from_blocks(blocks_per_group: Sequence[tf.Tensor], plan: BlockPlan) -> tf.Tensor:
    """Inverse of `to_blocks` over all groups: reassembles the merged tensor.

    Args:
        blocks_per_group: For each group of `plan`, its [num_blocks, *block_shape].
        plan: The plan the blocks were cut with.

    Returns:
        The tensor of `plan.merged_shape`.
    """
    rank = len(plan.merged_shape)
    parts = {}
    for group, blocks in zip(plan.groups, blocks_per_group):
        x = tf.reshape(blocks, group.grid + group.block_shape)
        x = tf.transpose(x, [j for i in range(rank) for j in (i, rank + i)])
        parts[group.parts] = tf.reshape(x, [stop - start for start, stop in group.slices])

    def assemble(prefix: tuple[int, ...]) -> tf.Tensor:
        if len(prefix) == rank:
            return parts[prefix]
        pieces = [
            assemble(prefix + (k,))
            for k in (0, 1)
            if any(key[: len(prefix) + 1] == prefix + (k,) for key in parts)
        ]
        return pieces[0] if len(pieces) == 1 else tf.concat(pieces, axis=len(prefix))

    return assemble(())


def kronecker_statistics(blocks: tf.Tensor, preconditioned: Sequence[bool]) -> list[tf.Tensor]:
    """Per preconditioned dimension i, the batch of G_(i) G_(i)ᵀ over the blocks.

    Args:
        blocks: [num_blocks, b_0, ..., b_{r-1}].
        preconditioned: Per block dimension, whether to compute its statistic.

    Returns:
        One [num_blocks, b_i, b_i] tensor per preconditioned dimension, in order.
    """
    rank = len(preconditioned)
    statistics = []
    for i, precondition in enumerate(preconditioned):
        if not precondition:
            continue
        # Unfold along dimension i: [nb, b_i, product of the others].
        perm = [0, i + 1] + [j + 1 for j in range(rank) if j != i]
        unfolded = tf.transpose(blocks, perm)
        unfolded = tf.reshape(unfolded, [tf.shape(blocks)[0], blocks.shape[i + 1], -1])
        statistics.append(tf.matmul(unfolded, unfolded, transpose_b=True))
    return statistics


def precondition_blocks(
    blocks: tf.Tensor, preconditioners: Sequence[tf.Tensor | None], transpose: bool = False
) -> tf.Tensor:
    """Computes G ×_1 P_1 ×_2 ... ×_r P_r for a batch of blocks (P_iᵀ with `transpose`).

    Each step contracts the leading block dimension with its P (P·X, or Pᵀ·X) and
    rotates it to the back, so after r steps the dimensions are back in order. For a
    matrix that is P_1 G P_2ᵀ: with symmetric roots Shampoo's L^(-1/4) G R^(-1/4);
    with eigenbases Q, Q_Lᵀ G Q_R (`transpose=True`) and its inverse Q_L G' Q_Rᵀ.

    Args:
        blocks: [num_blocks, b_0, ..., b_{r-1}].
        preconditioners: Per block dimension, [num_blocks, b_i, b_i] or None for
            a dimension that is not preconditioned.
        transpose: Multiply by each P transposed.

    Returns:
        The preconditioned blocks, same shape as `blocks`.
    """
    shape = blocks.shape
    num_blocks = tf.shape(blocks)[0]
    dims = list(shape[1:])
    x = blocks
    for preconditioner in preconditioners:
        lead = dims[0]
        rest = math.prod(dims[1:])
        x = tf.reshape(x, [num_blocks, lead, rest])
        if preconditioner is not None:
            x = tf.matmul(preconditioner, x, transpose_a=transpose)
        x = tf.transpose(x, [0, 2, 1])
        dims = dims[1:] + [lead]
        x = tf.reshape(x, [num_blocks] + dims)
    return x
