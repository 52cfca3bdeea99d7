"""The model tools on real models: whole layer state, trainable flags, model
classes, `keras.ops` calls, shared and repeated layers, and the scope.

Reference: the original model (its predictions, its layers' state) and, for
the scope, the same model built with the other class. Where a copy is exact
by construction (state copied, the same ops) outputs are compared at float32
rounding of the sizes involved: about 100 products per output, so
`1e-5` of the largest output. A lost state is off by the data's own scale
(Normalization: the mean of inputs around 3; a lookup: another index).
"""

import threading
import warnings

import keras
import numpy as np
import pytest

import keras_bn
from keras_bn.models import batch_normalization_scope
from keras_bn.models import convert_batch_normalization
from keras_bn.models import fold_batch_normalization
from keras_bn.models import recompute_statistics

L = keras.layers
TOOLS = {
    "convert_keras_bn": lambda model: convert_batch_normalization(model, "keras_bn"),
    "convert_keras": lambda model: convert_batch_normalization(model, "keras"),
    "fold": fold_batch_normalization,
}


def randomize(model, seed=0):
    """Random BN weights and statistics, far from the identity."""
    rng = np.random.default_rng(seed)
    for layer in keras_bn.models.batch_normalization_layers(model):
        for variable in layer.weights:
            low, high = (
                (0.5, 1.5)
                if variable.name in ("gamma", "moving_variance")
                else (-0.5, 0.5)
            )
            variable.assign(
                rng.uniform(low, high, variable.shape).astype(variable.dtype)
            )
    return model


def assert_close(actual, expected):
    actual, expected = np.asarray(actual, "float64"), np.asarray(expected, "float64")
    scale = max(np.abs(expected).max(), 1.0)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * scale)


