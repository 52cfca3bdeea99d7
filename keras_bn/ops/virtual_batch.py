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

from keras_bn.ops.checks import checked_at_run_time

GROUPINGS = ("interleaved", "consecutive")


def to_virtual_batches(x, axes, virtual_batch_size, params, grouping="interleaved"):
    """`(x_split, axes, params)`: the layer's training input `x` in virtual
    batches by `grouping`, its feature `axes` (sorted, not 0) shifted and
    joined by the one that numbers the virtual batches, `params` (or None)
    copied per virtual batch. A size that does not divide the batch raises."""
    batch = x.shape[0]
    message = (
        f"Argument `virtual_batch_size` ({virtual_batch_size}) must divide "
        "the batch size"
    )
    if batch is not None and batch % virtual_batch_size:
        raise ValueError(f"{message}. Received: inputs.shape={x.shape}")
    shape = tf.shape(x)
    if batch is None:  # known only at run time
        divides = tf.equal(tf.math.floormod(shape[0], virtual_batch_size), 0)
        shape = checked_at_run_time(shape, divides, message)
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
