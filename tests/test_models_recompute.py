"""keras_bn.models.recompute_statistics and the RecomputeStatistics callback.

The reference is a NumPy re-implementation, in float64, of the small models'
training-mode forward pass (each BN normalizing with its batch's statistics,
so the second BN's inputs depend on the first BN's batch statistics), with
the count-weighted merge written out. The models start with random moving
statistics, so a pass in inference mode would give other inputs.

Tolerances: the layers run in float32 (relative rounding 6e-8 per operation).
Each statistic sums at most 12 positions of values built by about ten float32
operations, and the normalization divides by standard deviations of order 1,
so relative errors stay near 1e-6; rtol=1e-5 keeps a margin of ten, while a
wrong formula moves the statistics by percents (biased vs unbiased: a factor
n / (n - 1) >= 12 / 11; an unweighted last batch: about 10%).
"""

import pathlib
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import canonical_axes
from helpers import expand_mask
from helpers import expand_param

import keras_bn
from keras_bn.callbacks import RecomputeStatistics
from keras_bn.models import recompute_statistics

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
import _common

N_EXAMPLES, BATCH_SIZE = 10, 4  # batches of 4, 4 and 2: a short last one
FEATURES = (3, 5)  # 3 positions of 5 features per example
RTOL, ATOL = 1e-5, 1e-6
BN_CLASSES = {
    "keras": keras.layers.BatchNormalization,
    "keras_bn": keras_bn.BatchNormalization,
}


def make_data(seed=0, n=N_EXAMPLES):
    rng = np.random.default_rng(seed)
    return rng.normal(2.0, 3.0, size=(n, *FEATURES)).astype("float32")


def randomize(model, seed=1):
    """Random gamma, beta and moving statistics for every BN layer."""
    rng = np.random.default_rng(seed)
    for layer in keras_bn.models.batch_normalization_layers(model):
        for variable in layer.weights:
            shape = variable.shape
            if variable.name in ("moving_variance", "moving_stddev", "renorm_stddev"):
                value = rng.uniform(0.5, 2.0, shape)
            elif variable.name == "gamma":
                value = rng.uniform(0.5, 1.5, shape)
            elif variable.name == "num_batches_tracked":
                continue
            else:
                value = rng.normal(0.0, 0.5, shape)
            variable.assign(value.astype(variable.dtype))
    return model


def make_mlp(bn_class, first=None, second=None, masking=False):
    """Dense -> BN -> ReLU -> Dense -> BN on inputs of shape FEATURES."""
    inputs = keras.Input(FEATURES)
    hidden = keras.layers.Masking(0.0)(inputs) if masking else inputs
    hidden = keras.layers.Dense(4, name="dense_1")(hidden)
    hidden = bn_class(name="bn_1", **(first or {}))(hidden)
    hidden = keras.layers.ReLU(name="relu")(hidden)
    hidden = keras.layers.Dense(3, name="dense_2")(hidden)
    outputs = bn_class(name="bn_2", **(second or {}))(hidden)
    return randomize(keras.Model(inputs, outputs))


def numpy_bn_train(h, layer, mask=None):
    """One training call of `layer` in float64: output and recorded statistics.

    Returns the output and a list of `(count, mean, variance)`, one per
    (virtual) batch, the variance with the layer's estimator.
    """
    axes = canonical_axes(layer.axis, h.ndim)
    gamma, beta = np.asarray(layer.gamma, "float64"), np.asarray(layer.beta, "float64")
    size = getattr(layer, "virtual_batch_size", None) or len(h)
    groups = len(h) // size
    if getattr(layer, "virtual_batch_grouping", None) == "consecutive":
        members = [np.arange(j * size, (j + 1) * size) for j in range(groups)]
    else:  # interleaved (tf-keras's): examples j, j + groups, j + 2 * groups, ...
        members = [np.arange(j, len(h), groups) for j in range(groups)]
    outputs, statistics = np.zeros_like(h), []
    for index in members:
        part = h[index]
        reduced = tuple(i for i in range(h.ndim) if i not in axes)
        weights = np.ones_like(part)
        if mask is not None:
            weights = np.broadcast_to(
                expand_mask(mask[index], h.ndim, axes), part.shape
            )
        count = weights.sum(reduced, keepdims=True)
        mean = (weights * part).sum(reduced, keepdims=True) / count
        variance = (weights * (part - mean) ** 2).sum(reduced, keepdims=True) / count
        y = (part - mean) / np.sqrt(variance + layer.epsilon)
        if layer.renorm:
            y = y * _renorm_r(layer, variance) + _renorm_d(layer, mean)
        outputs[index] = y * expand_param(gamma, h.ndim, axes) + expand_param(
            beta, h.ndim, axes
        )
        if getattr(layer, "moving_variance_estimator", "biased") == "unbiased":
            variance = variance * count / np.maximum(count - 1, 1)
        shape = gamma.shape
        statistics.append(
            (count.reshape(shape), mean.reshape(shape), variance.reshape(shape))
        )
    return outputs, statistics


