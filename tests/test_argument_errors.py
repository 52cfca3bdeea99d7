"""Bad arguments raise in the constructor, naming the argument; ragged and
sparse inputs raise saying so; a failed call changes no state."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import compiled

import keras_bn
from keras_bn import ops
from keras_bn.losses import CategoricalCrossentropy
from keras_bn.losses import SoftmaxCrossEntropy
from keras_bn.losses import SparseCategoricalCrossentropy

BATCH_NORM_ERRORS = [
    ({"axis": "1"}, TypeError, r"`axis` must be an int or a non-empty list"),
    ({"axis": 1.5}, TypeError, r"`axis` must be an int or a non-empty list"),
    ({"axis": [1, 1.0]}, TypeError, r"`axis` must be an int or a non-empty list"),
    ({"axis": True}, TypeError, r"`axis` must be an int"),
    ({"axis": [1, 1]}, ValueError, r"`axis` repeats an axis.*axis=\[1, 1\]"),
    ({"axis": (-1, -1)}, ValueError, r"`axis` repeats an axis"),
    ({"epsilon": "1e-3"}, TypeError, r"`epsilon` must be a float > 0.*str"),
    ({"epsilon": None}, TypeError, r"`epsilon` must be a float > 0"),
    ({"epsilon": [1e-3]}, TypeError, r"`epsilon` must be a float > 0"),
    ({"epsilon": np.inf}, ValueError, r"`epsilon` must be > 0 and finite.*inf"),
    ({"epsilon": np.nan}, ValueError, r"`epsilon` must be > 0 and finite"),
    ({"momentum": "0.9"}, TypeError, r"`momentum` must be a float in \[0, 1\]"),
    ({"renorm_momentum": "0.9"}, TypeError, r"`renorm_momentum` must be a float"),
    ({"center": "False"}, TypeError, r"`center` must be True or False.*'False'"),
    ({"scale": "no"}, TypeError, r"`scale` must be True or False"),
    ({"scale": 0}, TypeError, r"`scale` must be True or False"),
    ({"renorm": "True"}, TypeError, r"`renorm` must be True or False"),
    ({"synchronized": "yes"}, TypeError, r"`synchronized` must be True or False"),
    (
        {"skip_nonfinite_updates": "False"},
        TypeError,
        r"`skip_nonfinite_updates` must be True or False",
    ),
    (
        {"renorm": True, "renorm_clipping": {"rmax": "2"}},
        TypeError,
        r"`renorm_clipping` must map 'rmax' to a float or None",
    ),
    (
        {"renorm": True, "renorm_clipping": {"dmax": [0.5]}},
        TypeError,
        r"`renorm_clipping` must map 'dmax' to a float or None",
    ),
    (
        {"renorm": True, "renorm_clipping": {"rmin": True}},
        TypeError,
        r"`renorm_clipping` must map 'rmin'",
    ),
    (
        {"renorm": True, "renorm_clipping": {"rmax": np.nan}},
        ValueError,
        r"`renorm_clipping` maps 'rmax' to NaN",
    ),
]


@pytest.mark.parametrize("kwargs,error,match", BATCH_NORM_ERRORS)
def test_batch_normalization_constructor_raises(kwargs, error, match):
    with pytest.raises(error, match=match):
        keras_bn.BatchNormalization(**kwargs)


@pytest.mark.parametrize(
    "axis,error,match",
    [
        (1.5, TypeError, r"`axis` must be an int"),
        ("1", TypeError, r"`axis` must be an int"),
        ([1, "2"], TypeError, r"`axis` must be an int"),
        ([1, 1], ValueError, r"`axis` repeats an axis"),
    ],
)
def test_softmax_constructor_raises(axis, error, match):
    with pytest.raises(error, match=match):
        keras_bn.Softmax(axis=axis)


LOSS_ERRORS = [
    (SoftmaxCrossEntropy, {"label_smoothing": "0.1"}, TypeError, "label_smoothing"),
    (SoftmaxCrossEntropy, {"label_smoothing": None}, TypeError, "label_smoothing"),
    (CategoricalCrossentropy, {"label_smoothing": "a"}, TypeError, "label_smoothing"),
    (CategoricalCrossentropy, {"label_smoothing": True}, TypeError, "label_smoothing"),
    (SoftmaxCrossEntropy, {"sparse": "False"}, TypeError, "`sparse` must be True"),
    (CategoricalCrossentropy, {"from_logits": "False"}, TypeError, "`from_logits`"),
    (SparseCategoricalCrossentropy, {"from_logits": "no"}, TypeError, "`from_logits`"),
    (SoftmaxCrossEntropy, {"class_weight": "123"}, TypeError, "`class_weight`"),
    (SoftmaxCrossEntropy, {"class_weight": {1.0, 2.0}}, TypeError, "`class_weight`"),
    (SoftmaxCrossEntropy, {"class_weight": [1, "2"]}, TypeError, "`class_weight`"),
    (SoftmaxCrossEntropy, {"class_weight": [[1, 2]]}, TypeError, "`class_weight`"),
    (SoftmaxCrossEntropy, {"class_weight": {"0": 1}}, TypeError, "int class ids"),
    (SoftmaxCrossEntropy, {"class_weight": {-1: 1}}, ValueError, "class ids >= 0"),
    (SoftmaxCrossEntropy, {"class_weight": {}}, ValueError, "at least one class"),
    (SoftmaxCrossEntropy, {"class_weight": {0: -1}}, ValueError, "non-negative"),
]


@pytest.mark.parametrize("loss_cls,kwargs,error,match", LOSS_ERRORS)
def test_loss_constructor_raises(loss_cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        loss_cls(**kwargs)


def test_numbers_of_numpy_types_are_still_accepted():
    layer = keras_bn.BatchNormalization(
        axis=np.int64(1),
        momentum=np.float32(0.5),
        epsilon=np.float64(1e-2),
        center=np.bool_(False),
        renorm=True,
        renorm_clipping={"rmax": np.float32(2.0), "rmin": 0, "dmax": None},
    )
    assert layer.axis == 1 and layer.center is False and layer.epsilon == 1e-2
    assert layer.renorm_clipping == {"rmax": 2.0, "rmin": 0.0, "dmax": None}
    assert keras_bn.BatchNormalization(axis=(1, -1)).axis == [1, -1]
    loss = SoftmaxCrossEntropy(label_smoothing=np.float32(0.25), sparse=np.bool_(1))
    assert loss.label_smoothing == 0.25 and loss.sparse is True


# Ragged and sparse inputs.

RAGGED = tf.ragged.constant([[[1.0, 2.0]], [[3.0, 4.0], [5.0, 6.0]]], ragged_rank=1)
SPARSE = tf.sparse.from_dense(tf.eye(4, 3))


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("value", [RAGGED, SPARSE], ids=["ragged", "sparse"])
def test_batch_normalization_refuses_ragged_and_sparse_inputs(rng, mode, value):
    kind = "ragged" if isinstance(value, tf.RaggedTensor) else "sparse"
    layer = keras_bn.BatchNormalization(momentum=0.5)
    call = compiled(lambda x: layer(x, training=True), mode)
    with pytest.raises(ValueError, match=f"does not support {kind} inputs"):
        call(value)
    assert not layer.built  # refused before building from a ragged shape
    layer(rng.normal(size=(4, 2)).astype("float32"), training=True)
    before = [w.numpy() for w in layer.weights]
    with pytest.raises(ValueError, match=f"`inputs` is a {kind} tensor"):
        call(value)
    for w, value_before in zip(layer.weights, before):
        np.testing.assert_array_equal(w.numpy(), value_before)


def test_ragged_mask_and_symbolic_ragged_input_are_refused():
    layer = keras_bn.BatchNormalization()
    x = tf.ones([2, 3, 4])
    mask = tf.ragged.constant([[True, True, False], [True, False, True]])
    with pytest.raises(ValueError, match=r"`mask` is a ragged tensor"):
        layer(x, training=True, mask=mask)
    inputs = keras.Input((None, 2), ragged=True)
    for candidate in (keras_bn.BatchNormalization(), keras_bn.Softmax()):
        with pytest.raises(ValueError, match="does not support ragged inputs"):
            candidate(inputs)
    # Keras's own layers take ragged inputs: this is a difference.
    keras.layers.BatchNormalization()(RAGGED, training=True)


def test_softmax_refuses_ragged_inputs():
    with pytest.raises(ValueError, match="Softmax does not support ragged inputs"):
        keras_bn.Softmax()(tf.ragged.constant([[1.0, 2.0], [3.0]]))


@pytest.mark.parametrize(
    "loss",
    [SoftmaxCrossEntropy(), CategoricalCrossentropy(), SparseCategoricalCrossentropy()],
    ids=lambda loss: type(loss).__name__,
)
@pytest.mark.parametrize("argument", ["y_true", "y_pred", "sample_weight"])
def test_losses_refuse_ragged_arguments(loss, argument):
    ragged = tf.ragged.constant([[0.5, 0.5], [1.0]])
    dense = {"y_true": tf.eye(2), "y_pred": tf.eye(2), "sample_weight": None}
    if "Sparse" in type(loss).__name__:
        dense["y_true"] = tf.constant([0, 1])
    dense[argument] = ragged
    with pytest.raises(ValueError, match=f"`{argument}` is a ragged tensor"):
        loss(dense["y_true"], dense["y_pred"], sample_weight=dense["sample_weight"])


# Initializers that renorm copies.


class _TwiceOnes(keras.initializers.Initializer):
    """Not registered for serialization."""

    def __call__(self, shape, dtype=None):
        return 2.0 * tf.ones(shape, dtype)


def _four(shape, dtype=None):
    return tf.fill(shape, tf.constant(4.0, dtype))


@pytest.mark.parametrize("initializer", [_TwiceOnes(), _four], ids=["class", "fn"])
def test_renorm_builds_with_unregistered_or_function_initializers(rng, initializer):
    values = {}
    for layer_cls in (keras_bn.BatchNormalization, keras.layers.BatchNormalization):
        layer = layer_cls(renorm=True, moving_variance_initializer=initializer)
        layer.build((None, 3))
        values[layer_cls] = {w.name: w.numpy() for w in layer.weights}
    ours, theirs = values.values()
    variance = ours["moving_variance"]
    np.testing.assert_allclose(ours["moving_stddev"], np.sqrt(variance), rtol=1e-6)
    np.testing.assert_allclose(ours["renorm_stddev"], np.sqrt(variance), rtol=1e-6)
    assert variance[0] in (2.0, 4.0)
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)


def test_renorm_copies_an_unseeded_random_initializer_as_keras_does():
    layer = keras_bn.BatchNormalization(
        renorm=True,
        moving_mean_initializer=keras.initializers.RandomUniform(1.0, 2.0),
        moving_variance_initializer=keras.initializers.RandomUniform(1.0, 2.0),
    )
    layer.build((None, 64))
    by_name = {w.name: w.numpy() for w in layer.weights}
    # Fresh draws for the copies, within the initializer's range.
    assert not np.array_equal(by_name["renorm_mean"], by_name["moving_mean"])
    assert not np.allclose(by_name["moving_stddev"] ** 2, by_name["moving_variance"])
    assert np.all(
        (by_name["moving_stddev"] >= 1.0) & (by_name["moving_stddev"] <= 2**0.5)
    )


OP_ERRORS = [
    (lambda: ops.batch_norm_train(tf.ones([4, 3]), axis=1.5), TypeError, "`axis`"),
    (lambda: ops.batch_norm_train(tf.ones([4, 3]), axis="1"), TypeError, "`axis`"),
    (lambda: ops.batch_norm_train(tf.ones([4, 3]), axis=[True]), TypeError, "`axis`"),
    (lambda: ops.softmax(tf.ones([4, 3]), axis=1.5), TypeError, "`axis`"),
    (
        lambda: ops.batch_norm_train(tf.ones([4, 3]), epsilon="abc"),
        TypeError,
        "`epsilon`",
    ),
    (
        lambda: ops.batch_norm_train(tf.ones([4, 3]), epsilon=float("inf")),
        ValueError,
        "`epsilon`",
    ),
    (
        lambda: ops.batch_norm_inference(
            tf.ones([4, 3]), tf.zeros([3]), tf.ones([3]), epsilon="1e-3"
        ),
        TypeError,
        "`epsilon`",
    ),
    (
        lambda: ops.softmax_cross_entropy(
            tf.ones([2, 3]), tf.ones([2, 3]), label_smoothing="0.1"
        ),
        TypeError,
        "`label_smoothing`",
    ),
    (
        lambda: ops.probability_cross_entropy(
            tf.ones([2, 3]), tf.ones([2, 3]), epsilon="x"
        ),
        TypeError,
        "`epsilon`",
    ),
    (
        lambda: ops.batch_norm_train(tf.ones([4, 3]), fused="yes"),
        TypeError,
        "`fused` must be None, True or False",
    ),
    (
        lambda: ops.batch_norm_inference(
            tf.ones([4, 3]), tf.zeros([3]), tf.ones([3]), fused=1
        ),
        TypeError,
        "`fused` must be None, True or False",
    ),
    (
        lambda: ops.batch_norm_inference(
            tf.ones([4, 3]), tf.zeros([3]), tf.ones([3]), statistics_gradients=0
        ),
        TypeError,
        "`statistics_gradients` must be True or False",
    ),
    (
        lambda: ops.batch_norm_train(tf.ones([4, 3]), synchronized="no"),
        TypeError,
        "`synchronized` must be True or False",
    ),
    (
        lambda: ops.batch_renorm_train(
            tf.ones([4, 3]), None, None, tf.zeros([3]), tf.ones([3]), rmin=-1.0
        ),
        ValueError,
        "`renorm_clipping`: rmin should be non-negative",
    ),
    (
        lambda: ops.sparse_softmax_cross_entropy(
            [0, 1], tf.ones([2, 3]), ignore_class=1.0
        ),
        TypeError,
        "`ignore_class` must be an int or None",
    ),
    (
        lambda: ops.sparse_probability_cross_entropy(
            [0, 1], tf.ones([2, 3]) / 3, ignore_class="1"
        ),
        TypeError,
        "`ignore_class` must be an int or None",
    ),
]


@pytest.mark.parametrize("call,error,match", OP_ERRORS)
def test_ops_reject_arguments_of_the_wrong_type(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_ops_accept_numpy_integers_as_axes():
    x = tf.random.normal([4, 3])
    np.testing.assert_array_equal(
        ops.batch_norm_train(x, axis=np.int64(-1))[0], ops.batch_norm_train(x)[0]
    )
    np.testing.assert_array_equal(
        ops.softmax(x, axis=[np.int32(1)]), ops.softmax(x, axis=1)
    )


def _counting(monkeypatch, module, name):
    """Replaces `module.name` by a wrapper; returns the list of its calls."""
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_layers_and_losses_check_their_arguments_once_not_per_call(monkeypatch):
    from keras_bn.ops import batch_norm
    from keras_bn.ops import cross_entropy
    from keras_bn.ops import softmax_ops

    layer = keras_bn.BatchNormalization(epsilon=1e-2, fused=False)
    renorm = keras_bn.BatchNormalization(renorm=True, renorm_clipping={"rmax": 2.0})
    loss = SoftmaxCrossEntropy(label_smoothing=0.1)
    sparse = SparseCategoricalCrossentropy(from_logits=True, ignore_class=0)
    softmax = keras_bn.Softmax(axis=-1)
    spies = [
        _counting(monkeypatch, batch_norm, name)
        for name in ("check_epsilon", "check_optional_bool", "check_renorm_clipping")
    ] + [
        _counting(monkeypatch, cross_entropy, name)
        for name in ("check_axis", "check_label_smoothing", "check_optional_int")
    ]
    spies.append(_counting(monkeypatch, softmax_ops, "check_axis"))
    x = tf.random.normal([8, 3])
    for training in (True, False):
        layer(x, training=training)
        renorm(x, training=training)
    loss(tf.one_hot([0, 1, 2, 0, 1, 2, 0, 1], 3), x)
    sparse(tf.constant([0, 1, 2, 0, 1, 2, 0, 1]), x)
    softmax(x)
    assert [len(calls) for calls in spies] == [0] * len(spies)
    # The public ops check theirs on every call (the spies see them).
    ops.batch_norm_train(x, epsilon=1e-2)
    ops.sparse_softmax_cross_entropy([0, 1], x[:2], ignore_class=0)
    ops.softmax(x)
    assert [len(calls) for calls in spies] == [1, 1, 0, 1, 1, 1, 1]


def test_ops_accept_numpy_integers_as_ignore_class():
    logits = tf.random.normal([4, 3])
    labels = tf.constant([0, 1, 2, 1])
    np.testing.assert_array_equal(
        ops.sparse_softmax_cross_entropy(labels, logits, ignore_class=np.int64(1)),
        ops.sparse_softmax_cross_entropy(labels, logits, ignore_class=1),
    )
    loss = SoftmaxCrossEntropy(sparse=True, ignore_class=np.int32(1))
    assert type(loss.get_config()["ignore_class"]) is int
