"""Tests for keras_bn.losses: the Keras drop-ins and SoftmaxCrossEntropy."""

import json
import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import compiled
from helpers import needs_internal

from keras_bn.losses import CategoricalCrossentropy
from keras_bn.losses import SoftmaxCrossEntropy
from keras_bn.losses import SparseCategoricalCrossentropy

REDUCTIONS = [
    "sum_over_batch_size",
    "sum",
    None,
    "none",
    "mean",
    "mean_with_sample_weight",
]
MEAN_REDUCTIONS = ["sum_over_batch_size", "mean", "mean_with_sample_weight"]


def loss_and_grad(loss, y_true, y_pred, sample_weight=None, mask=None):
    y_pred = tf.convert_to_tensor(y_pred)
    if mask is not None:
        y_pred._keras_mask = tf.convert_to_tensor(mask)
    with tf.GradientTape() as tape:
        tape.watch(y_pred)
        value = loss(y_true, y_pred, sample_weight=sample_weight)
    return value, tape.gradient(value, y_pred)


def assert_same(ours, theirs, rtol=1e-6, atol=1e-7):
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def problem(shape=(6, 5), seed=0, dtype="float32"):
    """Logits, probabilities, one-hot labels, class ids, sample weights."""
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=shape) * 3).astype(dtype)
    probabilities = tf.nn.softmax(logits).numpy()
    ids = rng.integers(0, shape[-1], size=shape[:-1])
    onehot = np.eye(shape[-1], dtype=dtype)[ids]
    sample_weight = rng.uniform(0.2, 2.0, size=shape[:-1]).astype(dtype)
    return logits, probabilities, onehot, ids, sample_weight


def log_softmax_np(logits, axis=-1):
    shifted = logits - logits.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_categorical_matches_keras(reduction, from_logits, weighted, label_smoothing):
    logits, probabilities, onehot, _, sample_weight = problem()
    y_pred = logits if from_logits else probabilities
    kwargs = dict(
        from_logits=from_logits, label_smoothing=label_smoothing, reduction=reduction
    )
    sw = sample_weight if weighted else None
    ours = loss_and_grad(CategoricalCrossentropy(**kwargs), onehot, y_pred, sw)
    theirs = loss_and_grad(
        keras.losses.CategoricalCrossentropy(**kwargs), onehot, y_pred, sw
    )
    assert_same(ours, theirs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignore_class", [None, 2])
def test_sparse_categorical_matches_keras(
    reduction, from_logits, weighted, ignore_class
):
    logits, probabilities, _, ids, sample_weight = problem()
    y_pred = logits if from_logits else probabilities
    kwargs = dict(
        from_logits=from_logits, ignore_class=ignore_class, reduction=reduction
    )
    sw = sample_weight if weighted else None
    ours = loss_and_grad(SparseCategoricalCrossentropy(**kwargs), ids, y_pred, sw)
    theirs = loss_and_grad(
        keras.losses.SparseCategoricalCrossentropy(**kwargs), ids, y_pred, sw
    )
    assert_same(ours, theirs)


@pytest.mark.parametrize("from_logits", [True, False])
def test_float64_losses_match_keras(from_logits):
    logits, probabilities, onehot, ids, sample_weight = problem(dtype="float64")
    y_pred = logits if from_logits else probabilities
    for ours, theirs, y_true in [
        (CategoricalCrossentropy, keras.losses.CategoricalCrossentropy, onehot),
        (
            SparseCategoricalCrossentropy,
            keras.losses.SparseCategoricalCrossentropy,
            ids,
        ),
    ]:
        kwargs = dict(from_logits=from_logits, dtype="float64")
        assert_same(
            loss_and_grad(ours(**kwargs), y_true, y_pred, sample_weight),
            loss_and_grad(theirs(**kwargs), y_true, y_pred, sample_weight),
            rtol=1e-12,
            atol=1e-14,
        )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("sparse", [False, True])
def test_masks_and_per_timestep_weights_match_keras(reduction, sparse):
    logits, probabilities, onehot, ids, sample_weight = problem(shape=(3, 4, 5))
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]], bool)
    if sparse:
        ours = SparseCategoricalCrossentropy(reduction=reduction, ignore_class=1)
        theirs = keras.losses.SparseCategoricalCrossentropy(
            reduction=reduction, ignore_class=1
        )
        y_true = ids
    else:
        ours = CategoricalCrossentropy(reduction=reduction, label_smoothing=0.2)
        theirs = keras.losses.CategoricalCrossentropy(
            reduction=reduction, label_smoothing=0.2
        )
        y_true = onehot
    for sw in [None, sample_weight]:
        assert_same(
            loss_and_grad(ours, y_true, probabilities, sw, mask),
            loss_and_grad(theirs, y_true, probabilities, sw, mask),
        )