def _renorm_stddev(layer, ndim=None):
    stddev = np.asarray(layer.renorm_stddev, "float64")
    return np.maximum(stddev, np.sqrt(layer.epsilon))


def _renorm_r(layer, variance):
    r = np.sqrt(variance + layer.epsilon) / _renorm_stddev(layer).reshape(
        variance.shape
    )
    clip = layer.renorm_clipping or {}
    return np.clip(r, clip.get("rmin", -np.inf), clip.get("rmax", np.inf))


def _renorm_d(layer, mean):
    renorm_mean = np.asarray(layer.renorm_mean, "float64").reshape(mean.shape)
    d = (mean - renorm_mean) / _renorm_stddev(layer).reshape(mean.shape)
    dmax = (layer.renorm_clipping or {}).get("dmax", np.inf)
    return np.clip(d, -dmax, dmax)


def reference_statistics(model, x, batch_size, mask=None):
    """`{bn name: (mean, variance, batches)}` of `make_mlp`'s model, in NumPy."""
    w1, b1 = (
        np.asarray(w, "float64") for w in model.get_layer("dense_1").get_weights()
    )
    w2, b2 = (
        np.asarray(w, "float64") for w in model.get_layer("dense_2").get_weights()
    )
    seen = {"bn_1": [], "bn_2": []}
    for start in range(0, len(x), batch_size):
        batch = np.asarray(x[start : start + batch_size], "float64")
        batch_mask = None if mask is None else mask[start : start + batch_size]
        h, statistics = numpy_bn_train(
            batch @ w1 + b1, model.get_layer("bn_1"), batch_mask
        )
        seen["bn_1"] += statistics
        h = np.maximum(h, 0.0) @ w2 + b2
        seen["bn_2"] += numpy_bn_train(h, model.get_layer("bn_2"), batch_mask)[1]
    return {name: count_weighted(statistics) for name, statistics in seen.items()}


def count_weighted(statistics):
    counts = np.stack([count for count, _, _ in statistics])
    means = np.stack([mean for _, mean, _ in statistics])
    variances = np.stack([variance for _, _, variance in statistics])
    total = counts.sum(0)
    return (counts * means).sum(0) / total, (counts * variances).sum(0) / total


