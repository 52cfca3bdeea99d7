"""Shared test code: independent references (NumPy closed forms, TF
autodiff), the inputs and models several test files use, and the layer
contract."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_bn


def needs_internal(what):
    """Skips a test of what only an internal gives (`what`, for the reason)
    when `KERAS_BN_NO_INTERNALS=1` turns the internals off."""
    from keras_bn import _internals

    return pytest.mark.skipif(
        _internals.NO_INTERNALS,
        reason=f"{what}: KERAS_BN_NO_INTERNALS=1 turns this internal off",
    )


def forward_mode_in(fn, mode):
    """`compiled(fn, mode)`, for an `fn` that runs a forward accumulator.
    Without the internal that records the ops' own JVPs in a graph, a traced
    `fn` raises a clear error: checked here, and the test then skips."""
    from keras_bn import _internals

    traced = compiled(fn, mode)
    if mode == "eager" or _internals.can_record_for_forward_accumulators():
        return traced

    def refused(*args, **kwargs):
        # A LookupError, which tracing wraps in a StagingError.
        with pytest.raises(Exception, match="forward mode .* needs TensorFlow's"):
            traced(*args, **kwargs)
        pytest.skip("forward mode in a tf.function: refused without its internal")

    return refused


EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
MODES = ("eager", "function", "xla")

# Small inputs and no downloaded weights keep these fast. The nets end in
# logits: a softmax would saturate and hide differences.
_SMALL = dict(weights=None, input_shape=(32, 32, 3), classes=10)
APPLICATIONS = {
    "MobileNetV2": lambda: keras.applications.MobileNetV2(
        alpha=0.35, classifier_activation=None, **_SMALL
    ),
    "ResNet50": lambda: keras.applications.ResNet50(
        classifier_activation=None, **_SMALL
    ),
    "EfficientNetV2B0": lambda: keras.applications.EfficientNetV2B0(
        classifier_activation=None, **_SMALL
    ),
}


def assert_as_close_as_float32_allows(name, model, copy, x):
    """`copy` predicts `model`'s float64 result as well as `model` does.

    The reference is APPLICATIONS[name] built in float64 with `model`'s
    weights. Through a hundred layers, float32 rounding alone moves `model`'s
    logits by 1e-7 to 3e-5 of their size, depending on the random weights;
    a folded or converted copy rounds differently but no worse (measured: at
    most 2.1 times `model`'s error over 18 nets and seeds). A wrong epsilon or
    a lost statistic costs far more.
    """
    keras.config.set_dtype_policy("float64")
    try:
        reference = APPLICATIONS[name]()
    finally:
        keras.config.set_dtype_policy("float32")
    reference.set_weights(model.get_weights())
    exact = np.asarray(reference(np.asarray(x, np.float64), training=False))
    model_error = np.abs(np.asarray(model(x, training=False)) - exact).max()
    copy_error = np.abs(np.asarray(copy(x, training=False)) - exact).max()
    scale = np.abs(exact).max()
    assert copy_error <= 4 * model_error + 1e-6 * scale, (copy_error, model_error)


def canonical_axes(axis, rank):
    """The feature axes `axis` (an int or a list) names, as sorted positive ints."""
    axes = [axis] if isinstance(axis, int) else list(axis)
    return sorted(a % rank for a in axes)


def param_shape(shape, axis):
    """The shape of gamma, beta and the statistics for inputs of `shape`."""
    return tuple(shape[a] for a in canonical_axes(axis, len(shape)))


def expand_param(v, rank, axes):
    """Reshapes a parameter of the feature axes' shape to broadcast against x."""
    shape = [1] * rank
    for a, d in zip(axes, np.shape(v)):
        shape[a] = d
    return np.reshape(v, shape)


def expand_mask(mask, rank, axes):
    """The mask with a unit axis at each feature axis, to broadcast against x."""
    for a in axes:
        mask = np.expand_dims(mask, a)
    return mask


def numpy_batch_norm_train(x, gamma, beta, axis, epsilon, mask=None):
    """Closed-form forward pass in float64: (y, mean, biased variance)."""
    x = np.asarray(x, np.float64)
    rank = x.ndim
    axes = canonical_axes(axis, rank)
    red = tuple(i for i in range(rank) if i not in axes)
    if mask is None:
        w = np.ones([1 if i in axes else x.shape[i] for i in range(rank)])
    else:
        w = expand_mask(np.asarray(mask, np.float64), rank, axes)
    w = np.broadcast_to(w, x.shape)
    count = np.maximum(w.sum(axis=red, keepdims=True), 1.0)
    mean = (w * x).sum(axis=red, keepdims=True) / count
    var = (w * (x - mean) ** 2).sum(axis=red, keepdims=True) / count
    y = (x - mean) / np.sqrt(var + epsilon)
    if gamma is not None:
        y = y * expand_param(gamma, rank, axes)
    if beta is not None:
        y = y + expand_param(beta, rank, axes)
    out_shape = param_shape(x.shape, axis)
    return y, mean.reshape(out_shape), var.reshape(out_shape)


def autodiff_batch_norm_train(
    x, gamma, beta, axis, epsilon, mask=None, renorm_stats=None, clip=(None,) * 3
):
    """The same math as `ops.batch_norm_train` in plain TF ops, for autodiff.

    Renorm's r and d are constants (stop_gradient). Masked outputs are
    differentiated like the others (as Keras's layer does); `mask` is shaped
    as `x` without the feature axes, or of the rank of `x`.
    """
    rank = x.shape.rank
    axes = canonical_axes(axis, rank)
    red = [i for i in range(rank) if i not in axes]
    bshape = [x.shape[i] if i in axes else 1 for i in range(rank)]
    if mask is None:
        w = tf.ones_like(x)
    else:
        m = tf.cast(mask, x.dtype)
        for a in axes if m.shape.rank < rank else ():
            m = tf.expand_dims(m, a)
        w = tf.broadcast_to(m, tf.shape(x))
    count = tf.maximum(tf.reduce_sum(w, red, keepdims=True), 1.0)
    mean = tf.reduce_sum(w * x, red, keepdims=True) / count
    var = tf.reduce_sum(w * tf.square(x - mean), red, keepdims=True) / count
    x_hat = (x - mean) / tf.sqrt(var + epsilon)
    if renorm_stats is not None:
        renorm_mean, renorm_stddev = (tf.reshape(v, bshape) for v in renorm_stats)
        renorm_stddev = tf.maximum(renorm_stddev, np.sqrt(epsilon))
        r = tf.sqrt(var + epsilon) / renorm_stddev
        d = (mean - renorm_mean) / renorm_stddev
        rmin, rmax, dmax = clip
        if rmin is not None:
            r = tf.maximum(r, rmin)
        if rmax is not None:
            r = tf.minimum(r, rmax)
        if dmax is not None:
            d = tf.clip_by_value(d, -dmax, dmax)
        x_hat = x_hat * tf.stop_gradient(r) + tf.stop_gradient(d)
    y = x_hat
    if gamma is not None:
        y = y * tf.reshape(gamma, bshape)
    if beta is not None:
        y = y + tf.reshape(beta, bshape)
    return (
        y,
        tf.reshape(mean, param_shape(x.shape, axis)),
        tf.reshape(var, param_shape(x.shape, axis)),
    )


def float32_mean_tolerance(values):
    """Absolute error bound of a float32 mean of `values` against the exact
    float64 mean: rounding the result to float32 costs half a unit in the
    last place at its magnitude, and the shifted pairwise sums at most about
    one more. Two units in the last place bound both."""
    return 2 * float(np.spacing(np.float32(np.max(np.abs(values)))))


def random_mask(rng, shape, axis, keep=0.7):
    """A random mask for inputs of `shape` (feature axes removed), never empty."""
    axes = canonical_axes(axis, len(shape))
    mshape = [d for i, d in enumerate(shape) if i not in axes]
    mask = rng.random(mshape) < keep
    mask.flat[0] = True
    return mask


def random_loss_weights(rng, shape, axis):
    """Float64 weights `(wy, wm, wv)` of the output, mean and variance in a loss."""
    pshape = param_shape(shape, axis)
    return (
        tf.constant(rng.normal(size=shape)),
        tf.constant(rng.normal(size=pshape)),
        tf.constant(rng.normal(size=pshape)),
    )


def compiled(fn, mode, autograph=True):
    """`fn` as `mode` of MODES runs it: itself, a tf.function, or one XLA compiles."""
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
    if mode == "eager":
        return fn
    return tf.function(fn, jit_compile=mode == "xla", autograph=autograph)


def weighted_loss(fn, w, quadratic=False):
    """The loss `sum(w * y)`, or `sum(w * y**2)`, of `y = fn(x, gamma, beta)`."""

    def loss(x, gamma, beta):
        y = fn(x, gamma, beta)
        return tf.reduce_sum(w * (tf.square(y) if quadratic else y))

    return loss


def penalty_gradients(loss, inputs):
    """Gradients of `sum(dL/dx ** 2)`, x = `inputs[0]`, with respect to every input."""
    with tf.GradientTape() as outer:
        outer.watch(inputs)
        with tf.GradientTape() as inner:
            inner.watch(inputs)
            value = loss(*inputs)
        gx = inner.gradient(value, inputs[0])
        penalty = tf.reduce_sum(tf.square(gx))
    return outer.gradient(penalty, inputs, unconnected_gradients="zero")


def random_batch_norm_weights(rng, features):
    """`[gamma, beta, moving_mean, moving_variance]`, random, far from the
    identity (scales and variances in [0.5, 2])."""
    return [
        rng.uniform(0.5, 2.0, features),
        rng.normal(size=features),
        rng.normal(size=features),
        rng.uniform(0.5, 2.0, features),
    ]


def twin_batch_norm_layers(rng, shape, **kwargs):
    """A keras_bn and a Keras BatchNormalization, built, with equal random weights."""
    ours = keras_bn.BatchNormalization(**kwargs)
    kwargs.pop("skip_nonfinite_updates", None)  # not a Keras argument
    theirs = keras.layers.BatchNormalization(**kwargs)
    ours.build(shape)
    theirs.build(shape)
    theirs.set_weights(
        [rng.uniform(0.5, 1.5, size=w.shape) for w in theirs.get_weights()]
    )
    ours.set_weights(theirs.get_weights())
    return ours, theirs


def cumulative_average_model(rng, batches=3):
    """A model of one momentum=None BN layer after `batches` random training calls."""
    model = keras.Sequential(
        [keras.Input((3,)), keras_bn.BatchNormalization(momentum=None)]
    )
    for _ in range(batches):
        model(rng.normal(size=(8, 3)).astype(np.float32), training=True)
    return model


def conv_bn_regressor(synchronized):
    """A Conv2D -> BN -> ReLU -> pooling -> Dense(1) model of (6, 6, 2) inputs."""
    return keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(4, 3),
            keras_bn.BatchNormalization(synchronized=synchronized, momentum=0.5),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(1),
        ]
    )


