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
    """4-D inputs run the fused kernel as they are; 2-D and 3-D ones are
    viewed as 4-D for it (`ExpandDims`), which the converters do not fold
    into the layer before: `fused=False` gives Keras's multiply-add there."""
    return len(ARCHITECTURES[name][0]) == 3


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


@pytest.mark.parametrize("name", [n for n in ARCHITECTURES if not _lean_by_default(n)])
def test_default_fused_path_on_lower_ranks_keeps_the_4d_view(name):
    """What `fused=False` is for in an export of 2-D or 3-D inputs."""
    ours, _ = _model(keras_bn.BatchNormalization, name)
    _, ops = _tflite_ops(ours)
    assert "EXPAND_DIMS" in ops


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
