r"""Batch normalization on TensorFlow's fused kernels, behind a custom gradient.

`FusedBatchNormV3` / `FusedBatchNormGradV3` make about 4 passes over the
input for a training step, against about 12 for the closed form of
`batch_norm.py`. Where they apply, and when `fused=None` takes them: the
layer's `fused` option (docs/layer.md). Any rank >= 2 is viewed as 4-D.

The kernel's backward pass is the closed form of `batch_norm.py`
(`dx = gamma * inv * (dy - S1 / N - x_hat * S2' / N)` with
`S2' = sum(dy * x_hat)`, `dgamma = S2'`, `dbeta = S1`). The kernel returns the
unbiased batch variance; it is rescaled by `(N - 1) / N` to the biased
variance that the layer's moving average uses. Gradients reaching the
returned statistics are added in closed form (`dmean / N` and
`2 * dvariance * (x - mean) / N`), skipped at run time when they are zero.
"""

import tensorflow as tf

from keras_bn.ops.axes import static_rank
from keras_bn.ops.custom_op import custom_op
from keras_bn.ops.statistics import count_positions
from keras_bn.ops.statistics import from_unbiased

_FUSED_DTYPES = (tf.float16, tf.bfloat16, tf.float32)
MIN_EPSILON = 1.001e-5  # cuDNN's minimum


def fused_unavailable_reason(x, axes, epsilon, mask, renorm, synchronized):
    """Why the fused kernels cannot compute this case, or None if they can."""
    if synchronized:
        return "the statistics are synchronized across replicas"
    if mask is not None:
        return "a mask is given"
    if renorm:
        return "renorm is on"
    if x.dtype not in _FUSED_DTYPES:
        return f"the input dtype is {x.dtype.name} (fused: float16, bfloat16, float32)"
    rank = static_rank(x, "x")
    if len(axes) != 1 or axes[0] not in (1, rank - 1):
        return (
            f"the feature axes are {list(axes)} (fused: one axis, the last or 1) "
            f"for an input of rank {rank}"
        )
    if epsilon < MIN_EPSILON:
        return f"epsilon={epsilon} is below the fused kernels' minimum {MIN_EPSILON}"
    return None


def _as_4d(x, axis):
    """`(x4, data_format)`: `x` as the kernels' 4-D input, ranks 2 and 3 with
    size-1 axes (`ExpandDims`, which export converters fold away), higher
    ranks with their middle axes merged."""
    rank = x.shape.rank
    last = axis == rank - 1
    data_format = "NHWC" if last else "NCHW"
    for _ in range(4 - rank):
        x = tf.expand_dims(x, rank - 1 if last else -1)
    if rank > 4:
        shape = tf.shape(x)
        if last:
            shape = [shape[0], tf.reduce_prod(shape[1:-1]), 1, shape[-1]]
        else:
            shape = [shape[0], shape[1], tf.reduce_prod(shape[2:]), 1]
        x = tf.reshape(x, tf.stack(shape))
    return x, data_format


def _from_4d(y4, x, axis):
    """The inverse of `_as_4d`: `y4` back in the shape of `x`."""
    rank = x.shape.rank
    if rank > 4:
        return tf.reshape(y4, tf.shape(x))
    added = range(rank - 1, 3) if axis == rank - 1 else range(rank, 4)
    return tf.squeeze(y4, list(added)) if rank < 4 else y4


def _scale(gamma, x, axis):
    """`gamma` as the kernels' float32 `scale` (ones without it)."""
    if gamma is not None:
        return tf.cast(gamma, tf.float32)
    return tf.ones([x.shape[axis] if x.shape[axis] is not None else tf.shape(x)[axis]])


def _fused(x, params, axis, epsilon):
    """`(FusedBatchNormV3's outputs, x4, data_format)`, training without `mean`."""
    scale = _scale(params.get("gamma"), x, axis)
    beta = params.get("beta")
    offset = tf.zeros_like(scale) if beta is None else tf.cast(beta, tf.float32)
    x4, data_format = _as_4d(x, axis)
    training = "mean" not in params
    empty = tf.constant([], tf.float32)
    out = tf.raw_ops.FusedBatchNormV3(
        x=x4,
        scale=scale,
        offset=offset,
        mean=empty if training else tf.cast(params["mean"], tf.float32),
        variance=empty if training else tf.cast(params["variance"], tf.float32),
        epsilon=epsilon,
        data_format=data_format,
        is_training=training,
    )
    return out, x4, data_format