# Runs each `(script path, argv)` of `cases` the way `python script.py ARGS`
# does, all in one fresh interpreter; exit code None where the script returns.
_COMMAND_LINES = """
import runpy, sys
sys.path.insert(0, {examples!r})  # as `python examples/x.py` puts it first
results = []
for path, argv in {cases!r}:
    sys.argv = [path, *argv]
    try:
        runpy.run_path(path, run_name="__main__")
        results.append(None)
    except SystemExit as exit:
        results.append(exit.code)
print(results)
print("tensorflow" in sys.modules)
"""


def run_command_lines(cases, cwd):
    """(exit codes, TensorFlow imported?, stderr) of `cases` run in one interpreter."""
    script = _COMMAND_LINES.format(examples=str(EXAMPLES), cases=cases)
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    codes, tensorflow_loaded = result.stdout.strip().splitlines()[-2:]
    assert tensorflow_loaded in ("True", "False"), result.stdout[-3000:]
    return ast.literal_eval(codes), tensorflow_loaded == "True", result.stderr


def _weight_names(weights):
    """The names of `weights`, in order."""
    return [w.name for w in weights]


def _expand_to_inputs(mask, shape, mask_axes):
    """Broadcasts a mask without the input axes `mask_axes` to `shape`."""
    for a in sorted(mask_axes):
        mask = np.expand_dims(mask, a)
    return np.broadcast_to(mask, shape)


