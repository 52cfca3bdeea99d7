r"""Batch normalization on TensorFlow's fused kernels, behind a custom gradient.

`FusedBatchNormV3` / `FusedBatchNormGradV3` make about 4 passes over the
input for a training step, against about 12 for the closed form in
`batch_norm.py`; cuDNN implements both on GPUs. They apply to float16,
bfloat16 and float32 inputs whose single feature axis is the last one (viewed
as NHWC) or axis 1 (viewed as NCHW), without a mask and with
`epsilon >= 1.001e-5` (cuDNN's minimum). Any rank >= 2 is reshaped to 4-D.

The kernel's backward pass is the closed form of `batch_norm.py`
(`dx = gamma * inv * (dy - S1 / N - x_hat * S2' / N)` with
`S2' = sum(dy * x_hat)`, `dgamma = S2'`, `dbeta = S1`). The kernel returns the
unbiased batch variance; it is rescaled by `(N - 1) / N` to the biased
variance that the layer's moving average uses. Gradients reaching the
returned statistics are added in closed form (`dmean / N` and
`2 * dvariance * (x - mean) / N`), skipped at run time when they are zero.

The fused kernels take the mean in one pass: for inputs with a large offset
relative to their spread (1e4 + N(0, 1) in float32) the mean is off by about
1e-2 standard deviations, as in Keras's and TensorFlow's own layers; the
closed form (`fused=False`) keeps it to rounding.
"""

import tensorflow as tf

from keras_bn.ops.axes import static_rank
from keras_bn.ops.custom_op import custom_op
from keras_bn.ops.statistics import count_positions
from keras_bn.ops.statistics import from_unbiased

_FUSED_DTYPES = (tf.float16, tf.bfloat16, tf.float32)
MIN_EPSILON = 1.001e-5


def fused_unavailable_reason(
    x, axes, epsilon, mask=None, renorm=False, synchronized=False
):
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
    """Views `x` as the kernels' 4-D input: returns (x4, data_format).

    Rank 4 is taken as it is; ranks 2 and 3 gain size-1 axes (`ExpandDims`
    with constant axes, which export converters fold away, unlike a reshape
    to a shape computed at run time); higher ranks merge their middle axes.
    """
    rank = x.shape.rank
    last = axis == rank - 1
    data_format = "NHWC" if last else "NCHW"
    if rank == 4:
        return x, data_format
    if rank < 4:
        # [N, C] -> [N, 1, 1, C] (NHWC) or [N, C, 1, 1] (NCHW); [N, L, C] ->
        # [N, L, 1, C] or [N, C, L, 1].
        for _ in range(4 - rank):
            x = tf.expand_dims(x, rank - 1 if last else -1)
        return x, data_format
    shape = tf.shape(x)
    if last:
        middle = tf.reduce_prod(shape[1:-1])
        return tf.reshape(x, tf.stack([shape[0], middle, 1, shape[-1]])), data_format
    rest = tf.reduce_prod(shape[2:])
    return tf.reshape(x, tf.stack([shape[0], shape[1], rest, 1])), data_format


def _from_4d(y4, x, axis):
    """The inverse of `_as_4d`: `y4` back in the shape of `x`."""
    rank = x.shape.rank
    if rank == 4:
        return y4
    if rank < 4:
        added = range(rank - 1, 3) if axis == rank - 1 else range(rank, 4)
        return tf.squeeze(y4, list(added))
    return tf.reshape(y4, tf.shape(x))


def _channels(x, axis):
    """The size of the feature axis: static where known, else a tensor."""
    return x.shape[axis] if x.shape[axis] is not None else tf.shape(x)[axis]


def _per_channel(x, axis):
    """The shape of a per-channel vector broadcast against `x`."""
    return [-1 if a == axis else 1 for a in range(x.shape.rank)]


def _reduced(x, axis):
    return [a for a in range(x.shape.rank) if a != axis]


def _scale_offset(gamma, beta, channels):
    scale = tf.ones([channels]) if gamma is None else tf.cast(gamma, tf.float32)
    offset = tf.zeros([channels]) if beta is None else tf.cast(beta, tf.float32)
    return scale, offset


