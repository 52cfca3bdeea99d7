"""keras-hub as a client of keras_bn.models: convert, fold, recompute, scope.

Small keras-hub vision backbones and one task model, built from their
constructors (nothing downloads), with random batch-normalization weights
and statistics so that a wrong copy, fold or statistic shows.

Reference: the unconverted model. Its outputs in both modes, its gradients
and its losses over a few `fit` steps; for recompute, its training-mode
outputs on the same batch.

Tolerances: keras_bn's layer and Keras's compute the same formula with other
kernels, so float32 results differ by rounding, which grows through the
network. We measure that growth on the original itself: a float64 twin of
the original (same weights) gives the exact values, and a converted model's
float32 error may be at most 5 times the original's own float32 error
(`assert_float32_close`). A float64 copy converted in float64 must match the
float64 original to 1e-9 of the largest value: float64 rounding through
these networks stays near 1e-14, and a wrong statistic or gradient is off by
order one.
"""

import contextlib
import os
import subprocess
import sys
import textwrap
import warnings

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

import keras_bn
from keras_bn.models import batch_normalization_scope
from keras_bn.models import convert_batch_normalization
from keras_bn.models import fold_batch_normalization
from keras_bn.models import recompute_statistics

IMAGE_SHAPE = (32, 32, 3)
BATCH = 4
NUM_CLASSES = 3
TARGETS = {
    "keras": keras.layers.BatchNormalization,
    "keras_bn": keras_bn.BatchNormalization,
}

# Tiny configurations (under half a second to build and run each on 2 CPU
# cores). Between them: plain and pre-activation residual blocks, a
# `keras.ops.pad` (ResNetV2) and a `keras.ops.split` (CSPNet) in the graph,
# concatenations (DenseNet), separable convolutions (Xception), depthwise
# convolutions with squeeze-and-excite (EfficientNet's v1 blocks).
BACKBONES = {
    "resnet_v1": lambda: keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 8],
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type="basic_block",
        image_shape=IMAGE_SHAPE,
    ),
    "resnet_v2": lambda: keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 8],
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type="bottleneck_block",
        use_pre_activation=True,
        image_shape=IMAGE_SHAPE,
    ),
    "cspnet": lambda: keras_hub.models.CSPNetBackbone(
        stem_filters=8,
        stem_kernel_size=3,
        stem_strides=1,
        stackwise_depth=[1, 1],
        stackwise_strides=2,
        stackwise_num_filters=[8, 16],
        block_type="dark_block",
        stage_type="csp",
        down_growth=True,
        bottle_ratio=(0.5, 1.0),
        block_ratio=(1.0, 0.5),
        expand_ratio=(2.0, 1.0),
        stem_padding="same",
        image_shape=IMAGE_SHAPE,
    ),
    "densenet": lambda: keras_hub.models.DenseNetBackbone(
        stackwise_num_repeats=[1, 1], growth_rate=4, image_shape=IMAGE_SHAPE
    ),
    "xception": lambda: keras_hub.models.XceptionBackbone(
        stackwise_conv_filters=[[8, 8], [16, 16]],
        stackwise_pooling=[True, False],
        image_shape=IMAGE_SHAPE,
    ),
    # num_features keeps its default: EfficientNetBackbone.get_config leaves
    # it out, so another value does not survive from_config (see below).
    "efficientnet_v1": lambda: efficientnet(num_features=1280),
}


def efficientnet(**kwargs):
    return keras_hub.models.EfficientNetBackbone(
        stackwise_kernel_sizes=[3, 3],
        stackwise_num_repeats=[1, 1],
        stackwise_input_filters=[8, 8],
        stackwise_output_filters=[8, 16],
        stackwise_expansion_ratios=[1, 2],
        stackwise_squeeze_and_excite_ratios=[0.25, 0.25],
        stackwise_strides=[1, 2],
        stackwise_block_types=["v1", "v1"],
        stackwise_force_input_filters=[0, 0],
        stackwise_nores_option=[False, False],
        width_coefficient=1.0,
        depth_coefficient=1.0,
        dropout=0.0,
        input_shape=IMAGE_SHAPE,
        **kwargs,
    )


