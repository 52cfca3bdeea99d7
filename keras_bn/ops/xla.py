"""Whether the ops are being compiled by XLA."""

import tensorflow as tf


def in_xla_function():
    """Whether ops are being traced into a function that XLA compiles.

    True inside `tf.function(jit_compile=True)` (and functions it calls),
    which is how Keras compiles with `jit_compile=True`. The ops pick the
    formulation that XLA compiles to faster loops there: batch norm's closed
    form instead of the fused kernels (which XLA expands into plain loops
    anyway), and the dense cross-entropy's single stacked reduction. Reads
    TensorFlow's own XLA flag on the graph; False if TensorFlow no longer
    exposes it.
    """
    if tf.executing_eagerly():
        return False
    try:
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - a TensorFlow that moved it
        return False
    return bool(
        control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
    )
