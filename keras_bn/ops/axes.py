"""Axis bookkeeping shared by the normalization ops and layers."""

import itertools
import math

import tensorflow as tf

from keras_bn.ops.checks import check_axis


def canonicalize_axes(axis, rank, arg_name="axis", require_reduced_axis=True):
    """Returns the feature axes as a sorted tuple of non-negative ints.

    Args:
        axis: An int or a list/tuple of ints, possibly negative: the axes that
            are kept (the feature axes); every other axis is reduced.
        rank: The rank of the input.
        arg_name: The argument name used in error messages.
        require_reduced_axis: If True (normalization), at least one axis must
            be left out of `axis`. False for reductions over `axis` (softmax).

    Returns:
        A sorted tuple of distinct axes in `[0, rank)`.

    Raises:
        TypeError: If `axis` is not an int or a sequence of ints.
        ValueError: If an axis is out of range or repeated, or no axis would
            be left to reduce over.

    Example:

    >>> canonicalize_axes(-1, 4)
    (3,)
    >>> canonicalize_axes([3, 1], 4)
    (1, 3)
    """
    axes = check_axis(axis, arg_name)
    return axes_for_rank(axes, rank, arg_name, require_reduced_axis)


def axes_for_rank(axes, rank, arg_name="axis", require_reduced_axis=True):
    """`canonicalize_axes` for `axes` that passed `check_axis`."""
    axes = [axes] if isinstance(axes, int) else list(axes)
    given = axes[0] if len(axes) == 1 else axes
    for a in axes:
        if not -rank <= a < rank:
            raise ValueError(
                f"Argument `{arg_name}` has an axis {a} out of range for an "
                f"input of rank {rank}: expected values in [{-rank}, {rank}). "
                f"Received: {arg_name}={given}"
            )
    canonical = [a % rank for a in axes]
    if len(set(canonical)) != len(canonical):
        raise ValueError(
            f"Argument `{arg_name}` repeats an axis for an input of rank "
            f"{rank}. Received: {arg_name}={given}"
        )
    if require_reduced_axis and len(canonical) >= rank:
        raise ValueError(
            f"Argument `{arg_name}` keeps every axis of an input of rank "
            f"{rank}, leaving none to compute statistics over. Inputs need a "
            f"rank of at least {len(canonical) + 1}. "
            f"Received: {arg_name}={given}"
        )
    return tuple(sorted(canonical))


def static_rank(x, arg_name="inputs"):
    """The rank of `x`, which must be known when the graph is built."""
    rank = x.shape.rank
    if rank is None:
        raise ValueError(
            f"`{arg_name}` must have a known rank. Received a tensor of "
            f"unknown rank with dtype {x.dtype.name}."
        )
    return rank


def broadcast_shape(x, axes):
    """The shape of `x` with 1 on every non-feature axis; static if known."""
    rank = x.shape.rank
    if all(x.shape[a] is not None for a in axes):
        return [x.shape[a] if a in axes else 1 for a in range(rank)]
    dynamic = tf.shape(x)
    return tf.stack([dynamic[a] if a in axes else 1 for a in range(rank)])


def merge_adjacent_axes(rank, axes):
    """`range(rank)` as `(is_feature, [axis, ...])` runs of adjacent feature
    (in the sorted `axes`) or reduced axes: `[(False, [0, 1, 2]), (True, [3])]`
    for `(4, (3,))`. A reduction over adjacent axes equals one over their
    product, which compilers (XLA on CPU especially) loop over faster."""
    runs = itertools.groupby(range(rank), lambda a: a in axes)
    return [(is_feature, list(run)) for is_feature, run in runs]


def merged_shape(x, groups, features=True, reduced=True):
    """The shape of `x` with each run of `groups` merged into one axis, and
    size 1 for runs of a kind not kept; static where the sizes are known."""
    static = x.shape.as_list()
    keep = {True: features, False: reduced}
    runs = [run if keep[is_feature] else [] for is_feature, run in groups]
    if all(static[a] is not None for _, run in groups for a in run):
        return [math.prod(static[a] for a in run) for run in runs]
    dynamic = tf.shape(x, out_type=tf.int64)  # products may pass 2**31
    one = tf.constant(1, tf.int64)
    return tf.stack([tf.reduce_prod(tf.gather(dynamic, r)) if r else one for r in runs])