# Batch normalization only inside custom layers: reachable with the scope.
def mobilenet():
    return keras_hub.models.MobileNetBackbone(
        stackwise_expansion=[[4], [3]],
        stackwise_num_blocks=[1, 1],
        stackwise_num_filters=[[8], [16]],
        stackwise_kernel_size=[[3], [5]],
        stackwise_num_strides=[[2], [1]],
        stackwise_se_ratio=[[None], [0.25]],
        stackwise_activation=[["relu"], ["hard_swish"]],
        stackwise_padding=[[1], [2]],
        output_num_filters=32,
        depthwise_filters=8,
        depthwise_stride=1,
        depthwise_residual=False,
        last_layer_filter=32,
        squeeze_and_excite=0.5,
        input_num_filters=8,
        image_shape=IMAGE_SHAPE,
    )


def classifier(backbone):
    return keras_hub.models.ImageClassifier(
        backbone=backbone, num_classes=NUM_CLASSES, preprocessor=None
    )


def task():
    return classifier(BACKBONES["resnet_v2"]())


MODELS = {**BACKBONES, "image_classifier": task}


@contextlib.contextmanager
def float64_policy():
    """Builds models in float64 (DenseNet and EfficientNet drop `dtype`)."""
    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(old)


def all_batch_normalization(model):
    """Every BN layer, custom layers included, in tracking order."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def randomize(model, seed=0):
    """Random BN weights and statistics, far from the identity."""
    rng = np.random.default_rng(seed)
    for layer in all_batch_normalization(model):
        for variable in layer.weights:
            if variable.name in ("gamma", "moving_variance"):
                value = rng.uniform(0.5, 1.5, variable.shape)
            else:
                value = rng.normal(0.0, 0.5, variable.shape)
            variable.assign(value.astype(variable.dtype))
    return model


def build(name):
    """The float32 model `name`, randomized, and its float64 twin."""
    model = randomize(MODELS[name]())
    with float64_policy():
        twin = MODELS[name]()
    twin.set_weights(model.get_weights())
    return model, twin


def images(seed=1, n=BATCH):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, (n, *IMAGE_SHAPE)).astype("float32")


def numpy(value):
    return np.asarray(keras.ops.convert_to_numpy(value), np.float64)


def assert_float32_close(actual, original, exact, what="", scale=None):
    """`actual` (float32) is at most 5 times as far from `exact` (float64)
    as `original` is, or within 4 float32 spacings of `scale` (by default
    the largest exact value)."""
    actual, original, exact = numpy(actual), numpy(original), numpy(exact)
    assert actual.shape == exact.shape, (what, actual.shape, exact.shape)
    scale = np.abs(exact).max() if scale is None else scale
    floor = 4 * float(np.spacing(np.float32(scale)))
    original_error = np.abs(original - exact).max()
    error = np.abs(actual - exact).max()
    assert error <= 5 * max(original_error, floor), (what, error, original_error)


def assert_float64_close(actual, exact, what="", scale=None):
    actual, exact = numpy(actual), numpy(exact)
    scale = np.abs(exact).max() if scale is None else scale
    np.testing.assert_allclose(actual, exact, rtol=0, atol=1e-9 * scale, err_msg=what)


def largest(values):
    """The largest magnitude in a list of tensors: the scale of a gradient
    that is zero in exact arithmetic (beta before another BN in training)."""
    return max(np.abs(numpy(v)).max() for v in values)


def convert(model, **overrides):
    """convert_batch_normalization, warnings allowed (none is expected)."""
    return convert_batch_normalization(model, "keras_bn", **overrides)


def fold(model):
    """fold_batch_normalization; it may warn that a Backbone becomes Functional."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fold_batch_normalization(model)


def backbone_of(model):
    return model.backbone if isinstance(model, keras_hub.models.Task) else model


# Convert: the class, its attributes, every layer and weight.


