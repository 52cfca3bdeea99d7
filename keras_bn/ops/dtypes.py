"""Dtype rules shared by the ops: which inputs are accepted, what math runs in."""

import tensorflow as tf

LOW_PRECISION = (tf.float16, tf.bfloat16)
FLOATS = (tf.float16, tf.bfloat16, tf.float32, tf.float64)


def compute_dtype(dtype):
    """The dtype the math runs in for inputs of `dtype`: float32 for
    float16/bfloat16, the dtype itself otherwise."""
    return tf.float32 if dtype in LOW_PRECISION else dtype


def float_tensor(value, arg_name):
    """`value` as a tensor; a TypeError naming `arg_name` unless it is float."""
    value = tf.convert_to_tensor(value)
    if value.dtype not in FLOATS:
        raise TypeError(
            f"`{arg_name}` must be a floating-point tensor (float16, bfloat16, "
            f"float32 or float64). Received dtype: {value.dtype.name}"
        )
    return value
