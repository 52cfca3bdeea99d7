"""Tests of keras_bn.callbacks.ActivationStatistics."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_bn
from keras_bn.callbacks import ActivationStatistics

N_EXAMPLES = 48
BATCH_SIZE = 8  # 6 steps per epoch


def make_data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N_EXAMPLES, 5)).astype("float32")
    y = rng.integers(0, 3, size=N_EXAMPLES)
    return x, y


def make_model(use_bn=False):
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(4, name="dense")(inputs)
    if use_bn:
        hidden = keras_bn.BatchNormalization(name="bn")(hidden)
    hidden = keras.layers.Activation("sigmoid", name="sigmoid")(hidden)
    outputs = keras.layers.Dense(3, name="logits")(hidden)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def fit(model, callback, epochs=1, seed=0):
    x, y = make_data(seed)
    model.fit(
        x,
        y,
        batch_size=BATCH_SIZE,
        epochs=epochs,
        shuffle=False,
        callbacks=[callback] if callback else [],
        verbose=0,
    )


def sigmoid_input(model, x):
    """The sigmoid's input, from the Dense weights, in NumPy."""
    kernel, bias = (np.asarray(w) for w in model.get_layer("dense").get_weights())
    return x @ kernel + bias


@pytest.mark.parametrize(
    "epochs, every_n_steps, expected_steps",
    [
        (1, 2, [0, 2, 4, 6]),
        (1, 4, [0, 4]),
        (2, 5, [0, 5, 10]),
        (1, 1, [0, 1, 2, 3, 4, 5, 6]),
    ],
)
def test_records_one_row_per_recording_step(epochs, every_n_steps, expected_steps):
    x, _ = make_data()
    stats = ActivationStatistics(["sigmoid"], x[:16], every_n_steps=every_n_steps)
    fit(make_model(), stats, epochs=epochs)
    np.testing.assert_array_equal(stats.steps, expected_steps)
    assert stats.percentiles["sigmoid"].shape == (len(expected_steps), 3)


def test_records_continue_across_fit_calls():
    x, _ = make_data()
    model = make_model()
    stats = ActivationStatistics(["sigmoid"], x[:16], every_n_steps=3)
    fit(model, stats)
    fit(model, stats)
    np.testing.assert_array_equal(stats.steps, [0, 3, 6, 9, 12])


@pytest.mark.parametrize("feature_index", [None, 2, -1])
def test_values_match_numpy_percentiles_of_the_layer_input(feature_index):
    x, _ = make_data()
    probe = x[:16]
    model = make_model()
    levels = (10, 50, 90)
    expected_first = sigmoid_input(model, probe)
    stats = ActivationStatistics(
        ["sigmoid"],
        probe,
        percentiles=levels,
        every_n_steps=3,
        feature_index=feature_index,
    )
    fit(model, stats)  # 6 steps: the last record is after the last step
    expected_last = sigmoid_input(model, probe)
    if feature_index is not None:
        expected_first = expected_first[:, feature_index]
        expected_last = expected_last[:, feature_index]
    recorded = stats.percentiles["sigmoid"]
    np.testing.assert_allclose(
        recorded[0], np.percentile(expected_first, levels), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        recorded[-1], np.percentile(expected_last, levels), rtol=1e-5, atol=1e-6
    )
    assert not np.allclose(recorded[0], recorded[-1])


