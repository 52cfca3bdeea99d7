"""keras_bn/_internals.py: each internal is found, and each fallback works.

`KERAS_BN_NO_INTERNALS=1` turns every internal off at import; the slow test
runs part of the suite that way. The fast tests reach the fallbacks in this
process by emptying `_internals.FOUND`, and compare them with the internals.
"""

import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import needs_internal

from keras_bn import _internals
from keras_bn import ops
from keras_bn.layers import Softmax
from keras_bn.losses import CategoricalCrossentropy
from keras_bn.losses import SoftmaxCrossEntropy

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def fallbacks(monkeypatch):
    monkeypatch.setattr(_internals, "FOUND", {})


def test_the_switch_finds_every_internal_or_none():
    """Fails loudly when a new TensorFlow or Keras moves an internal."""
    expected = {
        "could_possibly_record",
        "stop_recording",
        "record_operation",
        "record_operation_forwardprop_only",
        "PossibleTapeGradientTypes",
        "GraphOrParentsInXlaContext",
        "IsMklEnabled",
        "ALL_OBJECTS_DICT",
        "mask_attribute",
        "logits_attribute",
    }
    assert set(_internals.FOUND) == (set() if _internals.NO_INTERNALS else expected)


def _values_and_gradients(x, labels, kernel):
    """Every op family, eagerly: no tape, one tape, and nested tapes."""
    fns = {
        "bn": lambda x: ops.batch_norm_train(x)[0],
        "dense_ce": lambda x: ops.softmax_cross_entropy(ops.softmax(x), x),
        "sparse_ce": lambda x: ops.sparse_softmax_cross_entropy(labels, x),
        "linear_ce": lambda x: ops.linear_softmax_cross_entropy(
            labels, x, kernel, chunk_size=3
        ),
    }
    results = {}
    for name, fn in fns.items():
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                y = fn(x)
                loss = tf.reduce_sum(tf.sin(y))
            first = inner.gradient(loss, x)
            penalty = tf.reduce_sum(first**2)
        with tf.GradientTape() as tape:
            tape.watch(x)
            taped = tf.reduce_sum(tf.sin(fn(x)))
        results[name] = (
            fn(x),
            tape.gradient(taped, x),
            first,
            outer.gradient(penalty, x),
        )
    return results


def test_tape_fallbacks_give_the_same_values_and_gradients(rng, monkeypatch):
    x = tf.constant(rng.normal(size=(12, 7)), tf.float32)
    labels = tf.constant(rng.integers(0, 7, size=12), tf.int32)
    kernel = tf.constant(rng.normal(size=(7, 7)) * 0.3, tf.float32)
    with_internals = _values_and_gradients(x, labels, kernel)
    monkeypatch.setattr(_internals, "FOUND", {})
    assert _internals.gradient_order([x]) == _internals.HIGHER_ORDER
    assert _internals.tape_could_record()
    without = _values_and_gradients(x, labels, kernel)
    for name, results in with_internals.items():
        for ours, theirs in zip(results, without[name]):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("use_fallbacks", [False, True])
def test_xla_fallback_gives_the_same_batch_norm(rng, monkeypatch, use_fallbacks):
    x = tf.constant(rng.normal(size=(16, 5)), tf.float32)

    @tf.function(jit_compile=True)
    def train(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = ops.batch_norm_train(x)[0]
            loss = tf.reduce_sum(tf.sin(y))
        return y, tape.gradient(loss, x), tf.constant(_internals.in_xla_function())

    if use_fallbacks:
        monkeypatch.setattr(_internals, "FOUND", {})
    y, grad, in_xla = train(x)
    assert bool(in_xla) is not (use_fallbacks or _internals.NO_INTERNALS)
    with tf.GradientTape() as tape:  # eager: never XLA
        tape.watch(x)
        want = ops.batch_norm_train(x, fused=False)[0]
        loss = tf.reduce_sum(tf.sin(want))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad, tape.gradient(loss, x), rtol=1e-4, atol=1e-5)