def assert_statistics(model, expected):
    for name, (mean, variance) in expected.items():
        layer = model.get_layer(name)
        np.testing.assert_allclose(layer.moving_mean, mean, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(
            layer.moving_variance, variance, rtol=RTOL, atol=ATOL
        )


def weights_by_path(model):
    return {variable.path: np.array(variable) for variable in model.variables}


def bn_configs(model):
    """The BN layers' arguments, which the pass changes and must restore."""
    layers = keras_bn.models.batch_normalization_layers(model)
    return {layer.name: layer.get_config() for layer in layers}


CONFIGS = [
    ("keras", {}),
    ("keras_bn", {}),
    ("keras_bn", {"moving_variance_estimator": "unbiased"}),
    ("keras_bn", {"virtual_batch_size": 2}),
    ("keras_bn", {"virtual_batch_size": 2, "virtual_batch_grouping": "consecutive"}),
    ("keras_bn", {"axis": [1, 2]}),
    ("keras_bn", {"fused": False, "momentum": None}),
]


@pytest.mark.parametrize("class_name, kwargs", CONFIGS)
def test_statistics_match_the_numpy_reference(class_name, kwargs):
    model = make_mlp(BN_CLASSES[class_name], kwargs, kwargs)
    x = make_data()
    expected = reference_statistics(model, x, BATCH_SIZE)
    layers = recompute_statistics(model, x, batch_size=BATCH_SIZE, verbose=0)
    assert [layer.name for layer in layers] == ["bn_1", "bn_2"]
    assert_statistics(model, expected)
    if kwargs.get("momentum", 0.99) is None:  # the three batches, for both layers
        for layer in layers:
            np.testing.assert_array_equal(layer.num_batches_tracked, 3)


@pytest.mark.parametrize("class_name", list(BN_CLASSES))
def test_masked_positions_are_left_out(class_name):
    model = make_mlp(BN_CLASSES[class_name], masking=True)
    x = make_data()
    x[:, 1] = 0.0  # Masking hides every example's second position,
    x[-1] = 0.0  # and the whole last example: the last batch counts 2 of 6
    mask = np.any(x != 0.0, axis=-1)
    expected = reference_statistics(model, x, BATCH_SIZE, mask=mask)
    recompute_statistics(model, x, batch_size=BATCH_SIZE, verbose=0)
    assert_statistics(model, expected)


@pytest.mark.parametrize("class_name", list(BN_CLASSES))
def test_renorm_statistics_stay_fixed_in_the_pass_and_follow_after(class_name):
    clipping = {"rmin": 0.8, "rmax": 1.25, "dmax": 0.5}
    kwargs = {"renorm": True, "renorm_clipping": clipping, "renorm_momentum": 0.5}
    model = make_mlp(BN_CLASSES[class_name], kwargs, kwargs)
    x = make_data()
    # With renorm_momentum=0.5, statistics that drifted during the pass would
    # change the second BN's inputs from the second batch on.
    expected = reference_statistics(model, x, BATCH_SIZE)
    recompute_statistics(model, x, batch_size=BATCH_SIZE, verbose=0)
    assert_statistics(model, expected)
    for name in expected:
        layer = model.get_layer(name)
        stddev = np.sqrt(np.asarray(layer.moving_variance, "float64") + layer.epsilon)
        np.testing.assert_allclose(layer.moving_stddev, stddev, rtol=1e-6)
        np.testing.assert_allclose(layer.renorm_stddev, stddev, rtol=1e-6)
        np.testing.assert_allclose(layer.renorm_mean, layer.moving_mean, rtol=0)


def test_nested_and_shared_layers():
    """A Functional model inside a Sequential; a BN layer called twice."""
    inputs = keras.Input(FEATURES)
    shared = keras_bn.BatchNormalization(name="shared")
    first = shared(keras.layers.Dense(4, name="dense_a")(inputs))
    second = shared(keras.layers.Dense(4, name="dense_b")(inputs))
    inner = keras.Model(inputs, keras.layers.Concatenate()([first, second]))
    model = randomize(
        keras.Sequential([keras.Input(FEATURES), inner, keras.layers.ReLU()])
    )
    x = make_data()
    statistics = []
    for start in range(0, N_EXAMPLES, BATCH_SIZE):
        batch = np.asarray(x[start : start + BATCH_SIZE], "float64")
        for name in ("dense_a", "dense_b"):  # each call is a batch of its own
            kernel, bias = inner.get_layer(name).get_weights()
            statistics += numpy_bn_train(batch @ kernel + bias, shared)[1]
    mean, variance = count_weighted(statistics)
    recompute_statistics(model, x, batch_size=BATCH_SIZE, verbose=0)
    np.testing.assert_allclose(shared.moving_mean, mean, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(shared.moving_variance, variance, rtol=RTOL, atol=ATOL)


def test_no_other_weight_changes_and_the_optimizer_is_untouched():
    inputs = keras.Input(FEATURES)
    hidden = keras.layers.Dense(4)(inputs)
    hidden = keras_bn.BatchNormalization(name="recomputed")(hidden)
    hidden = keras.layers.Dropout(0.5)(hidden)  # training mode: a seed state moves
    hidden = keras.layers.Dense(4)(hidden)
    hidden = keras.layers.BatchNormalization(name="frozen", trainable=False)(hidden)
    model = randomize(keras.Model(inputs, keras.layers.Dense(2)(hidden)))
    model.compile(keras.optimizers.Adam(use_ema=True), "mse")
    x = make_data()
    model.fit(x, np.zeros((N_EXAMPLES, 3, 2)), batch_size=BATCH_SIZE, verbose=0)
    before, optimizer_before = (
        weights_by_path(model),
        [np.array(v) for v in model.optimizer.variables],
    )
    configs = bn_configs(model)
    recompute_statistics(model, x, batch_size=BATCH_SIZE, verbose=0)
    assert bn_configs(model) == configs
    after = weights_by_path(model)
    changed = {path for path in before if not np.array_equal(before[path], after[path])}
    assert changed == {"recomputed/moving_mean", "recomputed/moving_variance"}
    for old, variable in zip(optimizer_before, model.optimizer.variables):
        np.testing.assert_array_equal(old, variable)


class ArrayBatches(keras.utils.PyDataset):
    def __init__(self, x, batch_size):
        super().__init__()
        self.x, self.batch_size = x, batch_size

    def __len__(self):
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, index):
        part = self.x[index * self.batch_size : (index + 1) * self.batch_size]
        return part, np.zeros(len(part))


def test_every_data_form_gives_the_same_statistics():
    x = make_data()
    y = np.arange(N_EXAMPLES)
    forms = {
        "dataset of x": (tf.data.Dataset.from_tensor_slices(x).batch(BATCH_SIZE), {}),
        "dataset of (x, y)": (
            tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH_SIZE),
            {},
        ),
        "dataset of (x, y, w)": (
            tf.data.Dataset.from_tensor_slices((x, y, y * 0.5)).batch(BATCH_SIZE),
            {},
        ),
        "tuple of arrays": ((x, y), {"batch_size": BATCH_SIZE}),
        "PyDataset": (ArrayBatches(x, BATCH_SIZE), {}),
        "infinite dataset with steps": (
            tf.data.Dataset.from_tensor_slices(x).batch(BATCH_SIZE).take(3).repeat(),
            {"steps": 3},
        ),
    }
    reference = make_mlp(keras_bn.BatchNormalization)
    weights = reference.get_weights()
    recompute_statistics(reference, x, batch_size=BATCH_SIZE, verbose=0)
    for name, (data, kwargs) in forms.items():
        model = make_mlp(keras_bn.BatchNormalization)
        model.set_weights(weights)
        recompute_statistics(model, data, verbose=0, **kwargs)
        for left, right in zip(model.get_weights(), reference.get_weights()):
            np.testing.assert_array_equal(left, right, err_msg=name)