def test_accepts_layer_objects_and_several_layers():
    x, _ = make_data()
    model = make_model(use_bn=True)
    stats = ActivationStatistics(
        [model.get_layer("bn"), "sigmoid"], x[:16], every_n_steps=6
    )
    fit(model, stats)
    assert set(stats.percentiles) == {"bn", "sigmoid"}
    # The BN layer's input is the Dense output, which also feeds nothing else.
    np.testing.assert_allclose(
        stats.percentiles["bn"][-1],
        np.percentile(sigmoid_input(model, x[:16]), (15, 50, 85)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_probing_leaves_training_unchanged():
    """The probe runs in inference mode: BN's moving statistics are untouched."""
    weights = []
    for callback_on in (False, True):
        keras.utils.set_random_seed(0)
        model = make_model(use_bn=True)
        x, _ = make_data()
        stats = ActivationStatistics(["sigmoid"], x[-16:] * 10.0, every_n_steps=1)
        fit(model, stats if callback_on else None)
        weights.append(model.get_weights())
    for without, with_probe in zip(*weights):
        np.testing.assert_array_equal(without, with_probe)


@pytest.mark.parametrize(
    "kwargs, error, argument",
    [
        ({"layers": []}, ValueError, "layers"),
        ({"layers": [3]}, TypeError, "layers"),
        ({"layers": 3}, TypeError, "layers"),
        ({"layers": ["sigmoid", "sigmoid"]}, ValueError, "layers"),
        ({"probe_data": None}, TypeError, "probe_data"),
        ({"probe_data": [[1.0, 2.0], [3.0, 4.0]]}, TypeError, "probe_data"),
        ({"probe_data": np.float32(1.0)}, TypeError, "probe_data"),
        ({"probe_data": np.zeros((0, 5))}, ValueError, "probe_data"),
        ({"probe_data": [np.zeros((4, 5)), np.zeros(0)]}, ValueError, "probe_data"),
        ({"percentiles": []}, ValueError, "percentiles"),
        ({"percentiles": [15, 101]}, ValueError, "percentiles"),
        ({"percentiles": [-1]}, ValueError, "percentiles"),
        ({"percentiles": ["median"]}, TypeError, "percentiles"),
        ({"percentiles": ["50"]}, TypeError, "percentiles"),
        ({"percentiles": 50}, TypeError, "percentiles"),
        ({"every_n_steps": 0}, ValueError, "every_n_steps"),
        ({"every_n_steps": 2.5}, TypeError, "every_n_steps"),
        ({"every_n_steps": True}, TypeError, "every_n_steps"),
        ({"feature_index": 1.0}, TypeError, "feature_index"),
    ],
)
def test_bad_arguments_raise_errors_naming_them(kwargs, error, argument):
    """A wrong type raises a TypeError, a wrong value a ValueError."""
    arguments = {"layers": ["sigmoid"], "probe_data": np.zeros((4, 5))}
    arguments.update(kwargs)
    with pytest.raises(error, match=f"Argument `{argument}` must"):
        ActivationStatistics(**arguments)


def test_good_arguments_are_normalized():
    stats = ActivationStatistics(
        "sigmoid",
        {"x": tf.zeros((2, 5))},
        percentiles=np.array([50]),
        every_n_steps=np.int64(3),
        feature_index=np.int32(-1),
    )
    assert stats.layer_refs == ["sigmoid"]
    assert isinstance(stats.probe_data["x"], np.ndarray)
    assert stats.percentile_levels == (50.0,)
    assert type(stats.every_n_steps) is int and stats.every_n_steps == 3
    assert type(stats.feature_index) is int and stats.feature_index == -1


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"layers": ["no_such_layer"]}, "layers"),
        ({"feature_index": 4}, "feature_index"),
    ],
)
def test_arguments_that_do_not_fit_the_model_raise_at_fit(kwargs, argument):
    arguments = {"layers": ["sigmoid"], "probe_data": make_data()[0][:4]}
    arguments.update(kwargs)
    stats = ActivationStatistics(**arguments)
    with pytest.raises(ValueError, match=f"`{argument}`"):
        fit(make_model(), stats)


def test_subclassed_model_raises_a_clear_error():
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3, name="dense")

        def call(self, inputs):
            return self.dense(inputs)

    model = Subclassed()
    model.compile(optimizer="sgd", loss="mse")
    stats = ActivationStatistics(["dense"], np.zeros((4, 5)))
    with pytest.raises(ValueError, match="functional or Sequential"):
        model.fit(np.zeros((8, 5)), np.zeros((8, 3)), callbacks=[stats], verbose=0)


def test_plot_writes_a_png(tmp_path):
    x, _ = make_data()
    stats = ActivationStatistics(["dense", "sigmoid"], x[:16], every_n_steps=2)
    fit(make_model(), stats)
    path = tmp_path / "percentiles.png"
    assert stats.plot(path) == path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_before_fit_raises(tmp_path):
    stats = ActivationStatistics(["sigmoid"], np.zeros((4, 5)))
    with pytest.raises(RuntimeError, match="Nothing recorded"):
        stats.plot(tmp_path / "empty.png")


def test_plot_draws_on_given_axes():
    from matplotlib.figure import Figure

    x, _ = make_data()
    stats = ActivationStatistics(["sigmoid"], x[:16], every_n_steps=2)
    fit(make_model(), stats)
    ax = Figure().subplots()
    assert stats.plot(ax, layer="sigmoid") is ax
    assert len(ax.get_lines()) == 3
    np.testing.assert_array_equal(ax.get_lines()[0].get_xdata(), stats.steps)
    with pytest.raises(ValueError, match="`layer`"):
        stats.plot(ax, layer="dense")


def test_config_round_trip():
    stats = ActivationStatistics(
        ["sigmoid"], np.arange(10.0).reshape(5, 2), every_n_steps=7, feature_index=1
    )
    config = stats.get_config()
    restored = ActivationStatistics.from_config(config)
    assert restored.layer_names == ["sigmoid"]
    assert restored.every_n_steps == 7
    assert restored.feature_index == 1
    assert restored.percentile_levels == (15.0, 50.0, 85.0)
    np.testing.assert_array_equal(restored.probe_data, stats.probe_data)
    assert (
        keras.saving.get_registered_name(ActivationStatistics)
        == "keras_bn>ActivationStatistics"
    )
    as_json = json.dumps(keras.saving.serialize_keras_object(stats))
    from_json = keras.saving.deserialize_keras_object(json.loads(as_json))
    assert isinstance(from_json, ActivationStatistics)
    assert from_json.get_config() == config
