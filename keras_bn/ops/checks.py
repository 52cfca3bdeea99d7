"""Argument checks shared by the ops and the layers, and checks of shapes
known only when a graph runs.

Python arguments are checked once, where they are given, with an error that
names the argument. Shapes known when the graph is built are checked then,
with a ValueError that names the argument. What is left for run time gets two
checks: an assertion with the same message (eager and graph mode), and a data
dependency that fails even where XLA drops assertions.
"""

import math

import numpy as np
import tensorflow as tf


def check_float(value, arg_name, expected="a float"):
    """`value` as a Python float; numbers pass, strings and booleans do not."""
    if isinstance(value, (bool, np.bool_, str, bytes)) or not hasattr(
        value, "__float__"
    ):
        raise TypeError(
            f"Argument `{arg_name}` must be {expected}. "
            f"Received: {arg_name}={value!r} of type {type(value).__name__}"
        )
    try:
        return float(value)
    except (TypeError, ValueError):  # e.g. an array of several numbers
        raise TypeError(
            f"Argument `{arg_name}` must be {expected}. Received: {arg_name}={value!r}"
        ) from None


def check_in_range(value, arg_name, low, high, low_open=False, high_open=False):
    """`value` as a float in the interval from `low` to `high` (finite)."""
    brackets = ("(" if low_open else "[", ")" if high_open else "]")
    interval = f"{brackets[0]}{low}, {high}{brackets[1]}"
    value_ = check_float(value, arg_name, f"a float in {interval}")
    above = value_ > low if low_open else value_ >= low
    below = value_ < high if high_open else value_ <= high
    if not (math.isfinite(value_) and above and below):
        raise ValueError(
            f"Argument `{arg_name}` must be in {interval}. Received: {arg_name}={value}"
        )
    return value_


def check_positive_finite(value, arg_name):
    """`value` as a float > 0 and finite."""
    value_ = check_float(value, arg_name, "a float > 0")
    if not (math.isfinite(value_) and value_ > 0):
        raise ValueError(
            f"Argument `{arg_name}` must be > 0 and finite. "
            f"Received: {arg_name}={value}"
        )
    return value_


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