@pytest.mark.parametrize("label_shape", ["squeezed", "trailing_1"])
def test_per_pixel_channels_last_matches_keras(label_shape):
    logits, _, onehot, ids, sample_weight = problem(shape=(2, 3, 4, 5))
    labels = ids if label_shape == "squeezed" else ids[..., None]
    for ours, theirs, y_true in [
        (
            SparseCategoricalCrossentropy,
            keras.losses.SparseCategoricalCrossentropy,
            labels,
        ),
        (CategoricalCrossentropy, keras.losses.CategoricalCrossentropy, onehot),
    ]:
        assert_same(
            loss_and_grad(ours(from_logits=True), y_true, logits, sample_weight),
            loss_and_grad(theirs(from_logits=True), y_true, logits, sample_weight),
        )


@needs_internal("the logits Keras records behind a softmax (`_keras_logits`)")
@pytest.mark.parametrize("mode", ["eager", "function"])
def test_softmax_outputs_are_replaced_by_their_logits_as_in_keras(mode):
    logits, _, onehot, ids, _ = problem()
    logits = tf.constant(logits * 10)  # saturated: clipping would change the loss

    def compute(loss, y_true):
        def fn(x):
            if mode == "eager":
                return loss(y_true, keras.activations.softmax(x))
            return loss(y_true, tf.nn.softmax(x))  # a Softmax graph op

        with tf.GradientTape() as tape:
            tape.watch(logits)
            value = compiled(fn, mode)(logits)
        return value, tape.gradient(value, logits)

    for ours, theirs, y_true in [
        (CategoricalCrossentropy, keras.losses.CategoricalCrossentropy, onehot),
        (
            SparseCategoricalCrossentropy,
            keras.losses.SparseCategoricalCrossentropy,
            ids,
        ),
    ]:
        result = compute(ours(), y_true)
        assert_same(result, compute(theirs(), y_true))
        from_logits = loss_and_grad(ours(from_logits=True), y_true, logits)
        assert_same(result, from_logits)
    with pytest.warns(UserWarning, match="from_logits=True"):
        result = compute(SoftmaxCrossEntropy(), onehot)
    assert_same(result, from_logits_dense(logits, onehot))


def from_logits_dense(logits, onehot):
    return loss_and_grad(CategoricalCrossentropy(from_logits=True), onehot, logits)


@needs_internal("the logits Keras records behind a softmax (`_keras_logits`)")
def test_from_logits_on_a_softmax_output_warns_as_keras():
    logits, _, onehot, _, _ = problem()
    probabilities = keras.activations.softmax(tf.constant(logits))
    with pytest.warns(UserWarning, match="from_logits=True"):
        ours = CategoricalCrossentropy(from_logits=True)(onehot, probabilities)
    with pytest.warns(UserWarning, match="from_logits=True"):
        theirs = keras.losses.CategoricalCrossentropy(from_logits=True)(
            onehot, probabilities
        )
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


