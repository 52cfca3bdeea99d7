"""keras_bn.models.convert_batch_normalization, and finding BN layers.

References: the original model's outputs (Keras's own layer against
keras_bn's, and back), and for training outputs of a deep model a float64
run of the original architecture.

Tolerances: one layer's outputs differ by float32 rounding of the same
formula computed by other kernels (relative 1e-6 on values of order 1; we
allow 1e-5). Through the 50 layers of a keras.applications model the
differences grow; inference outputs are compared at 1e-4 of the largest
output, and training outputs against the float64 run: the converted model's
error may be at most 5 times the original's own float32 error (measured
ratios: 1.3 to 1.7 at batch size 8), while a wrong statistic would give
errors of order one.
"""

import keras
import numpy as np
import pytest
from helpers import APPLICATIONS
from helpers import assert_as_close_as_float32_allows

import keras_bn
from keras_bn.models import batch_normalization_layers
from keras_bn.models import convert_batch_normalization

TARGETS = {
    "keras": keras.layers.BatchNormalization,
    "keras_bn": keras_bn.BatchNormalization,
}

L = keras.layers
KERAS_ARGUMENTS = {
    "axis": 1,
    "momentum": 0.9,
    "epsilon": 0.01,
    "center": False,
    "scale": True,
    "gamma_initializer": "glorot_uniform",
    "moving_variance_initializer": keras.initializers.Constant(2.0),
    "gamma_regularizer": keras.regularizers.L2(0.01),
    "gamma_constraint": keras.constraints.NonNeg(),
    "renorm": True,
    "renorm_clipping": {"rmax": 2.0, "rmin": 0.5, "dmax": 1.0},
    "renorm_momentum": 0.8,
    "synchronized": True,
    "trainable": False,
    "name": "every_argument",
}


def randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in batch_normalization_layers(model):
        for variable in layer.weights:
            if variable.name == "num_batches_tracked":
                continue
            low = 0.5 if "var" in variable.name or "stddev" in variable.name else -0.5
            value = rng.uniform(low, 1.5, variable.shape)
            variable.assign(value.astype(variable.dtype))
    return model


def make_model(bn_class, **kwargs):
    inputs = keras.Input((3, 5))
    hidden = bn_class(**kwargs)(L.Dense(4)(inputs))
    outputs = bn_class()(L.Dense(2)(L.ReLU()(hidden)))
    return randomize(keras.Model(inputs, outputs))


def data(n=8, seed=1):
    return np.random.default_rng(seed).normal(1.0, 2.0, (n, 3, 5)).astype("float32")


def assert_close_outputs(expected, actual, rtol):
    expected, actual = np.asarray(expected), np.asarray(actual)
    np.testing.assert_allclose(actual, expected, atol=rtol * np.abs(expected).max())


def test_every_keras_argument_survives_the_round_trip():
    inputs = keras.Input((4, 6))
    model = keras.Model(inputs, L.BatchNormalization(**KERAS_ARGUMENTS)(inputs))
    ours = convert_batch_normalization(model, "keras_bn")
    back = convert_batch_normalization(ours, "keras")
    original = model.layers[-1].get_config()
    assert type(ours.layers[-1]) is keras_bn.BatchNormalization
    assert {k: ours.layers[-1].get_config()[k] for k in original} == original
    assert type(back.layers[-1]) is L.BatchNormalization
    assert back.layers[-1].get_config() == original
    for left, right in zip(model.weights, back.weights):
        assert left.name == right.name
        np.testing.assert_array_equal(left, right)


@pytest.mark.parametrize("direction", [("keras", "keras_bn"), ("keras_bn", "keras")])
def test_weights_are_copied_and_outputs_agree(direction):
    source, target = direction
    bn_class = (
        L.BatchNormalization if source == "keras" else keras_bn.BatchNormalization
    )
    model = make_model(bn_class, axis=-1, epsilon=0.01)
    converted = convert_batch_normalization(model, target)
    target_class = (
        keras_bn.BatchNormalization if target == "keras_bn" else L.BatchNormalization
    )
    assert [type(layer) for layer in batch_normalization_layers(converted)] == [
        target_class
    ] * 2
    for old, new in zip(model.weights, converted.weights):
        assert old.path == new.path
        np.testing.assert_array_equal(old, new)
    x = data()
    assert_close_outputs(model(x), converted(x), rtol=1e-5)
    assert_close_outputs(model(x, training=True), converted(x, training=True), 1e-5)
    for old, new in zip(model.weights, converted.weights):  # both updated alike
        np.testing.assert_allclose(new, old, rtol=1e-5, atol=1e-6)


