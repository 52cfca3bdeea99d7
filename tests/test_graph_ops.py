"""GPU-readiness on a CPU machine: the math holds no host callbacks."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_bn
from keras_bn import ops

HOST_OPS = {"PyFunc", "EagerPyFunc", "PyFuncStateless", "NumpyFunction", "PrintV2"}


def _op_types(fn, *args):
    graph = tf.function(fn).get_concrete_function(*args).graph
    types = {op.type for op in graph.get_operations()}
    for function in graph._functions.values():  # nested functions (tf.cond)
        types |= {node.op for node in function.definition.node_def}
    return types


def _train_step(fused):
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y, mean, var = ops.batch_norm_train(
                x, tf.ones([4]), tf.zeros([4]), fused=fused
            )
            y2 = ops.batch_norm_inference(x, mean, var, fused=fused)
            y3 = ops.batch_norm_inference(
                x, mean, var, fused=fused, statistics_gradients=False
            )
            loss = tf.reduce_sum(y * y2 + y3) + tf.reduce_sum(mean)
        return tape.gradient(loss, x)

    return step


def _loss_step(x):
    labels = tf.constant([1, 0, 3])
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(ops.sparse_softmax_cross_entropy(labels, x))
        loss += tf.reduce_sum(ops.softmax_cross_entropy(tf.nn.softmax(x), x))
        loss += tf.reduce_sum(ops.log_softmax(x) * ops.softmax(x))
    return tape.gradient(loss, x)


@pytest.mark.parametrize("fused", [True, False])
def test_batch_norm_graphs_hold_no_host_ops_and_compile_with_xla(fused):
    x = tf.random.normal([8, 3, 3, 4])
    assert not _op_types(_train_step(fused), x) & HOST_OPS
    compiled = tf.function(_train_step(fused), jit_compile=True)
    np.testing.assert_allclose(compiled(x), _train_step(fused)(x), atol=1e-4)


def test_cross_entropy_graphs_hold_no_host_ops_and_compile_with_xla():
    x = tf.random.normal([3, 5])
    assert not _op_types(_loss_step, x) & HOST_OPS
    compiled = tf.function(_loss_step, jit_compile=True)
    np.testing.assert_allclose(compiled(x), _loss_step(x), atol=1e-4)


def test_keras_train_function_holds_no_host_ops():
    model = keras.Sequential(
        [
            keras.Input((4, 4, 2)),
            keras.layers.Conv2D(3, 3),
            keras_bn.BatchNormalization(fused=True),  # too small for fused=None
            keras.layers.Flatten(),
            keras_bn.BatchNormalization(renorm=True),
            keras.layers.Dense(5),
        ]
    )
    model.compile("sgd", keras_bn.losses.SoftmaxCrossEntropy(sparse=True))
    x, y = np.ones((4, 4, 4, 2), "float32"), np.zeros(4, "int32")
    model.train_on_batch(x, y)  # builds the model and the optimizer
    types = _op_types(model.train_step, (tf.constant(x), tf.constant(y)))
    assert not types & HOST_OPS
    assert "FusedBatchNormGradV3" in types  # the fused path, as on a GPU


def test_the_check_sees_a_host_callback():
    def with_callback(x):
        return tf.py_function(lambda t: t * 2, [x], tf.float32)

    assert "EagerPyFunc" in _op_types(with_callback, tf.ones([2]))
