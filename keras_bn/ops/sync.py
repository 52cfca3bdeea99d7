r"""Cross-replica batch statistics for `tf.distribute` (synchronized BN).

Forward: each replica has its count `n_i`, mean `m_i` and centred sum of
squares `M2_i = sum((x - m_i)^2)`. One all-gather brings every replica's
triple to every replica, which combines them as Chan et al. (1979) do:

    n  = sum_i n_i
    m  = sum_i n_i * m_i / n
    M2 = sum_i M2_i + sum_i n_i * (m_i - m)^2
    variance = M2 / n

Every term is a sum of non-negative or centred quantities, so there is no
`E[x^2] - E[x]^2` cancellation, and a replica with no examples (`n_i = 0`)
contributes nothing.

Backward: the single-device formula needs the global sums `S1 = sum(dy)` and
`S2 = sum(dy * (x - m))`, and the upstream gradients of the (shared) batch
statistics summed over replicas; one all-reduce of those four per-feature
vectors gives every replica the `dx` it would have on the global batch.
`dgamma` and `dbeta` stay per-replica: the strategy sums variable gradients
across replicas, which yields the global `inv * S2` and `S1`.
"""

import tensorflow as tf


def replica_context(synchronized):
    """The replica context to synchronize over, or None.

    None when `synchronized` is False, in a cross-replica context, or when
    there is a single replica: statistics are then computed locally.
    """
    if not synchronized:
        return None
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    return context


def combine_moments(context, count, mean, variance):
    """Global `(count, mean, variance)` from each replica's local ones.

    All arguments share one broadcast shape (size 1 on the reduced axes).
    """
    count = tf.broadcast_to(count, tf.shape(mean))
    local = tf.stack([count, mean, variance * count])[None]
    gathered = context.all_gather(local, axis=0)
    counts, means, m2s = gathered[:, 0], gathered[:, 1], gathered[:, 2]
    total = tf.reduce_sum(counts, axis=0)
    safe_total = tf.maximum(total, 1.0)
    global_mean = tf.reduce_sum(counts * means, axis=0) / safe_total
    m2 = tf.reduce_sum(m2s, axis=0) + tf.reduce_sum(
        counts * tf.square(means - global_mean), axis=0
    )
    return total, global_mean, tf.maximum(m2 / safe_total, 0.0)


def sum_over_replicas(context, *tensors):
    """All-reduces (SUM) same-shaped tensors in one collective."""
    summed = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.stack(tensors))
    return tf.unstack(summed)