@pytest.mark.parametrize("from_logits", [True, False])
def test_label_smoothing_counts_classes_on_the_class_axis(from_logits):
    # Channels-first: 3 classes on axis 1, 5 on the last axis.
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 4, 5)).astype("float64")
    y_pred = logits if from_logits else np.exp(log_softmax_np(logits, 1))
    onehot = np.moveaxis(np.eye(3)[rng.integers(0, 3, size=(2, 4, 5))], -1, 1)
    kwargs = dict(from_logits=from_logits, label_smoothing=0.3, axis=1, reduction=None)
    ours = CategoricalCrossentropy(dtype="float64", **kwargs)(onehot, y_pred)
    expected = -np.sum((onehot * 0.7 + 0.3 / 3) * log_softmax_np(logits, 1), axis=1)
    np.testing.assert_allclose(ours, expected, rtol=1e-12)
    theirs = keras.losses.CategoricalCrossentropy(dtype="float64", **kwargs)(
        onehot, y_pred
    )
    assert not np.allclose(theirs, expected)  # Keras divides by 5


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("ignore_class", [None, 0])
def test_sparse_labels_work_on_any_class_axis(from_logits, ignore_class):
    logits, probabilities, _, ids, sample_weight = problem(shape=(2, 3, 4, 5))
    y_pred = logits if from_logits else probabilities
    channels_first = np.moveaxis(y_pred, -1, 1)
    kwargs = dict(from_logits=from_logits, ignore_class=ignore_class)
    last = SparseCategoricalCrossentropy(**kwargs)
    first = SparseCategoricalCrossentropy(axis=1, **kwargs)
    expected_value, expected_grad = loss_and_grad(last, ids, y_pred, sample_weight)
    value, grad = loss_and_grad(first, ids, channels_first, sample_weight)
    np.testing.assert_allclose(value, expected_value, rtol=1e-6)
    np.testing.assert_allclose(grad, np.moveaxis(expected_grad, -1, 1), rtol=1e-6)
    value = first(ids[:, None], channels_first, sample_weight)  # size-1 class axis
    np.testing.assert_allclose(value, expected_value, rtol=1e-6)
    with pytest.raises(ValueError, match="axis"):
        keras.losses.SparseCategoricalCrossentropy(axis=1, **kwargs)(
            ids, channels_first
        )


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("axis", [-1, 1])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_softmax_cross_entropy_per_example_values(sparse, axis, label_smoothing):
    logits, _, onehot, ids, _ = problem(shape=(2, 3, 4), dtype="float64")
    if axis == 1:
        logits, onehot = np.moveaxis(logits, -1, 1), np.moveaxis(onehot, -1, 1)
    loss = SoftmaxCrossEntropy(
        sparse=sparse,
        axis=axis,
        label_smoothing=label_smoothing,
        reduction=None,
        dtype="float64",
    )
    value = loss(ids if sparse else onehot, logits)
    target = onehot * (1 - label_smoothing) + label_smoothing / 4
    expected = -np.sum(target * log_softmax_np(logits, axis), axis=axis)
    np.testing.assert_allclose(value, expected, rtol=1e-12)


def torch_weighted_cross_entropy(logits, ids, weight, reduction, ignore_index=None):
    """`torch.nn.functional.cross_entropy(weight=..., ignore_index=...)`, in NumPy.

    Class axis last. Per example `w[y] * -log_softmax(x)[y]`; "mean" divides
    the sum by the sum of `w[y]` over the examples that are not ignored.
    """
    keep = np.ones(ids.shape, bool) if ignore_index is None else ids != ignore_index
    safe = np.where(keep, ids, 0)
    nll = -np.take_along_axis(log_softmax_np(logits), safe[..., None], -1)[..., 0]
    w = np.asarray(weight)[safe] * keep
    if reduction == "none":
        return w * nll
    if reduction == "sum":
        return np.sum(w * nll)
    return np.sum(w * nll) / np.sum(w)