def test_steps_stops_early():
    x = make_data()
    model = make_mlp(keras_bn.BatchNormalization)
    expected = reference_statistics(model, x[: 2 * BATCH_SIZE], BATCH_SIZE)
    recompute_statistics(model, x, steps=2, batch_size=BATCH_SIZE, verbose=0)
    assert_statistics(model, expected)


def test_more_steps_than_batches_warns_and_uses_all():
    x = make_data()
    model = make_mlp(keras_bn.BatchNormalization)
    expected = reference_statistics(model, x, BATCH_SIZE)
    with pytest.warns(UserWarning, match="`steps`=5 exceeds the 3 batches"):
        recompute_statistics(model, x, steps=5, batch_size=BATCH_SIZE, verbose=0)
    assert_statistics(model, expected)


def test_progress_bar(capsys):
    x = make_data()
    recompute_statistics(make_mlp(keras_bn.BatchNormalization), x, batch_size=4)
    assert "3/3" in capsys.readouterr().out
    recompute_statistics(
        make_mlp(keras_bn.BatchNormalization), x, batch_size=4, verbose=0
    )
    assert capsys.readouterr().out == ""


def test_a_failing_pass_changes_nothing():
    """The third batch (2 examples) does not split into virtual batches of 4."""
    kwargs = {"virtual_batch_size": 4, "renorm": True, "momentum": None}
    model = make_mlp(keras_bn.BatchNormalization, kwargs)
    before, configs = weights_by_path(model), bn_configs(model)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        recompute_statistics(model, make_data(), batch_size=BATCH_SIZE, verbose=0)
    assert bn_configs(model) == configs
    after = weights_by_path(model)
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)


def test_non_finite_statistics_raise_and_change_nothing():
    model = make_mlp(keras_bn.BatchNormalization)
    x = make_data()
    x[5, 0, 0] = np.nan
    before = weights_by_path(model)
    with pytest.raises(
        ValueError, match=r"non-finite statistics for the layers \['bn_1', 'bn_2'\]"
    ):
        recompute_statistics(model, x, batch_size=BATCH_SIZE, verbose=0)
    for path, value in weights_by_path(model).items():
        np.testing.assert_array_equal(value, before[path], err_msg=path)


class Block(keras.layers.Layer):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(4)
        self.bn = keras.layers.BatchNormalization()

    def call(self, x, training=None):
        return self.bn(self.dense(x), training=training)


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.block = Block()

    def call(self, x, training=None):
        return self.block(x, training=training)