@pytest.mark.parametrize("name", list(MODELS))
def test_convert_keeps_the_class_and_converts_every_layer(name):
    model = randomize(MODELS[name]())
    converted = convert(model)
    assert type(converted) is type(model)
    assert type(backbone_of(converted)) is type(backbone_of(model))
    assert converted.get_config() == model.get_config()
    old_pyramid = getattr(backbone_of(model), "pyramid_outputs", None) or {}
    new_pyramid = getattr(backbone_of(converted), "pyramid_outputs", None) or {}
    assert list(new_pyramid) == list(old_pyramid)
    layers = all_batch_normalization(converted)
    assert len(layers) == len(all_batch_normalization(model)) > 0
    assert {type(layer) for layer in layers} == {keras_bn.BatchNormalization}
    assert [w.path for w in converted.weights] == [w.path for w in model.weights]
    for old, new in zip(model.weights, converted.weights):
        np.testing.assert_array_equal(new, old, err_msg=old.path)
    back = convert_batch_normalization(converted, "keras")
    assert type(back) is type(model)
    assert {type(layer) for layer in all_batch_normalization(back)} == {
        keras.layers.BatchNormalization
    }
    for old, new in zip(model.weights, back.weights):
        np.testing.assert_array_equal(new, old, err_msg=old.path)


@pytest.mark.parametrize("name", list(MODELS))
def test_converted_predicts_like_the_original_in_both_modes(name):
    model, twin = build(name)
    converted = convert(model)
    x = images()
    exact = twin(x.astype("float64"))
    assert_float32_close(converted(x), model(x), exact, "inference")
    exact = twin(x.astype("float64"), training=True)
    assert_float32_close(
        converted(x, training=True), model(x, training=True), exact, "training"
    )
    # The training calls moved the statistics alike.
    for old, new, exact in zip(
        all_batch_normalization(model),
        all_batch_normalization(converted),
        all_batch_normalization(twin),
    ):
        for statistic in ("moving_mean", "moving_variance"):
            assert_float32_close(
                getattr(new, statistic),
                getattr(old, statistic),
                getattr(exact, statistic),
                f"{new.path}/{statistic}",
            )


def training_gradients(model, x, weights):
    """Gradients of sum(weights * y) in training mode, trainable weights and x."""
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = model(x, training=True)
        loss = tf.reduce_sum(tf.cast(weights, y.dtype) * y)
    return tape.gradient(loss, [*model.trainable_weights, x])


@pytest.mark.parametrize("name", list(MODELS))
def test_converted_gradients_match_the_original(name):
    model, twin = build(name)
    x = images()
    weights = np.random.default_rng(2).normal(size=model(x).shape)
    exact = training_gradients(twin, x.astype("float64"), weights)
    # A float64 copy converted in float64: equal to float64 rounding. (Under
    # the policy it was built with: DenseNet's and EfficientNet's configs do
    # not hold the dtype, so a copy rebuilt from them takes the global one.)
    with float64_policy():
        converted64 = convert(twin)
    assert all(w.dtype == "float64" for w in converted64.weights)
    got = training_gradients(converted64, x.astype("float64"), weights)
    assert len(got) == len(exact)
    paths = [w.path for w in twin.trainable_weights] + ["x"]
    scale = largest(exact)
    for g, e, path in zip(got, exact, paths):
        assert_float64_close(g, e, path, scale)
    # In float32: within the original's own float32 error.
    original = training_gradients(model, x, weights)
    got = training_gradients(convert(model), x, weights)
    for g, o, e, path in zip(got, original, exact, paths):
        assert_float32_close(g, o, e, path, scale)


def fit_losses(model, x, y, loss, steps=3):
    """Losses of `steps` SGD steps, one batch each, from seed 0."""
    keras.utils.set_random_seed(0)
    model.compile(keras.optimizers.SGD(0.01), loss=loss)
    history = model.fit(x, y, batch_size=BATCH, epochs=steps, shuffle=False, verbose=0)
    return history.history["loss"]