@pytest.mark.parametrize(
    "reduction,torch_reduction",
    [("sum_over_batch_size", "mean"), ("mean", "mean"), ("sum", "sum"), (None, "none")],
)
@pytest.mark.parametrize("ignore_class", [None, 1])
@pytest.mark.parametrize("axis", [-1, 1])
def test_class_weight_follows_pytorch(reduction, torch_reduction, ignore_class, axis):
    logits, _, _, ids, _ = problem(shape=(3, 4, 5), dtype="float64")
    weight = [0.5, 2.0, 1.0, 3.0, 0.25]
    loss = SoftmaxCrossEntropy(
        sparse=True,
        axis=axis,
        ignore_class=ignore_class,
        class_weight=weight,
        reduction=reduction,
        dtype="float64",
    )
    y_pred = logits if axis == -1 else np.moveaxis(logits, -1, 1)
    expected = torch_weighted_cross_entropy(
        logits, ids, weight, torch_reduction, ignore_class
    )
    np.testing.assert_allclose(loss(ids, y_pred), expected, rtol=1e-12)


def test_class_weight_with_soft_labels_weights_each_example():
    logits, _, _, _, _ = problem(shape=(6, 4), dtype="float64")
    labels = np.random.default_rng(2).dirichlet(np.ones(4), size=6)
    weight = np.array([1.0, 2.0, 0.5, 4.0])
    example_weight = labels @ weight
    per_example = -np.sum(labels * log_softmax_np(logits), -1)
    loss = SoftmaxCrossEntropy(class_weight=list(weight), dtype="float64")
    np.testing.assert_allclose(
        loss(labels, logits),
        np.sum(example_weight * per_example) / np.sum(example_weight),
        rtol=1e-12,
    )


def test_class_weight_with_sample_weights():
    logits, _, _, ids, sample_weight = problem(shape=(8, 3), dtype="float64")
    weight = np.array([2.0, 0.5, 1.0])
    w = weight[ids]
    nll = -np.take_along_axis(log_softmax_np(logits), ids[:, None], -1)[:, 0]
    expected = {
        "sum_over_batch_size": np.sum(w * nll * sample_weight) / np.sum(w),
        "mean_with_sample_weight": np.sum(w * nll * sample_weight)
        / np.sum(w * sample_weight),
        "sum": np.sum(w * nll * sample_weight),
    }
    for reduction, value in expected.items():
        loss = SoftmaxCrossEntropy(
            sparse=True, class_weight=list(weight), reduction=reduction, dtype="float64"
        )
        np.testing.assert_allclose(loss(ids, logits, sample_weight), value, rtol=1e-12)


@needs_internal("the mask Keras reads from a tensor (`_keras_mask`)")
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("sparse", [False, True])
def test_unit_class_weights_change_nothing(reduction, sparse):
    logits, _, onehot, ids, sample_weight = problem(shape=(3, 4, 5))
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]], bool)
    kwargs = dict(sparse=sparse, reduction=reduction, label_smoothing=0.1)
    if sparse:
        kwargs["ignore_class"] = 2
    y_true = ids if sparse else onehot
    for sw in [None, sample_weight]:
        assert_same(
            loss_and_grad(
                SoftmaxCrossEntropy(class_weight=[1.0] * 5, **kwargs),
                y_true,
                logits,
                sw,
                mask,
            ),
            loss_and_grad(SoftmaxCrossEntropy(**kwargs), y_true, logits, sw, mask),
        )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "make_loss",
    [
        lambda r: SoftmaxCrossEntropy(sparse=True, ignore_class=-1, reduction=r),
        lambda r: SoftmaxCrossEntropy(
            sparse=True, ignore_class=-1, reduction=r, class_weight=[1.0, 2.0, 3.0]
        ),
        lambda r: SparseCategoricalCrossentropy(
            from_logits=True, ignore_class=-1, reduction=r
        ),
        lambda r: SparseCategoricalCrossentropy(ignore_class=-1, reduction=r),
    ],
)
def test_loss_with_all_ignored_batch_gives_zero_loss_and_gradient(reduction, make_loss):
    logits = tf.random.normal([4, 2, 3], seed=3)
    ids = -np.ones([4, 2], int)
    for sw in [None, np.ones([4, 2], "float32")]:
        value, grad = loss_and_grad(make_loss(reduction), ids, logits, sw)
        np.testing.assert_array_equal(value, np.zeros_like(value))
        np.testing.assert_array_equal(grad, np.zeros([4, 2, 3]))


