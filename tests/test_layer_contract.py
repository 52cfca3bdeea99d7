"""The layer contract (weights, losses, constraints, masking, serialization)
for every constructor argument of keras_bn.BatchNormalization and Softmax."""

import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import run_layer_contract

import keras_bn

STATS = ["moving_mean", "moving_variance"]
RENORM_STATS = STATS + ["moving_stddev", "renorm_mean", "renorm_stddev"]
GAMMA_BETA = ["gamma", "beta"]
DENSE, SEQUENCE = (8, 3), (4, 5, 3)  # masks: (8,) and (4, 5)


def _case(kwargs, shape=SEQUENCE, trainable=GAMMA_BETA, non_trainable=STATS, **more):
    more.setdefault("mask_axes", (len(shape) - 1,))
    return dict(
        init_kwargs=kwargs,
        input_shape=shape,
        expected_trainable=trainable,
        expected_non_trainable=non_trainable,
        **more,
    )


# Fresh objects per case: a constraint or regularizer is compared by value.
BATCH_NORM_CASES = {
    "defaults": _case({}),
    # Keras's rule: a mask of one axis less broadcasts over the last axis.
    "axis_1": _case({"axis": 1}, shape=(4, 3, 5), mask_axes=(2,)),
    "axis_list": _case({"axis": [1, 3]}, shape=(4, 3, 2, 5), mask_axes=(1, 3)),
    "momentum": _case({"momentum": 0.5}),
    "momentum_none": _case(
        {"momentum": None}, non_trainable=STATS + ["num_batches_tracked"]
    ),
    "epsilon": _case({"epsilon": 0.5}),
    "no_center": _case({"center": False}, trainable=["gamma"]),
    "no_scale": _case({"scale": False}, trainable=["beta"]),
    "no_center_no_scale": _case({"center": False, "scale": False}, trainable=[]),
    "initializers": _case(
        {
            "beta_initializer": keras.initializers.Constant(0.5),
            "gamma_initializer": keras.initializers.Constant(2.0),
            "moving_mean_initializer": keras.initializers.Constant(0.25),
            "moving_variance_initializer": keras.initializers.Constant(4.0),
        },
        expected_initial={
            "beta": 0.5,
            "gamma": 2.0,
            "moving_mean": 0.25,
            "moving_variance": 4.0,
        },
    ),
    "regularizers": _case(
        {
            "beta_regularizer": keras.regularizers.L1(0.3),
            "gamma_regularizer": keras.regularizers.L2(0.1),
        },
        expected_losses={
            "beta": keras.regularizers.L1(0.3),
            "gamma": keras.regularizers.L2(0.1),
        },
    ),
    "gamma_regularizer": _case(
        {"gamma_regularizer": "l2"}, expected_losses={"gamma": keras.regularizers.L2()}
    ),
    "beta_regularizer": _case(
        {"beta_regularizer": "l1"}, expected_losses={"beta": keras.regularizers.L1()}
    ),
    "constraints": _case(
        {
            "beta_constraint": keras.constraints.NonNeg(),
            "gamma_constraint": keras.constraints.MaxNorm(0.5),
        },
        expected_constraints={
            "beta": keras.constraints.NonNeg(),
            "gamma": keras.constraints.MaxNorm(0.5),
        },
    ),
    "gamma_constraint": _case(
        {"gamma_constraint": "non_neg"},
        expected_constraints={"gamma": keras.constraints.NonNeg()},
    ),
    "beta_constraint": _case(
        {"beta_constraint": "non_neg"},
        expected_constraints={"beta": keras.constraints.NonNeg()},
    ),
    "renorm": _case(
        {
            "renorm": True,
            "renorm_clipping": {"rmax": 1.5, "rmin": 0.5, "dmax": 0.5},
            "renorm_momentum": 0.5,
            "moving_variance_initializer": keras.initializers.Constant(4.0),
        },
        non_trainable=RENORM_STATS,
        expected_initial={"moving_stddev": 2.0, "renorm_stddev": 2.0},
    ),
    "synchronized": _case({"synchronized": True}),
    "keep_nonfinite_updates": _case({"skip_nonfinite_updates": False}),
    "fused": _case({"fused": True}, shape=(4, 3, 3, 2), mask_axes=None),
    "not_fused": _case({"fused": False}),
    "virtual_batch_size": _case({"virtual_batch_size": 2}, mask_axes=None),
    "virtual_batch_grouping": _case(
        {"virtual_batch_size": 2, "virtual_batch_grouping": "consecutive"},
        mask_axes=None,
    ),
    "unbiased_variance": _case({"moving_variance_estimator": "unbiased"}),
    "float64": _case({"dtype": "float64"}),
    "mixed_float16": _case({"dtype": "mixed_float16"}, shape=DENSE),
    "frozen": _case(
        {"trainable": False, "name": "frozen_bn"},
        trainable=[],
        non_trainable=GAMMA_BETA + STATS,
    ),
}