def fused_batch_norm_train(x, params, axis, epsilon):
    """`batch_norm_train` on the fused kernels (statistics in float32). Its
    backward pass differentiates again: through `FusedBatchNormGradV3`'s
    gradient, or, where a tape records it, `_closed_form_backward`."""
    names = tuple(params)

    def forward(x, *values):
        out, x4, data_format = _fused(x, dict(zip(names, values)), axis, epsilon)
        count = count_positions(x, [a for a in range(x.shape.rank) if a != axis])
        mean, variance, count = from_unbiased(out.batch_mean, out.batch_variance, count)
        reserve = (out.reserve_space_1, out.reserve_space_2, out.reserve_space_3)
        y = _from_4d(out.y, x, axis)
        return (y, mean, variance, count), (), (reserve, data_format, x4)

    def backward(context, upstream, hidden_upstream):
        x, *values = context.inputs
        dy, dmean, dvariance, _ = upstream  # a count has no gradient
        scale = _scale(dict(zip(names, values)).get("gamma"), x, axis)
        kernel = _closed_form_backward if context.recording else _kernel_backward
        dx, dscale, doffset = kernel(context, dy, scale, axis, epsilon)
        dx = _add_statistics_gradient(context, dx, dmean, dvariance, axis)
        grads = {"gamma": dscale, "beta": doffset}
        return (dx, *(tf.cast(grads[n], v.dtype) for n, v in zip(names, values)))

    # The backward pass reads x (its 4-D view) and the statistics, not y.
    return custom_op(
        forward, backward, x, *params.values(), first_order_output_reads=(1, 2, 3)
    )


def _kernel_backward(context, dy, scale, axis, epsilon):
    """`(dx, dscale, doffset)` from `FusedBatchNormGradV3`, for `dy` alone."""
    x = context.inputs[0]
    reserve, data_format, x4 = context.saved
    if not tf.executing_eagerly():
        # tf.gradients may differentiate this graph again: view the original x.
        x4, _ = _as_4d(x, axis)
    dx4, dscale, doffset, _, _ = tf.raw_ops.FusedBatchNormGradV3(
        y_backprop=_as_4d(dy, axis)[0],
        x=x4,
        scale=scale,
        reserve_space_1=reserve[0],
        reserve_space_2=reserve[1],
        reserve_space_3=reserve[2],
        epsilon=epsilon,
        data_format=data_format,
        is_training=True,
    )
    return _from_4d(dx4, x, axis), dscale, doffset


def _closed_form_backward(context, dy, scale, axis, epsilon):
    """The kernels' backward pass in plain ops of `x` and the outputs, for a
    tape to record: the registered gradient of `FusedBatchNormGradV3` holds a
    nested tape that a forward accumulator cannot see through."""
    x = context.inputs[0]
    _, mean, variance, count = context.outputs
    shape = [-1 if a == axis else 1 for a in range(x.shape.rank)]
    red = [a for a in range(x.shape.rank) if a != axis]
    centred = tf.cast(x, tf.float32) - tf.reshape(mean, shape)
    inv = tf.math.rsqrt(tf.reshape(variance, shape) + epsilon)
    dy = tf.cast(dy, tf.float32)
    s1 = tf.reduce_sum(dy, red, keepdims=True)
    s2 = tf.reduce_sum(dy * centred, red, keepdims=True)
    safe_count = tf.maximum(count, 1.0)
    a = tf.reshape(scale, shape) * inv
    dx = a * (dy - s1 / safe_count - centred * tf.square(inv) * s2 / safe_count)
    return tf.cast(dx, x.dtype), tf.reshape(inv * s2, [-1]), tf.reshape(s1, [-1])


def _add_statistics_gradient(context, dx, dmean, dvariance, axis):
    """`dx + dmean / N + 2 * dvariance * (x - mean) / N`, if those are nonzero."""
    if not (context.live(dmean, hidden=False) or context.live(dvariance, hidden=False)):
        return dx
    x = context.inputs[0]
    _, mean, _, count = context.outputs
    shape = [-1 if a == axis else 1 for a in range(x.shape.rank)]

    def with_statistics():
        b = tf.reshape(2.0 * dvariance / count, shape)
        c = tf.reshape(dmean / count, shape)
        centred = tf.cast(x, tf.float32) - tf.reshape(mean, shape)
        return tf.cast(tf.cast(dx, tf.float32) + (centred * b + c), dx.dtype)

    if tf.executing_eagerly() or context.recording:
        return with_statistics()
    live = tf.reduce_any(tf.not_equal(dmean, 0.0) | tf.not_equal(dvariance, 0.0))
    return tf.cond(live, with_statistics, lambda: dx)


def fused_batch_norm_inference(x, params, axis, epsilon):
    """`y` of `batch_norm_inference` on the fused kernel, `params` by name."""
    return _from_4d(_fused(x, params, axis, epsilon)[0].y, x, axis)