def fused_batch_norm_train(x, gamma, beta, axis, epsilon):
    """Training-mode batch norm on the fused kernels; see `batch_norm_train`.

    `axis` is the single, non-negative feature axis; the caller has checked
    `fused_unavailable_reason`. Returns `(y, batch_mean, batch_variance, count)`,
    statistics in float32 with the biased variance.

    The backward pass calls `FusedBatchNormGradV3` on the original `x` and
    `gamma` (not the stopped copies), and adds the statistics' terms from the
    op's own `mean` output: TensorFlow's registered gradient of that kernel
    (the closed form, recomputed from `x` in differentiable ops) then gives
    every higher order.
    """
    names = tuple(k for k, v in (("gamma", gamma), ("beta", beta)) if v is not None)
    channels = _channels(x, axis)
    empty = tf.constant([], tf.float32)

    def forward(x, *values):
        p = dict(zip(names, values))
        scale, offset = _scale_offset(p.get("gamma"), p.get("beta"), channels)
        x4, data_format = _as_4d(x, axis)
        out = tf.raw_ops.FusedBatchNormV3(
            x=x4,
            scale=scale,
            offset=offset,
            mean=empty,
            variance=empty,
            epsilon=epsilon,
            data_format=data_format,
            is_training=True,
        )
        count = count_positions(x, _reduced(x, axis))
        mean, variance, count = from_unbiased(out.batch_mean, out.batch_variance, count)
        reserve = (out.reserve_space_1, out.reserve_space_2, out.reserve_space_3)
        y = _from_4d(out.y, x, axis)
        return (y, mean, variance, count), (), (reserve, data_format, x4)

    def backward(context, upstream, hidden_upstream):
        del hidden_upstream  # none
        x, *values = context.inputs
        dy, dmean, dvariance, _ = upstream  # a count has no gradient
        p = dict(zip(names, values))
        scale, _ = _scale_offset(p.get("gamma"), None, channels)
        if context.recording:
            dx, dscale, doffset = _closed_form_backward(
                context, dy, scale, axis, epsilon
            )
        else:
            dx, dscale, doffset = _kernel_backward(
                context.saved, x, dy, scale, axis, epsilon
            )
        _, mean, _, count = context.outputs
        dx = _add_statistics_gradient(
            context, dx, x, mean, dmean, dvariance, count, axis
        )
        grads = {"gamma": dscale, "beta": doffset}
        return (dx,) + tuple(
            tf.cast(grads[name], v.dtype) for name, v in zip(names, values)
        )

    params = [v for v in (gamma, beta) if v is not None]
    # The backward pass reads x (its 4-D view) and the statistics, not y.
    return custom_op(forward, backward, x, *params, first_order_output_reads=(1, 2, 3))


def _kernel_backward(saved, x, dy, scale, axis, epsilon):
    """`(dx, dscale, doffset)` from `FusedBatchNormGradV3`, for `dy` alone
    (the statistics' upstream terms are added by the caller)."""
    reserve, data_format, x4 = saved
    if not tf.executing_eagerly():
        # tf.gradients may differentiate this graph again: the view of the
        # original x, not of the stopped one. (Eagerly, an unrecorded
        # backward pass is never differentiated.)
        x4, _ = _as_4d(x, axis)
    dy4, _ = _as_4d(dy, axis)
    dx4, dscale, doffset, _, _ = tf.raw_ops.FusedBatchNormGradV3(
        y_backprop=dy4,
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
    r"""The fused kernels' backward pass in plain ops (`batch_norm.py`'s
    closed form), for a backward pass that is itself differentiated: from
    the original `x` and the op's `mean` and `variance` outputs, so
    differentiating it runs through this op again.
    (TensorFlow's registered gradient of `FusedBatchNormGradV3` holds a
    nested tape that a forward accumulator cannot see through: its JVPs would
    come out None eagerly and zero in a graph.)
    """
    x = context.inputs[0]
    _, mean, variance, count = context.outputs
    shape, red = _per_channel(x, axis), _reduced(x, axis)
    centred = tf.cast(x, tf.float32) - tf.reshape(mean, shape)
    inv = tf.math.rsqrt(tf.reshape(variance, shape) + epsilon)
    dy = tf.cast(dy, tf.float32)
    s1 = tf.reduce_sum(dy, red, keepdims=True)
    s2 = tf.reduce_sum(dy * centred, red, keepdims=True)
    safe_count = tf.maximum(count, 1.0)
    a = tf.reshape(scale, shape) * inv
    dx = a * (dy - s1 / safe_count - centred * tf.square(inv) * s2 / safe_count)
    return (
        tf.cast(dx, x.dtype),
        tf.reshape(inv * s2, [-1]),
        tf.reshape(s1, [-1]),
    )


def _add_statistics_gradient(context, dx, x, mean, dmean, dvariance, count, axis):
    """dx + dmean / N + 2 * dvariance * (x - mean) / N, when those are nonzero.

    From the original `x` and the op's `mean` output, so a differentiated
    backward pass runs through this op again.
    """
    if not (context.live(dmean, hidden=False) or context.live(dvariance, hidden=False)):
        return dx
    shape = _per_channel(x, axis)

    def with_statistics():
        b = tf.reshape(2.0 * dvariance / count, shape)
        c = tf.reshape(dmean / count, shape)
        centred = tf.cast(x, tf.float32) - tf.reshape(mean, shape)
        return tf.cast(tf.cast(dx, tf.float32) + (centred * b + c), dx.dtype)

    if tf.executing_eagerly() or context.recording:
        return with_statistics()
    live = tf.reduce_any(tf.not_equal(dmean, 0.0)) | tf.reduce_any(
        tf.not_equal(dvariance, 0.0)
    )
    return tf.cond(live, with_statistics, lambda: dx)


def fused_batch_norm_inference(x, mean, variance, gamma, beta, axis, epsilon):
    """The inference forward pass on the fused kernel: one pass over `x`.

    Returns `y` only; `batch_norm_inference` wraps it with its closed-form
    backward pass.
    """
    scale, offset = _scale_offset(gamma, beta, _channels(x, axis))
    x4, data_format = _as_4d(x, axis)
    out = tf.raw_ops.FusedBatchNormV3(
        x=x4,
        scale=scale,
        offset=offset,
        mean=tf.cast(mean, tf.float32),
        variance=tf.cast(variance, tf.float32),
        epsilon=epsilon,
        data_format=data_format,
        is_training=False,
    )
    return _from_4d(out.y, x, axis)
