"""Dtype rules shared by the ops: which inputs are accepted, what math runs in."""

import tensorflow as tf


def compute_dtype(dtype):
    """The dtype the math runs in: float32 for float16/bfloat16 inputs."""
    return tf.float32 if dtype in (tf.float16, tf.bfloat16) else dtype


def float_tensor(value, arg_name):
    """`value` as a tensor; a TypeError naming `arg_name` unless it is float."""
    value = tf.convert_to_tensor(value)
    if value.dtype not in (tf.float16, tf.bfloat16, tf.float32, tf.float64):
        raise TypeError(
            f"`{arg_name}` must be a floating-point tensor (float16, bfloat16, "
            f"float32 or float64). Received dtype: {value.dtype.name}"
        )
    return value
