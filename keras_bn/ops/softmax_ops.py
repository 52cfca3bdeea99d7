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

Both backward passes read the op's own output (the one input-sized tensor
kept, in float32 for float16 and bfloat16 inputs), so differentiating them
runs through the op again: every order is exact (`keras_bn/ops/custom_op.py`).
"""

import tensorflow as tf

from keras_bn.ops.axes import axes_for_rank
from keras_bn.ops.axes import static_rank
from keras_bn.ops.checks import check_axis
from keras_bn.ops.custom_op import custom_op
from keras_bn.ops.dtypes import compute_dtype
from keras_bn.ops.dtypes import float_tensor


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
    return softmax_over(x, check_axis(axis))


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
    return softmax_over(x, check_axis(axis), log=True)


def softmax_over(x, axis, log=False):
    """`softmax` (`log_softmax` if `log`) for an `axis` that passed `check_axis`."""
    x = float_tensor(x, "x")
    axes = list(axes_for_rank(axis, static_rank(x, "x"), require_reduced_axis=False))
    dtype = compute_dtype(x.dtype)

    def forward(x):
        xf = tf.cast(x, dtype)
        z = xf - tf.reduce_max(xf, axis=axes, keepdims=True)
        exp_z = tf.exp(z)
        total = tf.reduce_sum(exp_z, axis=axes, keepdims=True)
        y = z - tf.math.log(total) if log else exp_z / total
        # Where the output is rounded (float16, bfloat16), the backward pass
        # reads a full-precision copy, returned as a hidden output.
        return (tf.cast(y, x.dtype),), () if y.dtype == x.dtype else (y,), None

    def backward(context, upstream, hidden_upstream):
        dy = tf.cast(upstream[0], dtype)
        if not context.hidden:
            y = tf.cast(context.outputs[0], dtype)
        else:
            # The copy is the same function of `x`: its upstream gradient adds
            # to the output's, and one vector-Jacobian product serves both.
            y = context.hidden[0]
            if context.live(hidden_upstream[0]):
                dy += hidden_upstream[0]
        if log:
            dx = dy - tf.exp(y) * tf.reduce_sum(dy, axis=axes, keepdims=True)
        else:
            dx = y * (dy - tf.reduce_sum(dy * y, axis=axes, keepdims=True))
        return (tf.cast(dx, context.inputs[0].dtype),)

    return custom_op(forward, backward, x, first_order_reads=())[0]
