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
from keras_bn.ops.dtypes import statically_zero

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
    """Reshapes `x` for the kernels: returns (x4, data_format)."""
    rank = x.shape.rank
    shape = tf.shape(x)
    if axis == rank - 1:
        if rank == 4:
            return x, "NHWC"
        middle = tf.reduce_prod(shape[1:-1])
        return tf.reshape(x, tf.stack([shape[0], middle, 1, shape[-1]])), "NHWC"
    if rank == 4:
        return x, "NCHW"
    rest = tf.reduce_prod(shape[2:])
    return tf.reshape(x, tf.stack([shape[0], shape[1], rest, 1])), "NCHW"


def _scale_offset(gamma, beta, channels):
    scale = tf.ones([channels]) if gamma is None else tf.cast(gamma, tf.float32)
    offset = tf.zeros([channels]) if beta is None else tf.cast(beta, tf.float32)
    return scale, offset


def fused_batch_norm_train(x, gamma, beta, axis, epsilon):
    """Training-mode batch norm on the fused kernels; see `batch_norm_train`.

    `axis` is the single, non-negative feature axis; the caller has checked
    `fused_unavailable_reason`. Returns `(y, batch_mean, batch_variance, count)`,
    statistics in float32 with the biased variance.
    """
    params = {k: v for k, v in (("gamma", gamma), ("beta", beta)) if v is not None}
    channels = x.shape[axis]
    empty = tf.constant([], tf.float32)

    @tf.custom_gradient
    def forward(x, *values):
        x = tf.stop_gradient(x)
        p = dict(zip(params, [tf.stop_gradient(v) for v in values]))
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
        count = tf.cast(tf.size(x, out_type=tf.int64), tf.float32) / channels
        has_examples = count > 0
        mean = tf.where(has_examples, out.batch_mean, 0.0)
        variance = tf.where(
            has_examples, out.batch_variance * (tf.maximum(count, 1.0) - 1.0), 0.0
        ) / tf.maximum(count, 1.0)
        reserve = (out.reserve_space_1, out.reserve_space_2, out.reserve_space_3)

        def grad(dy, dmean, dvariance, dcount):
            del dcount  # a count has no gradient
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
            dx = tf.reshape(dx4, tf.shape(x))
            dx = _add_statistics_gradient(dx, x, mean, dmean, dvariance, count, axis)
            grads = {"gamma": dscale, "beta": doffset}
            return (dx,) + tuple(
                tf.cast(grads[name], v.dtype) for name, v in zip(params, values)
            )

        y = tf.reshape(out.y, tf.shape(x))
        return (y, mean, variance, count), grad

    return forward(x, *params.values())


def _add_statistics_gradient(dx, x, mean, dmean, dvariance, count, axis):
    """dx + dmean / N + 2 * dvariance * (x - mean) / N, when those are nonzero."""
    if statically_zero(dmean) and statically_zero(dvariance):
        return dx
    shape = [1] * x.shape.rank
    shape[axis] = -1

    def with_statistics():
        b = tf.reshape(2.0 * dvariance / count, shape)
        c = tf.reshape(dmean / count, shape)
        centred = tf.cast(x, tf.float32) - tf.reshape(mean, shape)
        return tf.cast(tf.cast(dx, tf.float32) + (centred * b + c), dx.dtype)

    live = tf.reduce_any(tf.not_equal(dmean, 0.0)) | tf.reduce_any(
        tf.not_equal(dvariance, 0.0)
    )
    return tf.cond(live, with_statistics, lambda: dx)


def fused_batch_norm_inference(x, mean, variance, gamma, beta, axis, epsilon):
    """The inference forward pass on the fused kernel: one pass over `x`.

    Returns `y` only; `batch_norm_inference` wraps it with its closed-form
    backward pass.
    """
    scale, offset = _scale_offset(gamma, beta, x.shape[axis])
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
    return tf.reshape(out.y, tf.shape(x))