def _model_with_hidden_bn():
    inputs = keras.Input(FEATURES)
    hidden = keras_bn.BatchNormalization()(keras.layers.Dense(4)(inputs))
    return keras.Model(inputs, Block()(hidden))


def _subclassed():
    model = Subclassed()
    model(make_data())
    return model


def _frozen():
    model = make_mlp(keras_bn.BatchNormalization)
    model.trainable = False
    return model


def _dataset():
    return tf.data.Dataset.from_tensor_slices(make_data()).batch(BATCH_SIZE)


def _mlp():
    return make_mlp(keras_bn.BatchNormalization)


def _unbuilt():
    return keras.Sequential([keras_bn.BatchNormalization()])


def _without_bn():
    return keras.Sequential([keras.Input(FEATURES), keras.layers.Dense(2)])


ARRAYS = {"batch_size": 4}
BAD_INPUTS = {
    "subclassed": (
        _subclassed,
        make_data,
        ARRAYS,
        ValueError,
        "class Subclassed.*momentum=None",
    ),
    "unbuilt": (_unbuilt, make_data, ARRAYS, ValueError, "not built"),
    "no BN": (
        _without_bn,
        make_data,
        ARRAYS,
        ValueError,
        "no batch-normalization layer",
    ),
    "all frozen": (_frozen, make_data, ARRAYS, ValueError, "trainable=False"),
    "hidden BN": (
        _model_with_hidden_bn,
        make_data,
        ARRAYS,
        ValueError,
        r"custom layer.*/moving_variance",
    ),
    "no batch_size": (_mlp, make_data, {}, ValueError, "`batch_size` is required"),
    "batch_size with a dataset": (
        _mlp,
        _dataset,
        ARRAYS,
        ValueError,
        "only for arrays",
    ),
    "no end": (
        _mlp,
        lambda: _dataset().repeat(),
        {},
        ValueError,
        "`steps` is required",
    ),
    "steps=0": (_mlp, _dataset, {"steps": 0}, ValueError, "`steps` must be a positive"),
    "float steps": (_mlp, _dataset, {"steps": 2.0}, TypeError, "`steps`"),
    "verbose=3": (_mlp, _dataset, {"verbose": 3}, ValueError, "`verbose`"),
    "a list of floats": (
        _mlp,
        lambda: [[1.0, 2.0]],
        ARRAYS,
        TypeError,
        "`data` must be",
    ),
    "no batch": (_mlp, lambda: _dataset().take(0), {}, ValueError, "no batch"),
    "arrays of other lengths": (
        _mlp,
        lambda: (make_data(), np.zeros(N_EXAMPLES - 1)),
        ARRAYS,
        ValueError,
        "same batch axis",
    ),
    "no example": (_mlp, lambda: make_data(n=0), ARRAYS, ValueError, "one example"),
}


@pytest.mark.parametrize(
    "make_model, data, kwargs, error, match",
    list(BAD_INPUTS.values()),
    ids=list(BAD_INPUTS),
)
def test_bad_input_raises_a_clear_error(make_model, data, kwargs, error, match):
    model = make_model()
    before = weights_by_path(model) if model.built else {}
    with pytest.raises(error, match=match):
        recompute_statistics(model, data(), **{"verbose": 0, **kwargs})
    for path, value in weights_by_path(model).items():
        np.testing.assert_array_equal(value, before[path], err_msg=path)


def test_a_layer_with_every_position_masked_raises():
    model = make_mlp(keras_bn.BatchNormalization, masking=True)
    with pytest.raises(ValueError, match=r"\['bn_1', 'bn_2'\] received no"):
        recompute_statistics(
            model, np.zeros((4, *FEATURES), "float32"), batch_size=4, verbose=0
        )


def test_under_mirrored_strategy_the_statistics_are_those_of_the_global_batches():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    single = make_mlp(keras_bn.BatchNormalization, {"synchronized": True})
    with strategy.scope():
        mirrored = make_mlp(keras_bn.BatchNormalization, {"synchronized": True})
    mirrored.set_weights(single.get_weights())
    x = make_data()
    recompute_statistics(single, x, batch_size=BATCH_SIZE, verbose=0)
    recompute_statistics(mirrored, x, batch_size=BATCH_SIZE, verbose=0)
    for name in ("bn_1", "bn_2"):
        for variable in ("moving_mean", "moving_variance"):
            expected = getattr(single.get_layer(name), variable)
            replicas = getattr(mirrored.get_layer(name), variable).value.values
            assert len(replicas) == 2
            for value in replicas:  # same ops on one device: the same rounding
                np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-7)


