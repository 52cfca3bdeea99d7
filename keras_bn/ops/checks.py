"""Checks of shapes known only when a graph runs.

Shapes known when the graph is built are checked then, with a ValueError
that names the argument. What is left for run time gets two checks: an
assertion with the same message (eager and graph mode), and a data
dependency that fails even where XLA drops assertions.
"""

import tensorflow as tf


def shape_at_run_time(tensor, expected, message):
    """`tensor`, checked at run time to have exactly the shape `expected`.

    Args:
        tensor: A boolean tensor whose static shape left some dimensions
            unknown.
        expected: int64 shape tensor it must have.
        message: The error message, naming the argument.

    Returns:
        `tensor` (values unchanged), to be used in its place: a mismatch
        raises an InvalidArgumentError with `message` in graph mode, and
        fails to broadcast under XLA (a transposed shape, the same number
        of elements in another order, fails both).
    """
    assertion = tf.debugging.assert_equal(
        tf.shape(tensor, out_type=tf.int64), expected, message=message
    )
    with tf.control_dependencies([assertion]):
        # broadcast_to fails unless each size is the expected one or 1, and
        # the reshape unless the sizes multiply to the same count: together,
        # unless the shape is the expected one. Both are free at run time.
        same = tf.broadcast_to(tensor, expected)
        counted = tf.reshape(tensor, expected)
    return tf.logical_and(same, counted)


def divisible_at_run_time(shape, divisor, message):
    """`shape`, checked at run time to have a first size that `divisor` (an
    int) divides.

    An InvalidArgumentError with `message` in graph mode; under XLA, where
    shapes are known when it compiles, the caller's reshape to
    `[-1, divisor, ...]` fails instead.
    """
    assertion = tf.debugging.assert_equal(
        tf.math.floormod(shape[0], divisor), tf.zeros([], shape.dtype), message=message
    )
    with tf.control_dependencies([assertion]):
        return tf.identity(shape)