def test_overrides_add_weights_consistent_with_the_statistics():
    model = make_model(L.BatchNormalization)
    converted = convert_batch_normalization(
        model, "keras_bn", renorm=True, momentum=None, synchronized=True, fused=False
    )
    x = data()
    assert_close_outputs(model(x), converted(x), rtol=1e-5)
    for old, new in zip(
        batch_normalization_layers(model), batch_normalization_layers(converted)
    ):
        config = new.get_config()
        assert config["renorm"] and config["synchronized"] and not config["fused"]
        assert config["momentum"] is None
        np.testing.assert_array_equal(new.num_batches_tracked, 0)
        stddev = np.sqrt(np.asarray(old.moving_variance, "float64") + old.epsilon)
        np.testing.assert_allclose(new.moving_stddev, stddev, rtol=1e-6)
        np.testing.assert_allclose(new.renorm_stddev, stddev, rtol=1e-6)
        np.testing.assert_array_equal(new.renorm_mean, old.moving_mean)


@pytest.mark.parametrize(
    "kwargs, option, fix",
    [
        (
            {"virtual_batch_size": 2},
            "virtual_batch_size=2",
            {"virtual_batch_size": None},
        ),
        ({"axis": [1, 2]}, r"axis=\[1, 2\]", {"axis": -1}),
        ({"momentum": None}, "momentum=None", {"momentum": 0.99}),
        (
            {"moving_variance_estimator": "unbiased"},
            "moving_variance_estimator='unbiased'",
            {"moving_variance_estimator": "biased"},
        ),
    ],
)
def test_options_keras_cannot_express_are_refused_unless_overridden(
    kwargs, option, fix
):
    model = make_model(keras_bn.BatchNormalization, name="ghost", **kwargs)
    with pytest.raises(ValueError, match=f"layer 'ghost' cannot become.*{option}"):
        convert_batch_normalization(model, "keras")
    if "axis" in fix:  # another axis means other weight shapes
        with pytest.raises(ValueError, match="an `axis` override"):
            convert_batch_normalization(model, "keras", **fix)
        return
    converted = convert_batch_normalization(model, "keras", **fix)
    x = data()
    assert_close_outputs(model(x), converted(x), rtol=1e-5)


def test_options_without_keras_meaning_are_dropped():
    model = make_model(
        keras_bn.BatchNormalization, fused=True, skip_nonfinite_updates=False
    )
    layer = convert_batch_normalization(model, "keras").layers[2]
    assert type(layer) is L.BatchNormalization
    assert "fused" not in layer.get_config()


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.bn = L.BatchNormalization()

    def call(self, x):
        return self.bn(x)


class Block(L.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bn = keras_bn.BatchNormalization()

    def call(self, x):
        return self.bn(x)


def test_bad_arguments_raise_before_anything_is_built():
    model = make_model(L.BatchNormalization)
    with pytest.raises(ValueError, match="`to` must be one of"):
        convert_batch_normalization(model, "torch")
    with pytest.raises(ValueError, match=r"\['ghost'\] are not arguments of keras_bn"):
        convert_batch_normalization(model, "keras_bn", ghost=2)
    subclassed = Subclassed()
    subclassed(data())
    with pytest.raises(ValueError, match="subclassed model of class Subclassed"):
        convert_batch_normalization(subclassed)


@pytest.mark.parametrize("to", ["keras", "keras_bn"])
def test_batch_normalization_inside_a_custom_layer_converts_with_its_state(to):
    """The custom layer is rebuilt from its config inside the scope, so the
    layer its constructor makes is of the target class, with the state."""
    inputs = keras.Input((3, 5))
    model = keras.Model(inputs, Block(name="block")(inputs))
    bn = model.get_layer("block").bn
    rng = np.random.default_rng(0)
    for variable in bn.weights:
        variable.assign(rng.uniform(0.5, 1.5, variable.shape).astype("float32"))
    model.get_layer("block").trainable = False
    converted = convert_batch_normalization(model, to, momentum=0.5)
    new = converted.get_layer("block").bn
    assert type(new) is TARGETS[to]
    assert new.momentum == 0.5  # the overrides reach it, whatever its class
    assert not converted.get_layer("block").trainable
    for old_weight, new_weight in zip(bn.weights, new.weights, strict=True):
        np.testing.assert_array_equal(old_weight, new_weight)
    x = data()
    np.testing.assert_allclose(converted(x), model(x), rtol=1e-6, atol=1e-6)


def test_the_copy_shares_nothing_with_the_original_and_is_compiled_alike():
    model = make_model(L.BatchNormalization)
    model.compile(keras.optimizers.SGD(0.1), "mse", metrics=["mae"])
    converted = convert_batch_normalization(model)
    assert converted.get_compile_config() == model.get_compile_config()
    assert not {id(v) for v in model.weights} & {id(v) for v in converted.weights}
    before = [np.array(v) for v in model.weights]
    converted(data(), training=True)  # moves the copy's statistics only
    for value, variable in zip(before, model.weights):
        np.testing.assert_array_equal(value, variable)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(APPLICATIONS))