def test_callback_at_train_end_gives_the_statistics_of_the_final_weights():
    x = make_data(n=16)
    y = np.zeros((16, 3, 3), "float32")
    models = []
    for callbacks in ([], [RecomputeStatistics(x, batch_size=BATCH_SIZE)]):
        keras.utils.set_random_seed(0)
        model = make_mlp(keras_bn.BatchNormalization)
        model.compile(keras.optimizers.SGD(0.1), "mse")
        model.fit(
            x,
            y,
            batch_size=BATCH_SIZE,
            epochs=2,
            shuffle=False,
            verbose=0,
            callbacks=callbacks,
        )
        models.append(model)
    plain, recomputed = models
    expected = reference_statistics(recomputed, x, BATCH_SIZE)
    assert_statistics(recomputed, expected)
    for name in ("dense_1", "bn_1", "dense_2"):  # same training, same weights
        for left, right in zip(
            plain.get_layer(name).get_weights()[:2],
            recomputed.get_layer(name).get_weights()[:2],
        ):
            np.testing.assert_allclose(left, right, rtol=1e-6)
    assert not np.allclose(
        plain.get_layer("bn_2").moving_mean, expected["bn_2"][0], rtol=1e-2
    )


@pytest.mark.parametrize("validate", [False, True])
def test_callback_at_epoch_end_runs_once_per_epoch_before_validation(validate):
    x = make_data(n=16)
    y = np.zeros((16, 3, 3), "float32")
    model = make_mlp(keras_bn.BatchNormalization)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    callback = RecomputeStatistics(x, batch_size=BATCH_SIZE, on="epoch_end")
    calls = []
    recompute = callback.recompute
    callback.recompute = lambda: (
        calls.append(model.optimizer.iterations.numpy()) or recompute()
    )
    history = model.fit(
        x,
        y,
        batch_size=BATCH_SIZE,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[callback],
        validation_data=(x, y) if validate else None,
    ).history
    assert calls == [4, 8]  # after the last step of each epoch
    assert_statistics(model, reference_statistics(model, x, BATCH_SIZE))
    if validate:  # validation ran with the recomputed statistics
        np.testing.assert_allclose(
            history["val_loss"][-1], model.evaluate(x, y, verbose=0), rtol=1e-5
        )


def test_callback_rejects_bad_arguments():
    with pytest.raises(ValueError, match="`on` must be one of"):
        RecomputeStatistics(make_data(), batch_size=4, on="batch_end")
    with pytest.raises(ValueError, match="`on` must be one of"):
        RecomputeStatistics(make_data(), batch_size=4, on=True)
    with pytest.raises(ValueError, match="`batch_size` is required"):
        RecomputeStatistics(make_data())


@pytest.mark.slow
def test_recomputing_after_ema_restores_test_accuracy():
    """The motivating use, on the bundled digits (about 6 s).

    `Adam(use_ema=True)` swaps the averaged weights in at the end of `fit`;
    the moving statistics still belong to the last raw weights. (BN momentum
    0.9, so that the raw weights' own statistics keep up in a short run.)
    """
    digits = _common.load_data()  # the examples' fixed split
    x_train, y_train = digits.x_train[..., None], digits.y_train
    x_test, y_test = digits.x_test[..., None], digits.y_test
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    hidden = inputs
    for filters in (32, 64):
        hidden = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(hidden)
        hidden = keras_bn.BatchNormalization(momentum=0.9)(hidden)
        hidden = keras.layers.ReLU()(hidden)
    hidden = keras.layers.GlobalAveragePooling2D()(hidden)
    model = keras.Model(inputs, keras.layers.Dense(10)(hidden))
    model.compile(
        keras.optimizers.Adam(3e-3, use_ema=True, ema_momentum=0.99),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = model.fit(
        x_train,
        y_train,
        batch_size=32,
        epochs=3,
        validation_data=(x_test, y_test),
        verbose=0,
    ).history
    raw_accuracy = history["val_accuracy"][-1]  # the raw weights, their statistics
    stale_accuracy = model.evaluate(x_test, y_test, verbose=0)[1]
    recompute_statistics(model, x_train, batch_size=32, verbose=0)
    recomputed_accuracy = model.evaluate(x_test, y_test, verbose=0)[1]
    assert raw_accuracy > 0.85
    assert stale_accuracy < raw_accuracy - 0.3
    assert recomputed_accuracy > raw_accuracy - 0.03
