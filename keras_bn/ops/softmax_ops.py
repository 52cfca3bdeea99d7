r"""Softmax and log-softmax with hand-written backward passes.

Over the softmax axes (one axis or several), with `m = max(x)`:

    softmax(x)_i     = exp(x_i - m) / sum_j exp(x_j - m)
    log_softmax(x)_i = (x_i - m) - log(sum_j exp(x_j - m))

The shift by the maximum cancels in the ratio, keeps every exponent <= 0 (no
overflow) and makes the sum at least 1 (its logarithm is finite), so both are
exact and stable for any finite input. A slice that is entirely -inf has no
maximum to shift by and gives NaN, as `tf.nn.softmax` does.

Backward pass of softmax. The Jacobian is `dy_i/dx_j = y_i (delta_ij - y_j)`,
so for an upstream gradient `dy`

    dx_j = sum_i dy_i y_i (delta_ij - y_j) = y_j (dy_j - sum_i dy_i y_i)

which needs only the output `y`.

Backward pass of log-softmax. With `y = log_softmax(x)`,
`dy_i/dx_j = delta_ij - softmax(x)_j`, so

    dx_j = dy_j - softmax(x)_j sum_i dy_i,    softmax(x) = exp(y)

which needs only the output as well: the softmax is recovered as `exp(y)`.

Both ops keep one input-sized tensor for the backward pass (the output, in the
compute dtype). float16 and bfloat16 inputs are computed in float32 and the
output cast back; float64 stays float64.
"""

import tensorflow as tf

from keras_bn.ops.axes import static_rank
from keras_bn.ops.axes import validate_axis_argument
from keras_bn.ops.batch_norm import compute_dtype

_FLOATS = (tf.float16, tf.bfloat16, tf.float32, tf.float64)


def float_tensor(value, arg_name):
    """`value` as a tensor; a TypeError naming `arg_name` unless it is float."""
    value = tf.convert_to_tensor(value)
    if value.dtype not in _FLOATS:
        raise TypeError(
            f"`{arg_name}` must be a floating-point tensor (float16, bfloat16, "
            f"float32 or float64). Received dtype: {value.dtype.name}"
        )
    return value


def softmax_axes(axis, rank, arg_name="axis"):
    """The axes a softmax normalizes over, as a sorted tuple in `[0, rank)`.

    Args:
        axis: An int or a non-empty list/tuple of distinct ints, possibly
            negative.
        rank: The rank of the input.
        arg_name: The argument name used in error messages.

    Returns:
        A sorted tuple of distinct non-negative axes.

    Raises:
        TypeError: If `axis` is not an int or a list/tuple of ints.
        ValueError: If an axis is out of range or repeated.
    """
    axes = validate_axis_argument(axis, arg_name)
    axes = [axes] if isinstance(axes, int) else axes
    for a in axes:
        if not -rank <= a < rank:
            raise ValueError(
                f"Argument `{arg_name}` has an axis {a} out of range for an "
                f"input of rank {rank}: expected values in [{-rank}, {rank}). "
                f"Received: {arg_name}={axis}"
            )
    canonical = sorted(a % rank for a in axes)
    if len(set(canonical)) != len(canonical):
        raise ValueError(
            f"Argument `{arg_name}` repeats an axis. Received: {arg_name}={axis}"
        )
    return tuple(canonical)


def _prepare(x, axis):
    x = float_tensor(x, "x")
    axes = softmax_axes(axis, static_rank(x, "x"))
    return x, list(axes), compute_dtype(x.dtype)


def _shifted(xf, axes):
    """`(x - max(x), sum(exp(x - max(x))))`, the sum kept at broadcast shape."""
    z = xf - tf.reduce_max(xf, axis=axes, keepdims=True)
    return z, tf.reduce_sum(tf.exp(z), axis=axes, keepdims=True)


def softmax(x, axis=-1):
    r"""Softmax, stable for any finite input, with a hand-written gradient.

    `softmax(x)_i = exp(x_i - max(x)) / sum_j exp(x_j - max(x))` over `axis`.
    Backward pass: `dx = y * (dy - sum(dy * y))` with `y` the output, summed
    over `axis` (derivation in this module's docstring).

    Args:
        x: Float tensor of known rank.
        axis: The axis to normalize over, or a list/tuple of axes (the softmax
            then runs over their joint entries).

    Returns:
        A tensor of the shape and dtype of `x`, non-negative and summing to 1
        over `axis`. float16/bfloat16 inputs are computed in float32.

    Example:

    >>> softmax(tf.constant([[1.0, 2.0, 1.0]]))
    <tf.Tensor: shape=(1, 3), dtype=float32,
    numpy=array([[0.21194157, 0.5761169 , 0.21194157]], dtype=float32)>
    """
    x, axes, dtype = _prepare(x, axis)

    @tf.custom_gradient
    def forward(x):
        # Only the gradient below differentiates this function: stopping the
        # tape here keeps an outer eager tape from holding intermediates.
        x = tf.stop_gradient(x)
        z, total = _shifted(tf.cast(x, dtype), axes)
        y = tf.exp(z) / total

        def grad(dy):
            dy = tf.cast(dy, dtype)
            dx = y * (dy - tf.reduce_sum(dy * y, axis=axes, keepdims=True))
            return tf.cast(dx, x.dtype)

        return tf.cast(y, x.dtype), grad

    return forward(x)


def log_softmax(x, axis=-1):
    r"""Log-softmax, stable for any finite input, with a hand-written gradient.

    `log_softmax(x)_i = (x_i - max(x)) - log(sum_j exp(x_j - max(x)))` over
    `axis`, computed without forming the softmax (no `log(0)` for very
    negative entries). Backward pass: `dx = dy - exp(y) * sum(dy)` with `y`
    the output, summed over `axis`.

    Args:
        x: Float tensor of known rank.
        axis: The axis to normalize over, or a list/tuple of axes.

    Returns:
        A tensor of the shape and dtype of `x`, with `logsumexp` 0 over `axis`.
        float16/bfloat16 inputs are computed in float32; in float16, values
        below -65504 (logit gaps that large) round to -inf.

    Example:

    >>> log_softmax(tf.constant([0.0, 1e4]))
    <tf.Tensor: shape=(2,), dtype=float32, numpy=array([-10000., 0.],
    dtype=float32)>
    """
    x, axes, dtype = _prepare(x, axis)

    @tf.custom_gradient
    def forward(x):
        x = tf.stop_gradient(x)
        z, total = _shifted(tf.cast(x, dtype), axes)
        y = z - tf.math.log(total)

        def grad(dy):
            dy = tf.cast(dy, dtype)
            dx = dy - tf.exp(y) * tf.reduce_sum(dy, axis=axes, keepdims=True)
            return tf.cast(dx, x.dtype)

        return tf.cast(y, x.dtype), grad

    return forward(x)