@pytest.mark.parametrize(
    "loss", [SoftmaxCrossEntropy(sparse=True), SparseCategoricalCrossentropy()]
)
def test_out_of_range_labels_raise_eagerly_and_give_nan_in_graphs(loss):
    probabilities = tf.fill([3, 4], 0.25)
    with pytest.raises(ValueError, match="out-of-range labels: \\[4\\]"):
        loss([0, 4, 1], probabilities)
    value = tf.function(loss, jit_compile=True)(tf.constant([0, 4, 1]), probabilities)
    assert np.isnan(value)
    value = tf.function(loss)(tf.constant([0, 3, 1]), probabilities)
    assert np.isfinite(value)


def test_constructor_arguments_are_validated():
    with pytest.raises(ValueError, match="`label_smoothing`"):
        SoftmaxCrossEntropy(label_smoothing=-0.1)
    with pytest.raises(ValueError, match="`label_smoothing`"):
        CategoricalCrossentropy(label_smoothing=2)
    with pytest.raises(TypeError, match="`axis`"):
        SoftmaxCrossEntropy(axis=True)
    with pytest.raises(TypeError, match="`axis`"):
        SparseCategoricalCrossentropy(axis=(1,))
    with pytest.raises(TypeError, match="`ignore_class`"):
        SparseCategoricalCrossentropy(ignore_class=1.5)
    with pytest.raises(ValueError, match="sparse=True"):
        SoftmaxCrossEntropy(ignore_class=0)
    with pytest.raises(ValueError, match="non-negative"):
        SoftmaxCrossEntropy(class_weight=[1.0, -1.0])
    with pytest.raises(TypeError, match="`class_weight`"):
        SoftmaxCrossEntropy(class_weight=1.0)
    with pytest.raises(ValueError, match="reduction"):
        SoftmaxCrossEntropy(reduction="max")
    with pytest.raises(ValueError, match="3 entries but the logits have 4 classes"):
        SoftmaxCrossEntropy(sparse=True, class_weight=[1, 2, 3])([0], np.ones([1, 4]))


NON_DEFAULT = [
    SoftmaxCrossEntropy(
        sparse=True,
        label_smoothing=0.1,
        axis=1,
        ignore_class=255,
        class_weight=[1.0, 2.0, 0.5],
        reduction="sum",
        name="seg_loss",
        dtype="float64",
    ),
    CategoricalCrossentropy(
        from_logits=True,
        label_smoothing=0.2,
        axis=1,
        reduction="mean_with_sample_weight",
        name="cce",
        dtype="mixed_float16",
    ),
    SparseCategoricalCrossentropy(
        from_logits=True,
        ignore_class=-1,
        reduction=None,
        axis=1,
        name="scce",
        dtype=keras.DTypePolicy("float64"),
    ),
]


@pytest.mark.parametrize("loss", NON_DEFAULT, ids=lambda loss: type(loss).__name__)
def test_config_round_trip_keeps_every_argument(loss):
    config = loss.get_config()
    assert config["axis"] == 1
    clone = type(loss).from_config(config)
    assert clone.get_config() == config
    assert clone.dtype == loss.dtype and clone.reduction == loss.reduction
    registered = keras.saving.get_registered_name(type(loss))
    assert registered == f"keras_bn>{type(loss).__name__}"
    assert keras.losses.deserialize(registered) is type(loss)
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(loss)
    )
    assert type(restored) is type(loss) and restored.get_config() == config
    logits = np.random.default_rng(4).normal(size=(2, 3, 4))
    labels = np.array([[0, 1, 2, 0], [2, 2, 1, 0]])
    sparse = getattr(loss, "sparse", "Sparse" in type(loss).__name__)
    y_true = labels if sparse else np.eye(3)[labels].swapaxes(1, 2)
    np.testing.assert_array_equal(restored(y_true, logits), loss(y_true, logits))


