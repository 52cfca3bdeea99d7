"""Exported inference graphs as lean as Keras's: the converters fold batch
normalization into the preceding layer for keras_bn's layer too."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_bn

ARCHITECTURES = {
    "conv2d_relu": ((12, 12, 3), lambda: [keras.layers.Conv2D(8, 3)], True),
    "dense_relu": ((10,), lambda: [keras.layers.Dense(6)], True),
    "conv1d": ((12, 4), lambda: [keras.layers.Conv1D(5, 3)], False),
    "channels_first": (
        (3, 12, 12),
        lambda: [keras.layers.Conv2D(8, 3, data_format="channels_first")],
        False,
    ),
}


def _model(bn_class, name, **bn_kwargs):
    input_shape, make_layers, relu = ARCHITECTURES[name]
    keras.utils.set_random_seed(0)
    axis = 1 if name == "channels_first" else -1
    layers = [
        keras.Input(input_shape),
        *make_layers(),
        bn_class(axis=axis, **bn_kwargs),
    ]
    if relu:
        layers.append(keras.layers.ReLU())
    model = keras.Sequential(layers)
    bn = model.layers[1]
    rng = np.random.default_rng(1)
    size = bn.moving_mean.shape[0]
    bn.moving_mean.assign(rng.normal(size=size))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size))
    bn.gamma.assign(rng.uniform(0.5, 1.5, size))
    bn.beta.assign(rng.normal(size=size))
    return model, input_shape


def _tflite_ops(model):
    content = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    interpreter = tf.lite.Interpreter(model_content=content)
    interpreter.allocate_tensors()
    return interpreter, [op["op_name"] for op in interpreter._get_ops_details()]


def _lean_by_default(name):
    """Every rank: 4-D inputs run the fused inference kernel as they are,
    other ranks the multiply-add that converters fold as Keras's."""
    return True


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_tflite_op_list_equals_keras_layer(name):
    fused = None if _lean_by_default(name) else False
    ours, input_shape = _model(keras_bn.BatchNormalization, name, fused=fused)
    theirs, _ = _model(keras.layers.BatchNormalization, name)
    interpreter, ours_ops = _tflite_ops(ours)
    _, theirs_ops = _tflite_ops(theirs)
    assert ours_ops == theirs_ops
    # And the converted model computes the layer's inference output.
    x = np.random.default_rng(2).normal(size=(1, *input_shape)).astype(np.float32)
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(got, _inference(ours, x), rtol=1e-4, atol=1e-4)


def _inference(model, x):
    """`model(x, training=False)`, compiled by XLA: XLA's CPU convolution takes
    channels-first inputs, TensorFlow's own CPU Conv2D kernel only with oneDNN
    on (TF_ENABLE_ONEDNN_OPTS=1, the default on CPUs with AVX-512)."""
    run = tf.function(lambda x: model(x, training=False), jit_compile=True)
    return run(x)


@pytest.mark.parametrize("name", ["dense_relu"])
def test_default_path_on_2d_inputs_has_no_4d_view(name):
    """The fused kernel would view 2-D inputs as 4-D (`ExpandDims`),
    which converters keep; inference takes the multiply-add there."""
    ours, _ = _model(keras_bn.BatchNormalization, name)
    _, ops = _tflite_ops(ours)
    assert "EXPAND_DIMS" not in ops and "SQUEEZE" not in ops


def test_conv_bn_relu_folds_to_one_convolution():
    model, _ = _model(keras_bn.BatchNormalization, "conv2d_relu")
    _, ops = _tflite_ops(model)
    assert [op for op in ops if op != "DELEGATE"] == ["CONV_2D"]


def test_onnx_conversion_runs_in_onnxruntime_and_matches_predict(tmp_path):
    tf2onnx = pytest.importorskip("tf2onnx", reason="the 'export' extra")
    onnxruntime = pytest.importorskip("onnxruntime", reason="the 'export' extra")
    model, input_shape = _model(keras_bn.BatchNormalization, "conv2d_relu")
    spec = (tf.TensorSpec((None, *input_shape), tf.float32, name="x"),)
    proto, _ = tf2onnx.convert.from_function(
        tf.function(lambda x: model(x, training=False)), input_signature=spec
    )
    session = onnxruntime.InferenceSession(
        proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(3).normal(size=(4, *input_shape)).astype(np.float32)
    (got,) = session.run(None, {"x": x})
    np.testing.assert_allclose(got, model.predict(x, verbose=0), rtol=1e-4, atol=1e-4)
    node_types = {node.op_type for node in proto.graph.node}
    assert "Reshape" not in node_types and "Shape" not in node_types


# One block per rank, channels-last, built with each class's defaults.
RANKS = {
    2: ((10,), lambda: keras.layers.Dense(6)),
    3: ((12, 4), lambda: keras.layers.Conv1D(5, 3)),
    4: ((12, 12, 3), lambda: keras.layers.Conv2D(8, 3)),
    5: ((6, 6, 6, 2), lambda: keras.layers.Conv3D(4, 3)),
}


def _default_block(bn_class, rank):
    input_shape, make_layer = RANKS[rank]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(input_shape), make_layer(), bn_class()])
    bn = model.layers[-1]
    rng = np.random.default_rng(1)
    size = bn.moving_mean.shape[0]
    for weight in (bn.gamma, bn.moving_variance):
        weight.assign(rng.uniform(0.5, 2.0, size))
    for weight in (bn.beta, bn.moving_mean):
        weight.assign(rng.normal(size=size))
    return model, input_shape


@pytest.mark.parametrize("rank", sorted(RANKS))
def test_default_layer_exports_keras_s_op_lists_at_every_rank(rank, tmp_path):
    """TFLite and ONNX (tf2onnx, run in onnxruntime) op lists of a default
    block equal those of Keras's layer, and the exports compute its output."""
    ours, input_shape = _default_block(keras_bn.BatchNormalization, rank)
    theirs, _ = _default_block(keras.layers.BatchNormalization, rank)
    x = np.random.default_rng(2).normal(size=(2, *input_shape)).astype(np.float32)
    want = ours(x, training=False).numpy()
    np.testing.assert_allclose(want, theirs(x, training=False), rtol=1e-5, atol=1e-5)
    interpreter, ours_ops = _tflite_ops(ours)
    assert ours_ops == _tflite_ops(theirs)[1]
    interpreter.resize_tensor_input(
        interpreter.get_input_details()[0]["index"], x.shape
    )
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    tf2onnx = pytest.importorskip("tf2onnx", reason="the 'export' extra")
    onnxruntime = pytest.importorskip("onnxruntime", reason="the 'export' extra")
    spec = (tf.TensorSpec((None, *input_shape), tf.float32, name="x"),)

    def onnx(model):
        proto, _ = tf2onnx.convert.from_function(
            tf.function(lambda x: model(x, training=False)), input_signature=spec
        )
        return proto, [node.op_type for node in proto.graph.node]

    proto, ours_nodes = onnx(ours)
    assert ours_nodes == onnx(theirs)[1]
    session = onnxruntime.InferenceSession(
        proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    np.testing.assert_allclose(
        session.run(None, {"x": x})[0], want, rtol=1e-4, atol=1e-4
    )