@needs_internal("Keras's table of loss names")
def test_register_loss_names_adds_to_keras_table_only_with_its_internal(
    monkeypatch,
):
    @keras.saving.register_keras_serializable("keras_bn_test")
    class Added(SoftmaxCrossEntropy):
        pass

    @keras.saving.register_keras_serializable("keras_bn_test")
    class NotAdded(SoftmaxCrossEntropy):
        pass

    _internals.register_loss_names([Added])
    assert isinstance(keras.losses.get("keras_bn_test>Added"), Added)
    monkeypatch.setattr(_internals, "FOUND", {})
    _internals.register_loss_names([NotAdded])
    with pytest.raises(ValueError, match="keras_bn_test>NotAdded"):
        keras.losses.get("keras_bn_test>NotAdded")
    # The documented way without it: a config resolves through the registry.
    config = {"class_name": "keras_bn_test>NotAdded", "config": {}}
    assert isinstance(keras.losses.get(config), NotAdded)


def test_tensor_attributes_round_trip_only_with_their_internal(fallbacks):
    x = tf.ones([2, 3])
    mask = tf.constant([True, False])
    assert _internals.keras_mask(_internals.set_keras_mask(x, mask)) is None
    _internals.set_keras_logits(x, x)
    assert _internals.keras_logits(x) is None


@needs_internal("Keras's tensor attributes")
def test_tensor_attributes_are_keras_own():
    """What Keras's softmax records and its loss reduction reads."""
    x = tf.constant([[1.0, 2.0, 0.5]])
    assert _internals.keras_logits(keras.activations.softmax(x)) is x
    mask = tf.constant([True])
    loss = keras.losses.MeanSquaredError(reduction="sum")
    y = _internals.set_keras_mask(tf.constant([[1.0]]), tf.constant([False]))
    assert float(loss(tf.zeros([1, 1]), y)) == 0.0  # Keras read the mask
    assert _internals.keras_mask(_internals.set_keras_mask(x, mask)) is mask


@pytest.mark.parametrize("use_fallbacks", [False, True])
def test_logits_fallback_reads_probabilities_to_the_same_loss(
    rng, monkeypatch, use_fallbacks
):
    """Without the logits behind a softmax, the loss reads its output as
    probabilities: the same values and gradients, up to float32 rounding."""
    logits = tf.constant(rng.normal(size=(6, 5)), tf.float32)
    labels = np.eye(5, dtype="float32")[rng.integers(0, 5, 6)]
    if use_fallbacks:
        monkeypatch.setattr(_internals, "FOUND", {})
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = CategoricalCrossentropy()(labels, Softmax()(logits))
    want = keras.losses.CategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as want_tape:
        want_tape.watch(logits)
        want_loss = want(labels, logits)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(
        tape.gradient(loss, logits),
        want_tape.gradient(want_loss, logits),
        rtol=1e-4,
        atol=1e-6,
    )


@pytest.mark.slow
def test_the_suite_passes_without_internals():
    """The op paths, higher-order gradients and the losses, every internal
    off; the tests of what only an internal gives skip themselves."""
    tests = [
        "tests/test_eager_paths.py",
        "tests/test_higher_order.py",
        "tests/test_internals.py",
        # The large-vocabulary op's column writes under XLA, per token and
        # with the gradients formed in the forward pass.
        "tests/test_linear_cross_entropy.py::test_matches_dense_autodiff_in_float64"
        "[options0-shape1-23-5-xla]",
        "tests/test_linear_cross_entropy_uniform.py::"
        "test_reduced_matches_dense_autodiff_in_float64[options0-shape1-23-5-4-xla]",
        "tests/test_losses.py::test_compile_by_registered_name_uses_our_loss",
        "tests/test_losses.py::test_softmax_outputs_are_replaced_by_their_logits_as_in_keras",
        "tests/test_losses.py::test_one_xla_training_step_matches_keras",
        "tests/test_losses.py::test_keras_file_round_trip_keeps_the_loss",
        "tests/test_losses.py::test_compiled_model_uses_the_class_weighted_mean",
    ]
    env = dict(os.environ, KERAS_BN_NO_INTERNALS="1", TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider"]
        + ["-m", "not slow", "-rs"]
        + tests,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "KERAS_BN_NO_INTERNALS=1 turns this internal off" in result.stdout