def test_keras_file_round_trip_keeps_the_loss(tmp_path):
    model = keras.Sequential([keras.Input((3, 2)), keras.layers.Dense(4)])
    model.compile(optimizer="sgd", loss=NON_DEFAULT[0])
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unbuilt optimizer
        restored = keras.models.load_model(path)
    assert type(restored.loss) is SoftmaxCrossEntropy
    assert restored.loss.get_config() == NON_DEFAULT[0].get_config()


@pytest.mark.parametrize(
    "case",
    [
        "categorical",
        pytest.param(
            "sparse_ignore",
            marks=needs_internal("the mask Keras reads from a tensor (`_keras_mask`)"),
        ),
    ],
)
def test_one_xla_training_step_matches_keras(case):
    x = np.random.default_rng(5).normal(size=(8, 4, 3)).astype("float32")
    if case == "categorical":
        y = np.eye(5, dtype="float32")[np.arange(32).reshape(8, 4) % 5]
        ours = CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)
        theirs = keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=0.1
        )
    else:
        y = np.arange(32).reshape(8, 4) % 6 - 1
        ours = SoftmaxCrossEntropy(sparse=True, ignore_class=-1)
        theirs = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, ignore_class=-1
        )
    weights = []
    for loss in [ours, theirs]:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4, 3)), keras.layers.Dense(5)])
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss, jit_compile=True)
        model.train_on_batch(x, y)
        weights.append(model.get_weights())
    for ours_w, theirs_w in zip(*weights):
        np.testing.assert_allclose(ours_w, theirs_w, rtol=1e-5, atol=1e-6)


def test_compiled_model_uses_the_class_weighted_mean():
    x = np.random.default_rng(6).normal(size=(8, 3)).astype("float32")
    y = np.array([0, 1, 2, 3, 0, 0, 1, -1])
    weight = [1.0, 5.0, 0.5, 2.0]
    loss = SoftmaxCrossEntropy(sparse=True, class_weight=weight, ignore_class=-1)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
    model.compile(loss=loss, jit_compile=True)
    logits = model.predict(x, verbose=0)
    expected = torch_weighted_cross_entropy(logits, y, weight, "mean", -1)
    np.testing.assert_allclose(
        model.evaluate(x, y, batch_size=8, verbose=0), expected, rtol=1e-5
    )


@needs_internal("Keras's table of loss names")
def test_compile_by_registered_name_uses_our_loss():
    import keras_bn  # noqa: F401  (registers the names)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 8)]
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss="keras_bn>SoftmaxCrossEntropy")
    loss = model.evaluate(x, y, verbose=0)
    expected = SoftmaxCrossEntropy()(y, model.predict(x, verbose=0))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert isinstance(
        keras.losses.get("keras_bn>SoftmaxCrossEntropy"), SoftmaxCrossEntropy
    )


# Class weights given as a dict, as `Model.fit(class_weight=...)` takes them.


