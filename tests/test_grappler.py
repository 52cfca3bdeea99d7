"""Grappler optimizes the graphs of keras_bn's ops without an error.

When one of Grappler's passes fails on a function, TensorFlow logs it and
runs the whole function unoptimized: no fused kernels and no constant
folding anywhere in it, a user's own layers included, and only a log line
says so. Here Grappler runs offline on each training step's graph, told to
fail on any pass's error instead (`fail_on_optimizer_errors`). Offline, on
graphs not placed on devices, the remapper fuses nothing: whether oneDNN's
fused add happens is measured by its memory
(`tests/test_linear_cross_entropy_memory.py`).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2
from tensorflow.python.grappler import tf_optimizer

import keras_bn
from keras_bn.ops import linear_softmax_cross_entropy
from keras_bn.ops import sparse_softmax_cross_entropy

N, D, V = 64, 8, 32


def optimize(step, *specs):
    """Runs Grappler (every default pass) on `step`'s graph; raises on error."""
    concrete = step.get_concrete_function(*specs)
    graph = concrete.graph
    meta = tf.compat.v1.train.export_meta_graph(
        graph_def=graph.as_graph_def(add_shapes=True), graph=graph
    )
    fetches = meta.collection_def["train_op"].node_list.value
    fetches.extend(t.name for t in concrete.outputs)
    config = config_pb2.ConfigProto()
    config.graph_options.rewrite_options.fail_on_optimizer_errors = True
    config.graph_options.rewrite_options.min_graph_nodes = -1
    return tf_optimizer.OptimizeGraph(config, meta)


def head_step(loss_fn):
    @tf.function
    def step(labels, h, w, b):
        with tf.GradientTape() as tape:
            tape.watch([h, w, b])
            loss = loss_fn(labels, h, w, b)
        return [loss] + tape.gradient(loss, [h, w, b])

    specs = (
        tf.TensorSpec([N], tf.int32),
        tf.TensorSpec([N, D]),
        tf.TensorSpec([D, V]),
        tf.TensorSpec([V]),
    )
    return (step,) + specs


@pytest.mark.parametrize(
    "options",
    [
        {"reduction": "mean"},
        {"reduction": "sum", "label_smoothing": 0.1},
        {"reduction": "mean", "ignore_class": 0, "sample_weight": "weights"},
        {},
    ],
)
def test_linear_cross_entropy_step_optimizes(options):
    # The reduced loss's upstream gradient is a constant Grappler folds, so
    # it folds the choice of the fast gradient and removes the other branch.
    options = dict(options)
    if options.get("sample_weight") == "weights":
        options["sample_weight"] = tf.linspace(0.5, 1.5, N)

    def loss_fn(labels, h, w, b):
        loss = linear_softmax_cross_entropy(labels, h, w, b, chunk_size=8, **options)
        return loss if "reduction" in options else tf.reduce_mean(loss)

    optimize(*head_step(loss_fn))


def test_dense_sparse_cross_entropy_step_optimizes():
    def loss_fn(labels, h, w, b):
        return tf.reduce_mean(sparse_softmax_cross_entropy(labels, h @ w + b))

    optimize(*head_step(loss_fn))


def test_batch_normalization_training_step_optimizes():
    layer = keras_bn.BatchNormalization()
    layer.build((None, 6, 6, 3))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=True) ** 2)
        return [loss] + tape.gradient(loss, layer.trainable_variables)

    optimize(step, tf.TensorSpec([4, 6, 6, 3]))


def test_fused_head_in_a_keras_train_step_optimizes():
    head = keras_bn.layers.LinearCrossEntropyHead(V, gradient_in_forward=True)
    tokens = keras.Input((4,), dtype="int32")
    labels = keras.Input((4,), dtype="int32")
    hidden = keras.layers.Dense(D, activation="relu")(
        keras.layers.Embedding(V, D)(tokens)
    )
    model = keras.Model([tokens, labels], head([hidden, labels]))
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(model.trainable_variables)

    @tf.function
    def step(tokens, labels):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(model([tokens, labels], training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    spec = tf.TensorSpec([8, 4], tf.int32)
    optimize(step, spec, spec)
    rng = np.random.default_rng(0)
    assert np.isfinite(step(*(rng.integers(0, V, (8, 4)) for _ in range(2))))


def test_the_check_fails_on_a_pass_error(monkeypatch):
    """Grappler's loop optimizer, removing a cond branch whose predicate it
    folds, breaks the loops in that branch: the check raises."""
    from keras_bn.ops import linear_cross_entropy_uniform as fast

    def folded_choice(upstream, ignored, saved, inputs, exact):
        scale, uniform = fast._uniform_value(upstream, ignored)
        scaled = fast._scaled(scale, saved, inputs)
        return tf.cond(uniform, lambda: scaled, exact)

    monkeypatch.setattr(fast, "saved_gradients", folded_choice)

    def loss_fn(labels, h, w, b):
        return linear_softmax_cross_entropy(
            labels, h, w, b, chunk_size=8, reduction="mean"
        )

    with pytest.raises(tf.errors.InvalidArgumentError, match="topological"):
        optimize(*head_step(loss_fn))