def test_keras_applications_convert_with_equal_inference(name):
    keras.utils.set_random_seed(2)
    model = randomize(APPLICATIONS[name]())
    ours = convert_batch_normalization(model, "keras_bn")
    layers = batch_normalization_layers(ours)
    assert len(layers) > 50
    assert all(type(layer) is keras_bn.BatchNormalization for layer in layers)
    x = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    assert_as_close_as_float32_allows(name, model, ours, x)


@pytest.mark.slow
def test_converting_back_restores_every_config_and_weight():
    model = randomize(APPLICATIONS["MobileNetV2"]())
    back = convert_batch_normalization(convert_batch_normalization(model), "keras")
    for old, new in zip(
        batch_normalization_layers(model), batch_normalization_layers(back)
    ):
        assert type(new) is L.BatchNormalization
        assert new.get_config() == old.get_config()
    for old, new in zip(model.weights, back.weights):
        assert old.path == new.path
        np.testing.assert_array_equal(old, new)


@pytest.mark.slow
def test_training_outputs_agree_within_float32_rounding():
    model = randomize(APPLICATIONS["MobileNetV2"]())
    keras.config.set_dtype_policy("float64")
    try:
        reference = APPLICATIONS["MobileNetV2"]()
    finally:
        keras.config.set_dtype_policy("float32")
    reference.set_weights(model.get_weights())
    ours = convert_batch_normalization(model, "keras_bn")
    x = np.random.default_rng(3).uniform(-1, 1, (8, 32, 32, 3)).astype("float32")
    exact = np.asarray(reference(x.astype("float64"), training=True))
    keras_error = np.abs(np.asarray(model(x, training=True)) - exact).max()
    ours_error = np.abs(np.asarray(ours(x, training=True)) - exact).max()
    assert ours_error <= 5 * keras_error


def test_isinstance_finds_both_classes():
    # keras_bn's layer subclasses Keras's, so code written for Keras's layer
    # (Keras's fine-tuning guides freeze BN with isinstance) finds it too.
    assert isinstance(keras_bn.BatchNormalization(), L.BatchNormalization)
    assert not isinstance(L.LayerNormalization(), L.BatchNormalization)


def _fine_tuning_model():
    """A frozen base with both classes, nested, then a head."""
    base = keras.Sequential(
        [
            keras.Input((3, 5)),
            L.Dense(4),
            keras_bn.BatchNormalization(name="ours"),
            L.Dense(4),
            L.BatchNormalization(name="theirs"),
        ]
    )
    base.trainable = False
    return keras.Sequential([keras.Input((3, 5)), base, L.Dense(2)])


def test_the_fine_tuning_loop_keeps_batch_normalization_frozen():
    """Keras's guides unfreeze all but BN with an isinstance test."""
    model = _fine_tuning_model()
    base = model.layers[0]
    base.trainable = True
    for layer in base.layers:
        if isinstance(layer, L.BatchNormalization):
            layer.trainable = False
    model.compile(keras.optimizers.SGD(0.1), "mse")
    before = {layer.name: np.array(layer.moving_mean) for layer in base.layers[1::2]}
    model.fit(data(), np.zeros((8, 3, 2)), batch_size=4, verbose=0)
    moved = {
        name
        for name, mean in before.items()
        if not np.array_equal(mean, base.get_layer(name).moving_mean)
    }
    # isinstance finds both classes: no BN trains or moves its statistics.
    assert moved == set()


def test_batch_normalization_layers_walks_nested_and_subclassed_models():
    subclassed = Subclassed()
    subclassed(data())
    model = _fine_tuning_model()
    found = batch_normalization_layers(model)
    assert [layer.name for layer in found] == ["ours", "theirs"]
    assert batch_normalization_layers(subclassed) == [subclassed.bn]
    inputs = keras.Input((3, 5))
    with pytest.raises(ValueError, match="custom layer"):
        batch_normalization_layers(keras.Model(inputs, Block()(inputs)))