def test_class_weight_dict_is_the_weight_per_class_id():
    logits, _, _, ids, sample_weight = problem(shape=(8, 3), dtype="float64")
    as_dict = SoftmaxCrossEntropy(sparse=True, class_weight={0: 1, 1: 5, 2: 1})
    assert as_dict.class_weight == [1.0, 5.0, 1.0]
    as_list = SoftmaxCrossEntropy(sparse=True, class_weight=[1.0, 5.0, 1.0])
    np.testing.assert_array_equal(as_dict(ids, logits), as_list(ids, logits))
    # Keys in any order; classes below the largest key default to 1.0.
    assert SoftmaxCrossEntropy(class_weight={2: 3, 0: 0.5}).class_weight == [
        0.5,
        1.0,
        3.0,
    ]
    # With "sum", the weights act as Keras's fit turns them into sample weights.
    weights = {0: 0.5, 1: 2.0, 2: 4.0}
    ours = SoftmaxCrossEntropy(sparse=True, class_weight=weights, reduction="sum")
    theirs = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="sum", dtype="float64"
    )
    keras_weights = np.array([weights[int(c)] for c in ids])
    np.testing.assert_allclose(
        ours(ids, logits, sample_weight),
        theirs(ids, logits, sample_weight * keras_weights),
        rtol=1e-6,
    )
    config = as_dict.get_config()
    assert config["class_weight"] == [1.0, 5.0, 1.0]
    restored = keras.saving.deserialize_keras_object(
        json.loads(json.dumps(keras.saving.serialize_keras_object(as_dict)))
    )
    assert restored.class_weight == [1.0, 5.0, 1.0]


def test_class_weight_dict_not_naming_the_last_class_raises():
    loss = SoftmaxCrossEntropy(sparse=True, class_weight={0: 1.0, 1: 5.0})
    with pytest.raises(ValueError, match="2 entries but the logits have 3 classes"):
        loss([0, 2], np.zeros([2, 3], "float32"))


# Class weights whose length is checked only at run time.


def _unknown_class_count_loss(loss, sparse, jit_compile):
    labels = tf.TensorSpec([None] if sparse else [None, None], tf.int32)
    if not sparse:
        labels = tf.TensorSpec([None, None], tf.float32)
    logits = tf.TensorSpec([None, None], tf.float32)

    @tf.function(input_signature=[labels, logits], jit_compile=jit_compile)
    def value_and_gradient(y_true, y_pred):
        with tf.GradientTape() as tape:
            tape.watch(y_pred)
            value = loss(y_true, y_pred)
        return value, tape.gradient(value, y_pred)

    return value_and_gradient


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("entries", [3, 5])
def test_class_weight_length_checked_when_classes_are_known_at_run_time(
    sparse, entries
):
    logits = tf.constant(problem(shape=(6, 4))[0])
    ids = tf.constant([0, 1, 2, 3, 3, 0])
    y_true = ids if sparse else tf.one_hot(ids, 4)
    weight = [1.0, 2.0, 3.0, 4.0, 5.0][:entries]
    loss = SoftmaxCrossEntropy(sparse=sparse, class_weight=weight)
    # In a graph: an error naming `class_weight`.
    graph = _unknown_class_count_loss(loss, sparse, jit_compile=False)
    with pytest.raises(tf.errors.InvalidArgumentError, match="`class_weight` has"):
        graph(y_true, logits)
    # Under XLA, which drops assertions: NaN, never a reused weight.
    value, gradient = _unknown_class_count_loss(loss, sparse, jit_compile=True)(
        y_true, logits
    )
    assert np.isnan(value.numpy())
    assert np.isnan(gradient.numpy()).all()


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_class_weight_of_the_right_length_works_when_known_at_run_time(
    sparse, jit_compile
):
    logits = tf.constant(problem(shape=(6, 4))[0])
    ids = tf.constant([0, 1, 2, 3, 3, 0])
    y_true = ids if sparse else tf.one_hot(ids, 4)
    loss = SoftmaxCrossEntropy(sparse=sparse, class_weight=[1.0, 2.0, 3.0, 4.0])
    value, gradient = _unknown_class_count_loss(loss, sparse, jit_compile)(
        y_true, logits
    )
    expected, expected_gradient = loss_and_grad(loss, y_true, logits)
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-5, atol=1e-7)


# Sample weights broadcast by one rule, with class weights or without.

SAMPLE_WEIGHT_SHAPES = {
    "per_example": (4,),
    "trailing_1": (4, 1),
    "square": (4, 4),  # broadcasts against (4,) losses as NumPy does
    "scalar_like": (1,),
}


