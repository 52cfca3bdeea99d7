r"""Cross-replica batch statistics for `tf.distribute` (synchronized BN).

Forward: each replica has its count `n_i`, mean `m_i` and variance `v_i`.
One all-gather brings every replica's triple to every replica, which combines
them exactly, as Chan et al. (1979) do (`keras_bn.ops.statistics`); a replica
with no examples (`n_i = 0`) contributes nothing.

Backward: the single-device formula needs the global sums `S1 = sum(dy)` and
`S2 = sum(dy * (x - m))`, and the upstream gradients of the (shared) batch
statistics summed over replicas; one all-reduce of those four per-feature
vectors gives every replica the `dx` it would have on the global batch.
`dgamma` and `dbeta` stay per-replica: the strategy sums variable gradients
across replicas, which yields the global `inv * S2` and `S1`.
"""

import tensorflow as tf

from keras_bn.ops import statistics


def replica_context(synchronized):
    """The replica context to synchronize over, or None (local statistics):
    not `synchronized`, in a cross-replica context, or one replica."""
    context = tf.distribute.get_replica_context() if synchronized else None
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    return context


def combine_moments(context, count, mean, variance):
    """Global `(count, mean, variance)` from each replica's local ones."""
    count = tf.broadcast_to(count, tf.shape(mean))
    local = tf.stack([count, mean, variance])[None]
    gathered = context.all_gather(local, axis=0)
    return statistics.combine_moments(*(gathered[:, i] for i in range(3)))


def sum_over_replicas(context, *tensors):
    """All-reduces (SUM) same-shaped tensors in one collective."""
    summed = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.stack(tensors))
    return tf.unstack(summed)
