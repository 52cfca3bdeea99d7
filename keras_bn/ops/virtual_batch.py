"""Ghost Batch Normalization (Hoffer et al., 2017): virtual sub-batches.

A batch of `B` examples is viewed as `B / v` virtual batches of `v` examples,
and the axis that numbers them joins the feature axes, so every virtual batch
gets its own statistics from the same ops (and the same hand-written
gradient). Two groupings:

- `"interleaved"` (tf-keras's): `[B, ...] -> [v, B / v, ...]`, so virtual
  batch `j` holds examples `j, j + B/v, j + 2B/v, ...`;
- `"consecutive"`: `[B, ...] -> [B / v, v, ...]`.
"""

import tensorflow as tf

from keras_bn.ops.checks import divisible_at_run_time

GROUPINGS = ("interleaved", "consecutive")


def to_virtual_batches(x, axes, virtual_batch_size, params, grouping="interleaved"):
    """The layer's training input `x` (`[B, ...]`, feature `axes` sorted,
    non-negative, not 0) split into virtual batches of `virtual_batch_size`
    examples by `grouping` (module docstring): `(x_split, axes, params)`, the
    axes shifted by one and joined by the one that numbers the virtual
    batches, and the per-feature `params` (or None) broadcast to one copy per
    virtual batch. A size that does not divide a known batch size raises a
    ValueError; one known only at run time an InvalidArgumentError.
    """
    batch = x.shape[0]
    message = (
        f"Argument `virtual_batch_size` ({virtual_batch_size}) must divide "
        "the batch size"
    )
    if batch is not None and batch % virtual_batch_size:
        raise ValueError(f"{message}. Received: inputs.shape={x.shape}")
    shape = tf.shape(x)
    if batch is None:  # known only at run time
        shape = divisible_at_run_time(shape, virtual_batch_size, message)
    interleaved = grouping == "interleaved"
    split = [virtual_batch_size, -1] if interleaved else [-1, virtual_batch_size]
    x_split = tf.reshape(x, tf.concat([split, shape[1:]], axis=0))
    numbering = 1 if interleaved else 0  # the virtual batches' axis
    per_batch = tf.shape(x_split)[numbering : numbering + 1]
    params = [
        v if v is None else tf.broadcast_to(v, tf.concat([per_batch, tf.shape(v)], 0))
        for v in params
    ]
    return x_split, (numbering,) + tuple(a + 1 for a in axes), params


def from_virtual_batches(outputs, mean, variance, inputs):
    """The ops' results back for the layer: `outputs` in the shape of
    `inputs`, and the statistics averaged over the virtual batches (each
    holds `v` examples, so the plain mean weighs them alike)."""
    return (
        tf.reshape(outputs, tf.shape(inputs)),
        tf.reduce_mean(mean, axis=0),
        tf.reduce_mean(variance, axis=0),
    )