@pytest.mark.parametrize("reduction", MEAN_REDUCTIONS + ["sum"])
@pytest.mark.parametrize("shape", list(SAMPLE_WEIGHT_SHAPES))
def test_sample_weight_broadcasts_alike_with_and_without_class_weights(
    reduction, shape
):
    logits, _, onehot, ids, _ = problem(shape=(4, 3), dtype="float64")
    rng = np.random.default_rng(7)
    sw = rng.uniform(0.5, 2.0, size=SAMPLE_WEIGHT_SHAPES[shape])
    kwargs = dict(sparse=True, reduction=reduction, dtype="float64")
    plain = SoftmaxCrossEntropy(**kwargs)(ids, logits, sw)
    unit = SoftmaxCrossEntropy(class_weight=[1, 1, 1], **kwargs)(ids, logits, sw)
    np.testing.assert_allclose(unit, plain, rtol=1e-12)
    keras_loss = keras.losses.CategoricalCrossentropy(
        from_logits=True, reduction=reduction, dtype="float64"
    )
    keras_value = keras_loss(onehot, logits, sw)
    if reduction == "mean_with_sample_weight" and shape == "scalar_like":
        # Keras sums the one weight before broadcasting it over 4 examples.
        np.testing.assert_allclose(plain * 4, keras_value, rtol=1e-12)
    else:
        np.testing.assert_allclose(plain, keras_value, rtol=1e-12)
    # The closed form: NumPy broadcasting of the weights against the losses.
    nll = -np.take_along_axis(log_softmax_np(logits), ids[:, None], -1)[:, 0]
    aligned = sw[:, 0] if sw.shape == (4, 1) else sw
    terms = nll * aligned
    weight = [2.0, 0.5, 1.0]
    weighted = SoftmaxCrossEntropy(class_weight=weight, **kwargs)(ids, logits, sw)
    w = np.broadcast_to(np.asarray(weight)[ids], terms.shape)
    denominator = {
        "sum": 1.0,
        "sum_over_batch_size": np.sum(w),
        "mean": np.sum(w),
        "mean_with_sample_weight": np.sum(w * aligned),
    }[reduction]
    np.testing.assert_allclose(weighted, np.sum(w * terms) / denominator, rtol=1e-12)


def test_square_sample_weight_gives_one_mean_with_unit_class_weights():
    logits, _, _, ids, _ = problem(shape=(4, 3))
    sw = np.ones((4, 4), "float32")
    plain = SoftmaxCrossEntropy(sparse=True)(ids, logits, sw)
    unit = SoftmaxCrossEntropy(sparse=True, class_weight=[1, 1, 1])(ids, logits, sw)
    unweighted = SoftmaxCrossEntropy(sparse=True)(ids, logits)
    np.testing.assert_allclose(unit, plain, rtol=1e-6)
    np.testing.assert_allclose(plain, unweighted, rtol=1e-6)


def test_per_example_weight_on_per_timestep_losses_counts_every_timestep():
    # (B, 1) sample weights on (B, T) losses: each weight covers T terms.
    logits, _, onehot, ids, _ = problem(shape=(3, 4, 5), dtype="float64")
    sw = np.array([[1.0], [2.0], [0.5]])
    nll = -np.take_along_axis(log_softmax_np(logits), ids[..., None], -1)[..., 0]
    expected = np.sum(nll * sw) / np.sum(np.broadcast_to(sw, nll.shape))
    for class_weight in (None, [1.0] * 5):
        loss = SoftmaxCrossEntropy(
            sparse=True,
            class_weight=class_weight,
            reduction="mean_with_sample_weight",
            dtype="float64",
        )
        np.testing.assert_allclose(loss(ids, logits, sw), expected, rtol=1e-12)
    # Keras divides by sum(sw) before broadcasting: T times the weighted mean.
    theirs = keras.losses.CategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight", dtype="float64"
    )(onehot, logits, sw)
    np.testing.assert_allclose(theirs, 4 * expected, rtol=1e-12)
