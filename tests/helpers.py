"""Independent references for the tests: NumPy closed forms and TF autodiff."""

import numpy as np
import tensorflow as tf


def canonical_axes(axis, rank):
    axes = [axis] if isinstance(axis, int) else list(axis)
    return sorted(a % rank for a in axes)


def param_shape(shape, axis):
    return tuple(shape[a] for a in canonical_axes(axis, len(shape)))


def expand_param(v, rank, axes):
    """Reshapes a parameter of the feature axes' shape to broadcast against x."""
    shape = [1] * rank
    for a, d in zip(axes, np.shape(v)):
        shape[a] = d
    return np.reshape(v, shape)


def expand_mask(mask, rank, axes):
    for a in axes:
        mask = np.expand_dims(mask, a)
    return mask


def numpy_batch_norm_train(x, gamma, beta, axis, epsilon, mask=None):
    """Closed-form forward pass in float64: (y, mean, biased variance)."""
    x = np.asarray(x, np.float64)
    rank = x.ndim
    axes = canonical_axes(axis, rank)
    red = tuple(i for i in range(rank) if i not in axes)
    if mask is None:
        w = np.ones([1 if i in axes else x.shape[i] for i in range(rank)])
    else:
        w = expand_mask(np.asarray(mask, np.float64), rank, axes)
    w = np.broadcast_to(w, x.shape)
    count = np.maximum(w.sum(axis=red, keepdims=True), 1.0)
    mean = (w * x).sum(axis=red, keepdims=True) / count
    var = (w * (x - mean) ** 2).sum(axis=red, keepdims=True) / count
    y = (x - mean) / np.sqrt(var + epsilon)
    if gamma is not None:
        y = y * expand_param(gamma, rank, axes)
    if beta is not None:
        y = y + expand_param(beta, rank, axes)
    out_shape = param_shape(x.shape, axis)
    return y, mean.reshape(out_shape), var.reshape(out_shape)


def autodiff_batch_norm_train(
    x, gamma, beta, axis, epsilon, mask=None, renorm_stats=None, clip=(None,) * 3
):
    """The same math as `ops.batch_norm_train` in plain TF ops, for autodiff.

    Masked outputs are constants (stop_gradient), renorm's r and d too.
    """
    rank = x.shape.rank
    axes = canonical_axes(axis, rank)
    red = [i for i in range(rank) if i not in axes]
    bshape = [x.shape[i] if i in axes else 1 for i in range(rank)]
    if mask is None:
        w = tf.ones_like(x)
    else:
        m = tf.cast(mask, x.dtype)
        for a in axes:
            m = tf.expand_dims(m, a)
        w = tf.broadcast_to(m, tf.shape(x))
    count = tf.maximum(tf.reduce_sum(w, red, keepdims=True), 1.0)
    mean = tf.reduce_sum(w * x, red, keepdims=True) / count
    var = tf.reduce_sum(w * tf.square(x - mean), red, keepdims=True) / count
    x_hat = (x - mean) / tf.sqrt(var + epsilon)
    if renorm_stats is not None:
        renorm_mean, renorm_stddev = (tf.reshape(v, bshape) for v in renorm_stats)
        renorm_stddev = tf.maximum(renorm_stddev, np.sqrt(epsilon))
        r = tf.sqrt(var + epsilon) / renorm_stddev
        d = (mean - renorm_mean) / renorm_stddev
        rmin, rmax, dmax = clip
        if rmin is not None:
            r = tf.maximum(r, rmin)
        if rmax is not None:
            r = tf.minimum(r, rmax)
        if dmax is not None:
            d = tf.clip_by_value(d, -dmax, dmax)
        x_hat = x_hat * tf.stop_gradient(r) + tf.stop_gradient(d)
    y = x_hat
    if gamma is not None:
        y = y * tf.reshape(gamma, bshape)
    if beta is not None:
        y = y + tf.reshape(beta, bshape)
    if mask is not None:
        y = tf.where(w > 0, y, tf.stop_gradient(y))
    return (
        y,
        tf.reshape(mean, param_shape(x.shape, axis)),
        tf.reshape(var, param_shape(x.shape, axis)),
    )


def float32_mean_tolerance(values):
    """Absolute error bound of a float32 mean of `values` against the exact
    float64 mean: rounding the result to float32 costs half a unit in the
    last place at its magnitude, and the shifted pairwise sums at most about
    one more. Two units in the last place bound both."""
    return 2 * float(np.spacing(np.float32(np.max(np.abs(values)))))


def random_mask(rng, shape, axis, keep=0.7):
    """A random mask for inputs of `shape` (feature axes removed), never empty."""
    axes = canonical_axes(axis, len(shape))
    mshape = [d for i, d in enumerate(shape) if i not in axes]
    mask = rng.random(mshape) < keep
    mask.flat[0] = True
    return mask