@pytest.mark.parametrize("name", ["cspnet", "image_classifier"])
def test_fit_steps_give_the_original_losses(name):
    model, twin = build(name)
    converted = convert(model)
    x = images()
    if name == "image_classifier":
        y = np.arange(BATCH) % NUM_CLASSES
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    else:
        y = np.random.default_rng(3).normal(size=model(x).shape).astype("float32")
        loss = "mse"
    exact = fit_losses(twin, x.astype("float64"), y.astype(twin.compute_dtype), loss)
    original = fit_losses(model, x, y, loss)
    got = fit_losses(converted, x, y, loss)
    assert len(got) == 3 and len(set(exact)) == 3  # every step moved
    assert_float32_close(got, original, exact, "losses")
    for new, old, w in zip(converted.weights, model.weights, twin.weights):
        assert_float32_close(new, old, w, w.path)


def test_converted_backbone_serves_in_a_task():
    backbone, twin = build("resnet_v1")
    converted = convert(backbone)
    ours, theirs, exact = (classifier(b) for b in (converted, backbone, twin))
    theirs.set_weights(exact.get_weights())
    ours.set_weights(exact.get_weights())
    x = images()
    assert_float32_close(ours(x), theirs(x), exact(x.astype("float64")))
    assert ours.predict(x, verbose=0).shape == (BATCH, NUM_CLASSES)


