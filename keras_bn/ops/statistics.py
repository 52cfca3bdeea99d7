r"""Batch statistics, for the ops, the fused path and the layer.

Per feature, over the `N` positions that statistics are taken over (all, or
the unmasked ones): `mean = sum(x) / N` and the biased `variance =
sum((x - mean)^2) / N`; `N = 0` gives 0 for both, not NaN.

`moments` uses a shifted two-pass algorithm. With `pivot` the values at the
first position (per feature; with a mask, the plain mean of the unmasked
values, as the first position may be padding), `mean = pivot + sum(x -
pivot) / N`, then `variance = sum((x - mean)^2) / N`. The shift keeps the
partial sums near the spread of `x` rather than its offset (accurate for
1e4 + N(0, 1) in float32), and the variance cannot go negative.

`combine_moments` merges the statistics of several parts of a batch (the
replicas of `keras_bn.ops.sync`) as Chan et al. (1979) do:

    n  = sum_i n_i
    m  = sum_i n_i * m_i / n
    M2 = sum_i n_i * v_i + sum_i n_i * (m_i - m)^2
    variance = M2 / n

Every term is a sum of non-negative or centred quantities, so there is no
`E[x^2] - E[x]^2` cancellation, and a part with no positions contributes
nothing.
"""

import math

import tensorflow as tf


def sum_over(t, axes):
    """`t` summed over `axes`, kept as size-1 axes."""
    return tf.reduce_sum(t, axis=axes, keepdims=True)


def masked(t, mask):
    """`t` with the masked-out positions set to 0 (`t` itself without a mask)."""
    return t if mask is None else tf.where(mask, t, tf.zeros([], t.dtype))


def count_positions(x, reduced_axes):
    """`N` without a mask: a Python int if known statically, else int64."""
    sizes = [x.shape[a] for a in reduced_axes]
    if None not in sizes:
        return math.prod(sizes)
    return tf.reduce_prod(tf.gather(tf.shape(x, out_type=tf.int64), reduced_axes))


def moments(x, reduced_axes, mask=None):
    """`(mean, variance, centred, count)` of `x` over `reduced_axes` (module
    docstring), at broadcast shape: positions where the optional `mask` is
    False left out, but `centred = x - mean` everywhere."""
    dtype, red, rank = x.dtype, reduced_axes, x.shape.rank
    if mask is None:
        count = tf.reshape(tf.cast(count_positions(x, red), dtype), [1] * rank)
        safe_count = tf.maximum(count, 1.0)
        # The shift: the values at the first position (0 if there is none).
        first = tuple(slice(0, 1) if a in red else slice(None) for a in range(rank))
        pivot = sum_over(x[first], red)
    else:
        count = sum_over(tf.cast(mask, dtype), red)
        safe_count = tf.maximum(count, 1.0)
        # The first position may be masked-out padding far from the data: the
        # shift is the plain mean of the unmasked values instead.
        pivot = sum_over(masked(x, mask), red) / safe_count
    mean = pivot + sum_over(masked(x - pivot, mask), red) / safe_count
    centred = x - mean
    variance = sum_over(tf.square(masked(centred, mask)), red) / safe_count
    return mean, variance, centred, count


def combine_moments(counts, means, variances):
    """`(count, mean, variance)` of the parts stacked on axis 0, together."""
    total = tf.reduce_sum(counts, axis=0)
    safe_total = tf.maximum(total, 1.0)
    mean = tf.reduce_sum(counts * means, axis=0) / safe_total
    within = tf.reduce_sum(variances * counts, axis=0)
    m2 = within + tf.reduce_sum(counts * tf.square(means - mean), axis=0)
    return total, mean, tf.maximum(m2 / safe_total, 0.0)


def from_unbiased(mean, variance, count):
    """`(mean, biased variance, count)` from a kernel's unbiased variance, the
    count in float32 (0 for both statistics when `N = 0`)."""
    if isinstance(count, int) and count > 0:
        return mean, variance * ((count - 1) / count), tf.constant(float(count))
    count = tf.cast(count, tf.float32)
    has_positions = count > 0
    safe_count = tf.maximum(count, 1.0)
    mean = tf.where(has_positions, mean, 0.0)
    variance = tf.where(has_positions, variance * (safe_count - 1.0), 0.0)
    return mean, variance / safe_count, count


def unbiased_variance(variance, count):
    """Bessel's correction, `variance * N / (N - 1)` (none for `N <= 1`)."""
    return variance * count / tf.maximum(count - 1.0, 1.0)