def quietly(tool, model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tool(model)


# State that get_weights() does not carry.


def normalization_layer(model):
    (layer,) = [layer for layer in model.layers if isinstance(layer, L.Normalization)]
    return layer


@pytest.fixture(scope="module")
def efficientnet_weights(tmp_path_factory):
    """EfficientNetB0 with its Normalization adapted, as a weights file (as
    ImageNet weights arrive)."""
    model = keras.applications.EfficientNetB0(weights=None, input_shape=(32, 32, 3))
    rng = np.random.default_rng(0)
    normalization = normalization_layer(model)
    normalization.adapt(rng.normal(3.0, 2.0, (64, 32, 32, 3)).astype("float32"))
    randomize(model)
    path = tmp_path_factory.mktemp("efficientnet") / "b0.weights.h5"
    model.save_weights(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("tool", list(TOOLS))
def test_adapted_normalization_survives_in_efficientnet(tool, efficientnet_weights):
    model = keras.applications.EfficientNetB0(weights=None, input_shape=(32, 32, 3))
    model.load_weights(efficientnet_weights)
    copy = quietly(TOOLS[tool], model)
    old, new = normalization_layer(model), normalization_layer(copy)
    assert np.abs(np.asarray(old.mean)).max() > 1.0  # adapted, not the default 0
    np.testing.assert_array_equal(new.mean, old.mean)
    np.testing.assert_array_equal(new.variance, old.variance)
    x = np.random.default_rng(1).normal(3.0, 2.0, (2, 32, 32, 3)).astype("float32")
    probe = keras.Model(model.input, old.output)
    copy_probe = keras.Model(copy.input, new.output)
    assert_close(copy_probe(x), probe(x))
    assert_close(copy(x), model(x))


def lookup_model(lookup, vocabulary_data):
    lookup.adapt(vocabulary_data)
    inputs = keras.Input((3,), dtype=lookup.vocabulary_dtype)
    h = L.Embedding(lookup.vocabulary_size(), 4, name="embedding")(lookup(inputs))
    h = L.Dense(5, name="dense")(L.Flatten()(h))
    return randomize(keras.Model(inputs, L.BatchNormalization(name="bn")(h)))


LOOKUPS = {
    "string": lambda: lookup_model(
        L.StringLookup(name="lookup"), np.array([["a", "b", "c"], ["d", "a", "e"]])
    ),
    "integer": lambda: lookup_model(
        L.IntegerLookup(name="lookup"), np.array([[7, 11, 13], [17, 7, 19]])
    ),
}


@pytest.mark.parametrize("kind", list(LOOKUPS))
@pytest.mark.parametrize("tool", list(TOOLS))
def test_an_adapted_lookup_keeps_its_table(tool, kind):
    model = LOOKUPS[kind]()
    copy = TOOLS[tool](model)
    old, new = model.get_layer("lookup"), copy.get_layer("lookup")
    assert new.get_vocabulary() == old.get_vocabulary()
    x = (
        np.array([["e", "a", "z"], ["c", "b", "d"]])
        if kind == "string"
        else np.array([[19, 7, 5], [13, 11, 17]])
    )
    np.testing.assert_array_equal(new(x), old(x))
    assert_close(copy(x), model(x))


def nested_model():
    inner_inputs = keras.Input((4,))
    h = L.Dense(6, name="inner_dense")(inner_inputs)
    inner = keras.Model(
        inner_inputs, L.BatchNormalization(name="inner_bn")(h), name="inner"
    )
    inputs = keras.Input((4,))
    h = inner(inputs)
    h = L.Dense(3, name="outer_dense")(h)
    model = keras.Model(inputs, L.BatchNormalization(name="outer_bn")(h))
    return randomize(model)


@pytest.mark.parametrize("tool", list(TOOLS))
def test_trainable_flags_survive_at_every_level(tool):
    model = nested_model()
    model.get_layer("inner").trainable = False
    model.get_layer("outer_dense").trainable = False
    copy = TOOLS[tool](model)
    assert copy.get_layer("inner").trainable is False
    assert copy.get_layer("outer_dense").trainable is False
    assert copy.trainable is True
    names = lambda m: sorted(v.path.split("/")[-2] for v in m.trainable_weights)  # noqa: E731
    if tool != "fold":  # fold drops the BN weights (and outer_dense folds)
        assert names(copy) == names(model)
    # A frozen outer model with one layer thawed again.
    model = nested_model()
    model.trainable = False
    model.get_layer("inner").trainable = True
    model.get_layer("inner").get_layer("inner_dense").trainable = False
    copy = TOOLS[tool](model)
    assert copy.trainable is False
    assert copy.get_layer("inner").trainable is True
    assert copy.get_layer("inner").get_layer("inner_dense").trainable is False


# Classes, keras.ops calls.


@keras.saving.register_keras_serializable(package="keras_bn_tests")
class Regressor(keras.Model):
    """A Functional subclass whose config holds its constructor's arguments."""

    def __init__(self, units=3, width=None, **kwargs):
        inputs = keras.Input((4,))
        h = L.Dense(units, name="dense")(inputs)
        h = keras.ops.pad(h, [[0, 0], [1, 1]])  # an operation, not a layer
        outputs = L.BatchNormalization(name="bn")(h)
        super().__init__(inputs, outputs, **kwargs)
        self.units, self.width = units, width
        self.features = h  # an attribute a task would read

    def get_config(self):
        # `width` left out: the config does not rebuild another value.
        return {"units": self.units, "name": self.name, "trainable": self.trainable}


def test_convert_keeps_a_functional_subclass_and_its_attributes():
    model = randomize(Regressor(units=3))
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = convert_batch_normalization(model, "keras_bn")
    assert type(converted) is Regressor
    assert converted.units == 3 and tuple(converted.features.shape) == (None, 5)
    assert type(converted.get_layer("bn")) is keras_bn.BatchNormalization
    assert_close(converted(x), model(x))
    assert_close(converted(x, training=True), model(x, training=True))


def test_a_subclass_its_config_cannot_rebuild_converts_exactly_with_a_warning():
    model = randomize(Regressor(units=3))
    model.get_config = lambda: {"units": 7, "name": model.name}  # not this model
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    with pytest.warns(UserWarning, match="'regressor.*plain Functional.*Regressor"):
        converted = convert_batch_normalization(model, "keras_bn")
    assert type(converted) is not Regressor
    assert type(converted.get_layer("bn")) is keras_bn.BatchNormalization
    assert_close(converted(x), model(x))


def test_fold_of_a_functional_subclass_warns_that_the_class_is_lost():
    model = randomize(Regressor(units=3))
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    with pytest.warns(UserWarning, match="plain Functional model, not a Regressor"):
        folded = fold_batch_normalization(model)
    assert_close(folded(x), model(x))


# Shared and repeated layers.


def shared_model(shared):
    """A Dense (or the BN after it) used in a nested model and the outer graph."""
    dense, bn = L.Dense(4, name="dense"), L.BatchNormalization(name="bn")
    inner_inputs = keras.Input((4,))
    inner = keras.Model(inner_inputs, bn(dense(inner_inputs)), name="inner")
    inputs = keras.Input((4,))
    h = inner(inputs)
    if shared == "dense":
        h = L.BatchNormalization(name="outer_bn")(dense(h))
    else:
        h = bn(L.Dense(4, name="outer_dense")(h))
    return randomize(keras.Model(inputs, h))


@pytest.mark.parametrize("shared", ["dense", "bn"])
def test_a_layer_shared_with_a_nested_model_is_copied_exactly(shared):
    model = shared_model(shared)
    x = np.random.default_rng(0).normal(size=(6, 4)).astype("float32")
    with pytest.warns(UserWarning, match=f"stays unfolded: \\['{shared}'\\]"):
        folded = fold_batch_normalization(model)
    assert_close(folded(x), model(x))
    converted = convert_batch_normalization(model, "keras_bn")
    assert_close(converted(x), model(x))
    inner = converted.get_layer("inner")
    assert inner.get_layer(shared) is converted.get_layer(shared)  # still shared


def test_a_layer_repeated_in_a_sequential_model_stays_unfolded():
    dense, bn = L.Dense(4, name="dense"), L.BatchNormalization(name="bn")
    model = randomize(
        keras.Sequential([keras.Input((4,)), dense, bn, L.ReLU(), dense, bn])
    )
    x = np.random.default_rng(0).normal(size=(6, 4)).astype("float32")
    with pytest.warns(UserWarning, match="stays unfolded"):
        folded = fold_batch_normalization(model)
    assert_close(folded(x), model(x))
    assert_close(convert_batch_normalization(model, "keras_bn")(x), model(x))


def test_recompute_runs_on_graphs_with_operations_and_shared_layers():
    model = shared_model("dense")
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    recompute_statistics(model, x, batch_size=8, verbose=0)
    assert_close(model(x, training=False), model(x, training=True))
    model = Regressor(units=3)
    recompute_statistics(model, x, batch_size=8, verbose=0)
    assert_close(model(x, training=False), model(x, training=True))


# The scope.


class Block(L.Layer):
    """Batch normalization made in Python, invisible to `model.layers`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = L.Dense(4)
        self.bn = L.BatchNormalization()

    def call(self, x, training=None):
        return self.bn(self.dense(x), training=training)


class Net(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.block = Block()
        self.head = keras_bn.BatchNormalization(momentum=0.9)

    def call(self, x, training=None):
        return self.head(self.block(x, training=training), training=training)


def test_a_subclassed_model_built_in_the_scope_loads_weights_saved_with_keras(tmp_path):
    x = np.random.default_rng(0).normal(size=(6, 4)).astype("float32")
    reference = Net()
    reference(x)
    randomize_layers = [reference.block.bn, reference.head]
    for layer in randomize_layers:
        for variable in layer.weights:
            variable.assign(np.random.default_rng(1).uniform(0.5, 1.5, variable.shape))
    reference.save_weights(tmp_path / "net.weights.h5")
    with batch_normalization_scope():
        ours = Net()
    ours(x)
    assert type(ours.block.bn) is keras_bn.BatchNormalization
    assert type(ours.head) is keras_bn.BatchNormalization
    ours.load_weights(tmp_path / "net.weights.h5")
    assert_close(ours(x), reference(x))
    with batch_normalization_scope("keras"):
        theirs = Net()
    theirs(x)
    assert type(theirs.head) is keras.layers.BatchNormalization
    assert theirs.head.momentum == 0.9  # its own arguments carried over
    theirs.load_weights(tmp_path / "net.weights.h5")
    assert_close(theirs(x), reference(x))
    assert_close(ours(x, training=True), reference(x, training=True))


def test_the_scope_applies_overrides_to_both_classes_and_leaves_subclasses():
    class Custom(keras.layers.BatchNormalization):
        pass

    with batch_normalization_scope(momentum=0.5, fused=False):
        made = [
            L.BatchNormalization(momentum=0.9),
            keras_bn.BatchNormalization(momentum=0.8),
            keras_bn.BatchNormalization.from_config(
                keras_bn.BatchNormalization().get_config()
            ),
            Custom(momentum=0.7),
        ]
    assert [type(layer) for layer in made[:3]] == [keras_bn.BatchNormalization] * 3
    assert [layer.momentum for layer in made] == [0.5, 0.5, 0.5, 0.7]
    assert [layer.fused for layer in made[:3]] == [False] * 3
    assert type(made[3]) is Custom
    assert type(L.BatchNormalization()) is L.BatchNormalization  # after the scope
    assert keras_bn.BatchNormalization(momentum=0.8).momentum == 0.8


def test_the_scope_ends_on_an_error_and_nests():
    with pytest.raises(RuntimeError, match="inside"):
        with batch_normalization_scope():
            raise RuntimeError("inside")
    assert type(L.BatchNormalization()) is L.BatchNormalization
    with batch_normalization_scope():
        with batch_normalization_scope("keras"):
            inner = (L.BatchNormalization(), keras_bn.BatchNormalization())
        outer = L.BatchNormalization()
    assert [type(layer) for layer in inner] == [L.BatchNormalization] * 2
    assert type(outer) is keras_bn.BatchNormalization
    assert type(L.BatchNormalization()) is L.BatchNormalization


def test_the_scope_acts_on_its_own_thread_only():
    made, entered, release = [], threading.Event(), threading.Event()

    def other_thread():
        entered.wait(10)
        made.append(L.BatchNormalization())
        release.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with batch_normalization_scope():
        entered.set()
        release.wait(10)
        ours = L.BatchNormalization()
    thread.join(10)
    assert type(made[0]) is L.BatchNormalization
    assert type(ours) is keras_bn.BatchNormalization


def test_the_scope_refuses_bad_arguments_at_once_and_inexpressible_layers():
    with pytest.raises(ValueError, match="`to` must be one of"):
        with batch_normalization_scope("torch"):
            pass
    with pytest.raises(ValueError, match=r"\['ghost'\] are not arguments"):
        with batch_normalization_scope(ghost=2):
            pass
    with batch_normalization_scope("keras"):
        with pytest.raises(ValueError, match="'b'.*momentum=None"):
            keras_bn.BatchNormalization(momentum=None, name="b")
    assert type(L.BatchNormalization()) is L.BatchNormalization