def test_a_config_that_does_not_round_trip_still_converts_exactly():
    # EfficientNetBackbone.get_config leaves out num_features, so
    # from_config would build another model: the class may be lost (with a
    # warning), but never the predictions.
    model = randomize(efficientnet(num_features=16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = convert(model)
    if type(converted) is not type(model):
        assert caught, "the class was lost without a warning"
    x = images()
    np.testing.assert_allclose(converted(x), model(x), rtol=1e-5, atol=1e-5)
    assert {type(layer) for layer in all_batch_normalization(converted)} == {
        keras_bn.BatchNormalization
    }


# Fold: an inference copy with fewer batch-normalization layers.


@pytest.mark.parametrize("name", list(MODELS))
def test_folded_predicts_like_the_original(name):
    model, twin = build(name)
    folded = fold(model)
    assert len(all_batch_normalization(folded)) < len(all_batch_normalization(model))
    x = images()
    assert_float32_close(folded(x), model(x), twin(x.astype("float64")))


# Recompute: the statistics of the training-mode pass.


def first_batch_normalization_inputs(model, x):
    """The inputs of the first BN layer of the graph (no BN before it)."""
    backbone = backbone_of(model)
    layer = all_batch_normalization(backbone)[0]
    return numpy(keras.Model(backbone.inputs, layer.input)(x)), layer


@pytest.mark.parametrize("name", ["resnet_v2", "densenet", "image_classifier"])
def test_recompute_on_one_batch_gives_the_training_outputs(name):
    model, twin = build(name)
    x = images()
    exact = twin(x.astype("float64"), training=True)
    original = model(x, training=True)
    before = {w.path: np.array(w) for w in model.weights}
    layers = recompute_statistics(model, x, batch_size=BATCH, verbose=0)
    assert len(layers) == len(all_batch_normalization(model))
    assert_float32_close(model(x), original, exact)
    statistics = {id(w) for layer in layers for w in layer.non_trainable_weights}
    for w in model.weights:
        if id(w) not in statistics:
            np.testing.assert_array_equal(w, before[w.path], err_msg=w.path)


@pytest.mark.parametrize("name", ["cspnet", "image_classifier"])
def test_recompute_merges_batches_into_the_population_statistics(name):
    model = randomize(MODELS[name]())
    x = images(n=3 * BATCH)
    recompute_statistics(model, x, batch_size=BATCH, verbose=0)
    inputs, layer = first_batch_normalization_inputs(model, x)
    axes = (0, 1, 2)
    mean = inputs.mean(axis=axes)
    batches = inputs.reshape(3, BATCH, *inputs.shape[1:])
    variance = batches.var(axis=(1, 2, 3)).mean(axis=0)  # per-batch, biased
    np.testing.assert_allclose(layer.moving_mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance, variance, rtol=1e-5)


# The scope: models built in Python get keras_bn's layer.


def test_the_scope_builds_keras_bn_layers_that_load_keras_weights(tmp_path):
    reference = randomize(mobilenet())
    with float64_policy():
        exact = mobilenet()
    exact.set_weights(reference.get_weights())
    with batch_normalization_scope():
        ours = mobilenet()
    layers = all_batch_normalization(ours)
    assert len(layers) == len(all_batch_normalization(reference)) > 5
    assert {type(layer) for layer in layers} == {keras_bn.BatchNormalization}
    assert {type(layer) for layer in all_batch_normalization(mobilenet())} == {
        keras.layers.BatchNormalization
    }  # only inside the scope
    path = str(tmp_path / "mobilenet.weights.h5")
    reference.save_weights(path)
    ours.load_weights(path)
    for old, new in zip(reference.weights, ours.weights):
        assert new.path == old.path
        np.testing.assert_array_equal(new, old, err_msg=old.path)
    x = images()
    assert_float32_close(ours(x), reference(x), exact(x.astype("float64")))
    exact_training = exact(x.astype("float64"), training=True)
    assert_float32_close(
        ours(x, training=True), reference(x, training=True), exact_training
    )


def test_the_scope_takes_overrides_and_ends_cleanly():
    with batch_normalization_scope(fused=False):
        ours = mobilenet()
    assert all(not layer.fused for layer in all_batch_normalization(ours))
    with pytest.raises(RuntimeError, match="inside"):
        with batch_normalization_scope():
            raise RuntimeError("inside")
    layer = keras.layers.BatchNormalization()
    assert type(layer) is keras.layers.BatchNormalization


def test_a_scope_built_model_weights_arrive_by_set_weights():
    reference = randomize(mobilenet())
    with batch_normalization_scope():
        ours = mobilenet()
    assert {type(layer) for layer in all_batch_normalization(ours)} == {
        keras_bn.BatchNormalization
    }
    ours.set_weights(reference.get_weights())
    x = images()
    np.testing.assert_allclose(
        ours(x), reference(x), rtol=0, atol=1e-5 * np.abs(numpy(reference(x))).max()
    )


# A .keras file of the converted model, loaded in a fresh process.

# Every BN of the loaded model is keras_bn's: a Backbone saves only its
# constructor's arguments, and loading rebuilds it from them.
_LOAD_AND_PREDICT = """
import sys
import keras, keras_hub, numpy as np
import keras_bn  # registers keras_bn>BatchNormalization
directory = sys.argv[1]
x = np.load(directory + "/x.npy")
for name in sys.argv[2:]:
    model = keras.saving.load_model(f"{directory}/{name}.keras")
    bn = {type(l) for l in model._flatten_layers()}
    bn = {c for c in bn if issubclass(c, keras.layers.BatchNormalization)}
    assert bn == {keras_bn.BatchNormalization}, (name, bn)
    np.save(f"{directory}/{name}.npy", keras.ops.convert_to_numpy(model(x)))
    print(name, type(model).__name__)
"""


@pytest.mark.slow
def test_keras_files_of_converted_models_load_in_a_fresh_process(tmp_path):
    x = images()
    np.save(tmp_path / "x.npy", x)
    expected = {}
    for name in MODELS:
        converted = convert(randomize(MODELS[name]()))
        converted.save(tmp_path / f"{name}.keras")
        expected[name] = (type(converted).__name__, numpy(converted(x)))
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(_LOAD_AND_PREDICT),
            str(tmp_path),
            *MODELS,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    classes = dict(
        line.split() for line in result.stdout.strip().splitlines()[-len(MODELS) :]
    )
    for name, (class_name, outputs) in expected.items():
        assert classes[name] == class_name
        loaded = np.load(tmp_path / f"{name}.npy")
        np.testing.assert_allclose(loaded, outputs, rtol=1e-6, atol=1e-6, err_msg=name)