def run_layer_contract(
    layer_cls,
    init_kwargs,
    input_shape,
    expected_trainable,
    expected_non_trainable,
    tmp_path,
    expected_losses=None,
    expected_constraints=None,
    expected_initial=None,
    mask_axes=None,
    supports_masking=True,
    seed=0,
):
    """The layer contract of Keras's `run_layer_test`, for one configuration.

    Checks, and fails with a message naming what broke:

    1. Weights: after `build`, the trainable and non-trainable weight names,
       in order, are `expected_trainable` and `expected_non_trainable`; the
       weights in `expected_initial` (`{name: value}`) start at that value.
       A symbolic call and an eager training call give outputs shaped as the
       inputs (and as `compute_output_shape` says), in the compute dtype.
    2. Regularizers: `layer.losses` are exactly `regularizer(weight)` for the
       `{weight_name: regularizer}` of `expected_losses`, in weight order,
       before and after an optimizer step; no other loss.
    3. Constraints: one SGD step (learning rate 10 on `sum(y * x)` for
       inputs around 2, which drives `gamma` and `beta` negative) leaves each
       weight of `expected_constraints` (`{name: constraint}`) at
       `constraint(w - lr * grad)`, which must differ from the plain update
       (the constraint had work to do), and every other weight at the plain
       update.
    4. Masking: `layer.supports_masking == supports_masking`. With
       `mask_axes` (the input axes the mask lacks, e.g. `(2,)` for a mask
       `inputs.shape[:-1]` on rank-3 inputs), a training call's outputs at
       kept positions and the layer's state after it do not depend on the
       values at masked positions, and `compute_mask` passes the mask on.
    5. Serialization: `get_config`/`from_config`, a JSON round trip of
       `serialize_keras_object`, and a `.keras` file of a model holding the
       trained layer keep the class, the config, every weight (bitwise) and
       the outputs of inference and of the next training call.

    Args:
        layer_cls: The layer class.
        init_kwargs: Constructor arguments.
        input_shape: A fully known input shape, batch included.
        expected_trainable: Names of the trainable weights, in order.
        expected_non_trainable: Names of the non-trainable weights, in order.
        tmp_path: A directory for the `.keras` file.
        expected_losses: `{weight_name: regularizer}`, or None for no loss.
        expected_constraints: `{weight_name: constraint}`, or None.
        expected_initial: `{weight_name: value}`, or None.
        mask_axes: Input axes the mask lacks; None to skip the masked call
            (a configuration that refuses masks in training).
        supports_masking: The expected `layer.supports_masking`.
        seed: Seed of the random inputs and mask.

    Returns:
        The layer, trained by one call and one optimizer step.
    """
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(2.0, 1.0, size=input_shape), tf.float32)

    # 1. Weights and outputs.
    layer = layer_cls(**init_kwargs)
    layer.build(input_shape)
    assert _weight_names(layer.trainable_weights) == list(expected_trainable), (
        "trainable weights",
        _weight_names(layer.trainable_weights),
    )
    assert _weight_names(layer.non_trainable_weights) == list(expected_non_trainable), (
        "non-trainable weights",
        _weight_names(layer.non_trainable_weights),
    )
    by_name = {w.name: w for w in layer.weights}
    for name, value in (expected_initial or {}).items():
        np.testing.assert_allclose(
            by_name[name].numpy(),
            np.broadcast_to(value, by_name[name].shape),
            rtol=1e-6,
            err_msg=f"initial value of {name}",
        )
    symbolic = layer_cls(**init_kwargs)(keras.Input(batch_shape=input_shape))
    assert tuple(symbolic.shape) == tuple(input_shape), symbolic.shape
    assert tuple(layer.compute_output_shape(input_shape)) == tuple(input_shape)
    y = layer(x, training=True)
    assert tuple(y.shape) == tuple(input_shape), y.shape
    assert y.dtype == layer.compute_dtype, (y.dtype, layer.compute_dtype)

    # 2. Regularizers.
    def check_losses():
        expected = [
            float(expected_losses[w.name](w))
            for w in layer.trainable_weights
            if w.name in (expected_losses or {})
        ]
        got = [float(loss) for loss in layer.losses]
        np.testing.assert_allclose(got, expected, rtol=1e-6, err_msg="layer.losses")
        assert len(got) == len(expected) == len(expected_losses or {}), got

    check_losses()

    # 3. Constraints after an optimizer step.
    learning_rate = 10.0
    with tf.GradientTape() as tape:
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * x)
    grads = tape.gradient(loss, layer.trainable_weights)
    plain = {
        w.name: w.numpy() - learning_rate * g.numpy()
        for w, g in zip(layer.trainable_weights, grads)
    }
    keras.optimizers.SGD(learning_rate).apply(grads, layer.trainable_weights)
    constraints = expected_constraints or {}
    for w in layer.trainable_weights:
        if w.name in constraints:
            want = np.asarray(constraints[w.name](tf.constant(plain[w.name])))
            assert not np.allclose(want, plain[w.name]), f"{w.name}: no work"
            np.testing.assert_allclose(
                w.numpy(), want, rtol=1e-5, atol=1e-6, err_msg=f"{w.name} constraint"
            )
        else:
            np.testing.assert_allclose(
                w.numpy(), plain[w.name], rtol=1e-5, err_msg=f"{w.name} update"
            )
    check_losses()

    # 4. Masking.
    assert layer.supports_masking == supports_masking
    if mask_axes is not None:
        rank = len(input_shape)
        axes = sorted(a % rank for a in mask_axes)
        mask_shape = [d for i, d in enumerate(input_shape) if i not in axes]
        mask = rng.random(mask_shape) < 0.7
        mask.flat[0] = True
        kept = _expand_to_inputs(mask, input_shape, axes)
        noise = 100.0 * rng.normal(size=input_shape)
        x_masked_changed = tf.constant(np.where(kept, x.numpy(), noise), tf.float32)
        twins = [layer_cls(**init_kwargs) for _ in range(2)]
        for twin in twins:
            twin.build(input_shape)
            twin.set_weights(layer.get_weights())
        outputs = [
            twin(inputs, training=True, mask=tf.constant(mask)).numpy()
            for twin, inputs in zip(twins, (x, x_masked_changed))
        ]
        np.testing.assert_allclose(
            outputs[0][kept], outputs[1][kept], rtol=1e-5, atol=1e-6,
            err_msg="outputs at kept positions depend on masked inputs",
        )  # fmt: skip
        for a, b, name in zip(
            twins[0].get_weights(),
            twins[1].get_weights(),
            _weight_names(twins[0].weights),
        ):
            np.testing.assert_allclose(
                a, b, rtol=1e-5, atol=1e-6, err_msg=f"{name} depends on masked inputs"
            )
        np.testing.assert_array_equal(layer.compute_mask(x, tf.constant(mask)), mask)

    # 5. Serialization.
    config = layer.get_config()
    assert layer_cls.from_config(config).get_config() == config
    serialized = json.loads(json.dumps(keras.saving.serialize_keras_object(layer)))
    restored = keras.saving.deserialize_keras_object(serialized)
    assert type(restored) is layer_cls and restored.get_config() == config
    model = keras.Sequential([keras.Input(input_shape[1:]), layer])
    path = os.path.join(str(tmp_path), f"{layer.name}.keras")
    model.save(path)
    loaded_model = keras.saving.load_model(path)
    loaded = loaded_model.layers[-1]
    assert type(loaded) is layer_cls and loaded.get_config() == config
    assert _weight_names(loaded.weights) == _weight_names(layer.weights)
    for a, b in zip(loaded.weights, layer.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=f"loaded {a.name}")
    np.testing.assert_array_equal(loaded_model(x), model(x))
    np.testing.assert_array_equal(loaded(x, training=True), layer(x, training=True))
    for a, b in zip(loaded.weights, layer.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=f"next {a.name}")
    return layer