SOFTMAX_CASES = {
    "defaults": dict(init_kwargs={}, input_shape=(2, 3, 4)),
    "axis_1": dict(init_kwargs={"axis": 1}, input_shape=(2, 3, 4)),
    "axis_list": dict(init_kwargs={"axis": [1, 2]}, input_shape=(2, 3, 4)),
    "float64": dict(init_kwargs={"dtype": "float64"}, input_shape=(2, 5)),
}


@pytest.mark.parametrize("case", list(BATCH_NORM_CASES))
def test_batch_normalization_contract(case, tmp_path):
    run_layer_contract(
        keras_bn.BatchNormalization, tmp_path=tmp_path, **BATCH_NORM_CASES[case]
    )


@pytest.mark.parametrize("case", list(SOFTMAX_CASES))
def test_softmax_contract(case, tmp_path):
    # Softmax masks broadcast against the inputs: a full-shape mask.
    run_layer_contract(
        keras_bn.Softmax,
        expected_trainable=[],
        expected_non_trainable=[],
        tmp_path=tmp_path,
        mask_axes=(),
        **SOFTMAX_CASES[case],
    )


def _arguments(layer_cls):
    parameters = inspect.signature(layer_cls.__init__).parameters
    return {name for name in parameters if name not in ("self", "kwargs")}


@pytest.mark.parametrize(
    "layer_cls,cases",
    [
        (keras_bn.BatchNormalization, BATCH_NORM_CASES),
        (keras_bn.Softmax, SOFTMAX_CASES),
    ],
)
def test_every_constructor_argument_has_a_contract_case(layer_cls, cases):
    covered = set().union(*(case["init_kwargs"] for case in cases.values()))
    assert _arguments(layer_cls) <= covered, _arguments(layer_cls) - covered


# Arguments that the contract cannot see (they change numbers, not weights):
# one training step from equal weights must come out different from the
# default layer's, so an argument dropped on the way to the ops fails here.
EFFECT_CASES = {
    "axis": ({"axis": 1}, {"axis": -1}),
    "momentum": ({"momentum": 0.5}, {}),
    "momentum_none": ({"momentum": None}, {}),
    "epsilon": ({"epsilon": 0.5}, {}),
    "renorm_clipping": (
        {"renorm": True, "renorm_clipping": {"rmax": 1.01, "rmin": 0.99}},
        {"renorm": True},
    ),
    "renorm_momentum": ({"renorm": True, "renorm_momentum": 0.5}, {"renorm": True}),
    "virtual_batch_size": ({"virtual_batch_size": 2}, {}),
    "virtual_batch_grouping": (
        {"virtual_batch_size": 2, "virtual_batch_grouping": "consecutive"},
        {"virtual_batch_size": 2},
    ),
    "moving_variance_estimator": ({"moving_variance_estimator": "unbiased"}, {}),
}


def _one_step(kwargs, x, initial):
    layer = keras_bn.BatchNormalization(**kwargs)
    layer.build(x.shape)
    for w in layer.weights:
        if w.name in initial:
            w.assign(initial[w.name])
    y = layer(x, training=True)
    return [y.numpy()] + [w.numpy() for w in layer.weights]


@pytest.mark.parametrize("case", list(EFFECT_CASES))
def test_each_numeric_argument_changes_the_training_step(case, rng):
    kwargs, baseline = EFFECT_CASES[case]
    x = tf.constant(rng.normal(2.0, 3.0, size=(8, 3, 3)), tf.float32)
    # Renorm statistics away from the batch's, so that r and d are not 1, 0.
    initial = {"renorm_mean": np.full(3, 5.0), "renorm_stddev": np.full(3, 0.5)}
    ours = _one_step(kwargs, x, initial)
    base = _one_step(baseline, x, initial)
    assert len(ours) == len(base) or case == "momentum_none"
    assert any(not np.allclose(a, b) for a, b in zip(ours, base)), case


def test_skip_nonfinite_updates_and_synchronized_effects(rng):
    x = rng.normal(size=(8, 3)).astype("float32")
    x[0, 1] = np.nan
    keep = keras_bn.BatchNormalization(skip_nonfinite_updates=False)
    skip = keras_bn.BatchNormalization()
    keep(x, training=True)
    skip(x, training=True)
    assert np.isnan(keep.moving_mean.numpy()[1])
    assert skip.moving_mean.numpy()[1] == 0.0
    # Outside a tf.distribute strategy `synchronized` has no effect.
    x = rng.normal(size=(8, 3)).astype("float32")
    outputs = [
        keras_bn.BatchNormalization(synchronized=s)(x, training=True)
        for s in (False, True)
    ]
    np.testing.assert_array_equal(*outputs)


@pytest.mark.parametrize("fused", [True, False])
def test_fused_argument_selects_the_kernels(fused):
    layer = keras_bn.BatchNormalization(fused=fused)
    x = tf.ones([4, 3, 3, 2])
    graph = tf.function(lambda x: layer(x, training=True)).get_concrete_function(x)
    types = {op.type for op in graph.graph.get_operations()}
    assert ("FusedBatchNormV3" in types) == fused
