"""The fused-kernel path agrees with the closed form, and says when it can't."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import compiled
from helpers import float32_mean_tolerance
from helpers import param_shape

import keras_bn
from keras_bn.ops import batch_norm_inference
from keras_bn.ops import batch_norm_train

LAYOUTS = [
    ((32, 6), -1),
    ((8, 5, 6), -1),
    ((4, 5, 5, 6), -1),
    ((4, 6, 5, 5), 1),
    ((4, 6, 5), 1),
    ((2, 3, 4, 4, 6), -1),
    ((2, 6, 3, 4, 4), 1),
]


def _run(fused, x, gamma, beta, axis, weights, mode):
    def step(x, gamma, beta):
        with tf.GradientTape() as tape:
            tape.watch([x, gamma, beta])
            y, mean, var = batch_norm_train(x, gamma, beta, axis=axis, fused=fused)
            y_inf = batch_norm_inference(
                x, mean, var, gamma, beta, axis=axis, fused=fused
            )
            loss = (
                tf.reduce_sum(weights[0] * tf.cast(y, tf.float32) ** 2)
                + tf.reduce_sum(weights[1] * mean)
                + tf.reduce_sum(weights[2] * var)
                + tf.reduce_sum(tf.cast(y_inf, tf.float32))
            )
        return [y, mean, var, y_inf, *tape.gradient(loss, [x, gamma, beta])]

    return compiled(step, mode)(x, gamma, beta)


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
def test_fused_and_closed_form_agree(rng, shape, axis, mode):
    pshape = param_shape(shape, axis)
    x = tf.constant(rng.normal(0.5, 2.0, size=shape), tf.float32)
    gamma = tf.constant(rng.uniform(0.5, 1.5, size=pshape), tf.float32)
    beta = tf.constant(rng.normal(size=pshape), tf.float32)
    weights = [
        tf.constant(rng.normal(size=s), tf.float32) for s in (shape, pshape, pshape)
    ]
    fused = _run(True, x, gamma, beta, axis, weights, mode)
    closed = _run(False, x, gamma, beta, axis, weights, mode)
    names = ["y", "mean", "variance", "y_inference", "dx", "dgamma", "dbeta"]
    for name, a, b in zip(names, fused, closed):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4, err_msg=name)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_fused_low_precision_agrees_with_closed_form(rng, dtype):
    x = tf.cast(rng.normal(2.0, 3.0, size=(16, 4, 4, 8)), dtype)
    gamma, beta = tf.ones([8]), tf.zeros([8])
    results = []
    for fused in (True, False):
        with tf.GradientTape() as tape:
            tape.watch([x, gamma])
            y, mean, var = batch_norm_train(x, gamma, beta, fused=fused)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 3)
        dx, dgamma = tape.gradient(loss, [x, gamma])
        assert y.dtype == dtype and dx.dtype == dtype and mean.dtype == tf.float32
        results.append([tf.cast(t, tf.float32) for t in (y, mean, var, dx, dgamma)])
    tol = 2e-2 if dtype == tf.float16 else 1e-1
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def test_fused_statistics_are_biased_and_empty_batches_give_no_nan(rng):
    x = rng.normal(size=(5, 3)).astype(np.float32)
    _, mean, var = batch_norm_train(x, None, None, fused=True)
    np.testing.assert_allclose(var, x.var(axis=0), rtol=1e-5)  # divides by N
    y, mean, var = batch_norm_train(tf.zeros([0, 3]), None, None, fused=True)
    assert y.shape == (0, 3)
    np.testing.assert_array_equal(mean, 0.0)
    np.testing.assert_array_equal(var, 0.0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"x": np.ones((4, 3))}, r"input dtype is float64"),
        ({"axis": [0, 1], "x": np.ones((4, 3, 2), np.float32)}, r"feature axes"),
        (
            {"axis": 2, "x": np.ones((4, 3, 2, 5), np.float32)},
            r"feature axes are \[2\]",
        ),
        ({"mask": np.ones(4, bool)}, r"a mask is given"),
        ({"epsilon": 1e-6}, r"below the fused kernels' minimum"),
    ],
)
def test_fused_true_where_it_cannot_apply_says_why(kwargs, match):
    args = {"x": np.ones((4, 3), np.float32), "gamma": None, "beta": None}
    args.update(kwargs)
    with pytest.raises(ValueError, match=r"fused=True, but .*" + match):
        batch_norm_train(fused=True, **args)


def test_fused_argument_is_validated():
    with pytest.raises(TypeError, match=r"`fused` must be None, True or False"):
        batch_norm_train(np.ones((4, 3), np.float32), fused="yes")
    with pytest.raises(ValueError, match=r"`fused=True` cannot be combined"):
        keras_bn.BatchNormalization(fused=True, renorm=True)
    with pytest.raises(TypeError, match=r"`fused` must be None, True or False"):
        keras_bn.BatchNormalization(fused=1)


@pytest.mark.parametrize("shape,axis", [((16, 4, 4, 6), -1), ((16, 6, 4, 4), 1)])
def test_layer_paths_agree_on_moving_statistics_over_steps(rng, shape, axis):
    layers = [
        keras_bn.BatchNormalization(axis=axis, momentum=0.8, fused=fused)
        for fused in (True, False)
    ]
    for _ in range(3):
        x = rng.normal(1.0, 2.0, size=shape).astype(np.float32)
        outputs = [layer(x, training=True) for layer in layers]
        np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)
    for a, b in zip(layers[0].get_weights(), layers[1].get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layers[0](x), layers[1](x), rtol=1e-4, atol=1e-4)


def test_layer_fused_true_with_a_mask_raises_before_state_changes(rng):
    layer = keras_bn.BatchNormalization(fused=True)
    x = rng.normal(size=(4, 5, 3)).astype(np.float32)
    layer(x, training=True)
    before = layer.get_weights()
    with pytest.raises(ValueError, match=r"a mask is given"):
        layer(x, training=True, mask=np.ones((4, 5), bool))
    for a, b in zip(before, layer.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_fused_layer_matches_keras_layer(rng):
    ours = keras_bn.BatchNormalization(fused=True)
    theirs = keras.layers.BatchNormalization()
    x = rng.normal(3.0, 2.0, size=(8, 5, 5, 4)).astype(np.float32)
    np.testing.assert_allclose(
        ours(x, training=True), theirs(x, training=True), rtol=1e-4, atol=1e-4
    )
    for a, b in zip(ours.get_weights(), theirs.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _graph_op_types(fn, jit_compile, *args):
    function = tf.function(fn, jit_compile=jit_compile)
    graph = function.get_concrete_function(*args).graph
    return {op.type for op in graph.get_operations()}


@pytest.mark.parametrize(
    "jit_compile,fused,expect_fused",
    [
        (False, None, True),
        (True, None, False),  # XLA expands the kernels; the closed form is faster
        (True, True, True),
        (True, False, False),
    ],
)
def test_automatic_choice_takes_the_closed_form_under_xla(
    jit_compile, fused, expect_fused
):
    x = tf.ones([16, 64, 64, 3])  # large enough for the fused kernels in a graph

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y, mean, var = batch_norm_train(x, tf.ones([3]), tf.zeros([3]), fused=fused)
            y_inf = batch_norm_inference(x, mean, var, fused=fused)
            loss = tf.reduce_sum(y * y_inf)
        return tape.gradient(loss, x)

    types = _graph_op_types(step, jit_compile, x)
    assert ("FusedBatchNormV3" in types) == expect_fused
    assert ("FusedBatchNormGradV3" in types) == expect_fused


@pytest.mark.parametrize(
    "shape,fused,expect_fused",
    [
        ([128, 64], None, False),  # small: the closed form is faster in a graph
        ([2**17 // 64 - 1, 64], None, False),
        ([2**17 // 64, 64], None, True),  # FUSED_MIN_ELEMENTS_IN_A_GRAPH
        ([128, 64], True, True),
        ([None, 64], None, True),  # unknown size: the fused kernels
    ],
)
def test_automatic_choice_takes_the_closed_form_for_small_graphs(
    shape, fused, expect_fused
):
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = batch_norm_train(x, tf.ones([64]), tf.zeros([64]), fused=fused)[0]
            y_inf = batch_norm_inference(x, tf.zeros([64]), tf.ones([64]), fused=fused)
            loss = tf.reduce_sum(y * y_inf)
        return tape.gradient(loss, x)

    spec = tf.TensorSpec(shape, tf.float32)
    types = _graph_op_types(step, False, spec)
    assert ("FusedBatchNormV3" in types) == expect_fused
    assert ("FusedBatchNormGradV3" in types) == expect_fused


def test_automatic_choice_takes_the_fused_kernels_eagerly_at_any_size(monkeypatch):
    from keras_bn.ops import batch_norm

    calls = []
    original = batch_norm.fused_batch_norm_train

    def counted(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(batch_norm, "fused_batch_norm_train", counted)
    x = tf.random.normal([128, 64])
    y, *_ = batch_norm_train(x, tf.ones([64]), tf.zeros([64]))
    assert calls == [x.shape]
    tf.function(lambda x: batch_norm_train(x, None, None)[0])(x)
    assert calls == [x.shape]  # traced in a graph: the closed form
    np.testing.assert_allclose(
        y,
        batch_norm_train(x, tf.ones([64]), tf.zeros([64]), fused=False)[0],
        atol=1e-5,
    )


def test_layer_under_xla_takes_the_closed_form_and_matches_keras(rng):
    """A jit-compiled training step: no fused kernel, same numbers as Keras."""
    x = tf.constant(rng.normal(1.0, 2.0, size=(16, 5, 5, 4)), tf.float32)
    dy = tf.constant(rng.normal(size=(16, 5, 5, 4)), tf.float32)
    ours = keras_bn.BatchNormalization(momentum=0.9)
    theirs = keras.layers.BatchNormalization(momentum=0.9)

    def step(layer):
        def train(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
            return [y, *tape.gradient(y, [x, *layer.trainable_weights], dy)]

        return train

    for layer in (ours, theirs):
        layer.build(x.shape)
    assert "FusedBatchNormV3" not in _graph_op_types(step(ours), True, x)
    compiled = [tf.function(step(layer), jit_compile=True) for layer in (ours, theirs)]
    for _ in range(3):
        for a, b in zip(compiled[0](x), compiled[1](x)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(ours.get_weights(), theirs.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_automatic_choice_under_xla_keeps_accurate_statistics(rng):
    x64 = 1e4 + rng.normal(size=(4096, 8))
    x = tf.constant(x64.astype(np.float32))
    exact = x.numpy().astype(np.float64)
    compiled = tf.function(lambda x: batch_norm_train(x)[1:], jit_compile=True)
    mean, var = compiled(x)
    atol = float32_mean_tolerance(exact)
    np.testing.assert_allclose(mean, exact.mean(axis=0), rtol=0, atol=atol)
    np.testing.assert_allclose(var, exact.var(axis=0), rtol=1e-3)


def _input_sized_loops(layer, x):
    """The instructions of the optimized XLA program that produce x-sized arrays."""
    layer.build(x.shape)
    compiled = tf.function(lambda x: layer(x, training=False), jit_compile=True)
    hlo = compiled.experimental_get_compiler_ir(x)(stage="optimized_hlo")
    entry = hlo[hlo.index("ENTRY") :].splitlines()
    shape = "f32[" + ",".join(str(d) for d in x.shape) + "]"
    return [
        line
        for line in entry
        if " = " in line
        and line.split(" = ")[1].startswith(shape)
        and "parameter(" not in line
    ]


@pytest.mark.parametrize("shape", [(8, 6, 6, 5), (16, 5)])
def test_inference_under_xla_is_one_loop_over_the_input(shape):
    """One read of x and one write of y: the least any layer can do.

    Keras's layer compiles to the same single loop, which is why inference
    under XLA runs at parity with it (README, "Performance").
    """
    x = tf.random.normal(shape)
    ours = _input_sized_loops(keras_bn.BatchNormalization(), x)
    theirs = _input_sized_loops(keras.layers.BatchNormalization(), x)
    assert len(ours) == len(theirs) == 1
    assert " fusion(" in ours[0]
