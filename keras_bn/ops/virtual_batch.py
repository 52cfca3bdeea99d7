"""Ghost Batch Normalization (Hoffer et al., 2017): virtual sub-batches.

A batch of `B` examples is viewed as `B / v` virtual batches of `v` examples,
`[B, ...] -> [B / v, v, ...]`, and the new leading axis joins the feature
axes, so every virtual batch gets its own statistics from the same ops. The
reshapes and the broadcast of per-feature parameters are linear bookkeeping
around the hand-written batch-norm gradient.
"""

import tensorflow as tf

from keras_bn.ops.checks import divisible_at_run_time


def split_virtual_batches(x, virtual_batch_size, mask=None):
    """Reshapes `x` (and `mask`) from `[B, ...]` to `[B / v, v, ...]`.

    Raises:
        ValueError: If the batch size is known and not a multiple of
            `virtual_batch_size`; an InvalidArgumentError with the same
            message when it is known only at run time.
    """
    batch = x.shape[0]
    if batch is not None and batch % virtual_batch_size:
        raise ValueError(
            f"Argument `virtual_batch_size` ({virtual_batch_size}) must divide "
            f"the batch size. Received: inputs.shape={x.shape}"
        )

    message = (
        f"Argument `virtual_batch_size` ({virtual_batch_size}) must divide the "
        "batch size"
    )

    def split(t):
        shape = tf.shape(t)
        if batch is None:  # known only at run time
            shape = divisible_at_run_time(shape, virtual_batch_size, message)
        rest = shape[1:]
        return tf.reshape(t, tf.concat([[-1, virtual_batch_size], rest], axis=0))

    return split(x), None if mask is None else split(mask)


def per_virtual_batch(value, x_split):
    """Broadcasts a per-feature tensor to one copy per virtual batch."""
    if value is None:
        return None
    shape = tf.concat([tf.shape(x_split)[:1], tf.shape(value)], axis=0)
    return tf.broadcast_to(value, shape)
