"""Models with keras_bn layers: export (SavedModel, TFLite), resuming `fit`,
checkpoints, and the errors that damaged or unregistered files give."""

import io
import subprocess
import sys
import textwrap
import warnings
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_bn


def _model(seed):
    """Two keras_bn layers: channels last after a convolution, and renorm."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(4, 3, use_bias=False),
            keras_bn.BatchNormalization(momentum=0.5),
            keras.layers.ReLU(),
            keras.layers.Flatten(),
            keras_bn.BatchNormalization(
                momentum=0.5, renorm=True, renorm_clipping={"rmax": 3.0}
            ),
            keras.layers.Dense(2),
        ]
    )


def _data(seed, n=32):
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 2.0, size=(n, 6, 6, 2)).astype("float32")
    y = rng.normal(size=(n, 2)).astype("float32")
    return x, y


def _trained_model():
    model = _model(seed=0)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.fit(*_data(0), batch_size=8, epochs=1, verbose=0)
    assert np.abs(model.layers[1].moving_mean.numpy()).max() > 0.01
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A trained model, and the directory `model.export` wrote it to."""
    model = _trained_model()
    path = tmp_path_factory.mktemp("export") / "model"
    model.export(str(path), verbose=False)
    return model, path


def _assert_same_weights(got, want, **tolerances):
    for a, b in zip(got.weights, want.weights, strict=True):
        assert a.path.split("/")[-1] == b.path.split("/")[-1]
        if tolerances:
            np.testing.assert_allclose(a, b, err_msg=a.path, **tolerances)
        else:
            np.testing.assert_array_equal(a, b, err_msg=a.path)


# Export.


def test_exported_serving_function_matches_predict(exported):
    model, path = exported
    x, _ = _data(1, n=5)
    loaded = tf.saved_model.load(str(path))  # must outlive its functions
    for batch in (x, x[:1]):
        np.testing.assert_allclose(
            loaded.serve(tf.constant(batch)),
            model.predict(batch, verbose=0),
            atol=1e-6,
        )


def _custom_gradient_ops(graph_def):
    """Nodes and functions that a `tf.custom_gradient` leaves in a graph."""
    found = []
    nodes = [("", n) for n in graph_def.node]
    for function in graph_def.library.function:
        name = function.signature.name
        if "CustomGradient" in name:
            found.append(f"function {name}")
        nodes += [(name, n) for n in function.node_def]
    for scope, node in nodes:
        if node.op == "IdentityN" and "_gradient_op_type" in node.attr:
            gradient = node.attr["_gradient_op_type"].s.decode()
            found.append(f"{node.op} {scope}/{node.name} ({gradient})")
    return found


def test_inference_graphs_hold_no_custom_gradient_ops(exported):
    model, path = exported
    loaded = tf.saved_model.load(str(path))
    serving = loaded.signatures["serving_default"].graph
    # The graph a traced inference call builds, before any export.
    spec = tf.TensorSpec([None, 6, 6, 2], tf.float32)
    traced = tf.function(lambda x: model(x, training=False))
    inference = traced.get_concrete_function(spec).graph
    found = {
        "exported serving function": _custom_gradient_ops(serving.as_graph_def()),
        "traced inference call": _custom_gradient_ops(inference.as_graph_def()),
    }
    assert found == {name: [] for name in found}


@pytest.mark.slow
def test_tflite_conversion_matches_predict(exported):
    model, path = exported
    converter = tf.lite.TFLiteConverter.from_saved_model(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation
        interpreter = tf.lite.Interpreter(model_content=converter.convert())
    ops = [op["op_name"] for op in interpreter._get_ops_details()]
    # Builtin ops only: no TensorFlow (Flex) or custom kernels needed.
    assert not [op for op in ops if op.startswith("Flex") or op == "CUSTOM"], ops
    runner = interpreter.get_signature_runner("serving_default")
    (input_name,) = runner.get_input_details()
    x, _ = _data(2, n=4)
    (output,) = runner(**{input_name: x}).values()
    np.testing.assert_allclose(output, model.predict(x, verbose=0), atol=1e-5)


# Resuming and checkpoints.


class _InterruptAt(keras.callbacks.Callback):
    """Raises after the given batch of the given epoch, as a crash would."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.epoch, self.batch, self._current = epoch, batch, None

    def on_epoch_begin(self, epoch, logs=None):
        self._current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self._current, batch) == (self.epoch, self.batch):
            raise RuntimeError("interrupted")


def _compiled_model(seed=3):
    model = _model(seed)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def test_backup_and_restore_resumes_to_the_uninterrupted_state(tmp_path):
    x, y = _data(4)
    fit = dict(x=x, y=y, batch_size=8, epochs=3, shuffle=False, verbose=0)
    uninterrupted = _compiled_model()
    uninterrupted.fit(**fit)

    backup = str(tmp_path / "backup")
    interrupted = _compiled_model()
    with pytest.raises(RuntimeError, match="interrupted"):
        interrupted.fit(
            **fit,
            callbacks=[keras.callbacks.BackupAndRestore(backup), _InterruptAt(1, 2)],
        )
    resumed = _compiled_model()  # a fresh process would start from here
    history = resumed.fit(**fit, callbacks=[keras.callbacks.BackupAndRestore(backup)])
    assert len(history.history["loss"]) == 2  # epochs 1 and 2: it resumed
    assert int(resumed.optimizer.iterations) == int(uninterrupted.optimizer.iterations)
    _assert_same_weights(resumed, uninterrupted, rtol=1e-6, atol=1e-7)
    statistics = [w for w in resumed.non_trainable_weights if "moving" in w.path]
    assert len(statistics) == 5  # the moving statistics were compared too


def test_model_checkpoint_round_trips_keras_and_weights_files(tmp_path):
    x, y = _data(5)
    model = _compiled_model()
    full, weights = tmp_path / "checkpoint.keras", tmp_path / "ckpt.weights.h5"
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        verbose=0,
        callbacks=[
            keras.callbacks.ModelCheckpoint(str(full)),
            keras.callbacks.ModelCheckpoint(str(weights), save_weights_only=True),
        ],
    )
    from_weights = _compiled_model(seed=7)
    statistics = [w for w in from_weights.weights if "moving_mean" in w.path]
    assert all(np.all(w.numpy() == 0) for w in statistics)  # fresh: work to do
    from_weights.optimizer.build(from_weights.trainable_variables)
    from_weights.load_weights(weights)
    for loaded in (keras.saving.load_model(full), from_weights):
        bn = [
            layer
            for layer in loaded.layers
            if isinstance(layer, keras_bn.BatchNormalization)
        ]
        assert len(bn) == 2 and bn[1].renorm
        _assert_same_weights(loaded, model)
        for a, b in zip(loaded.optimizer.variables, model.optimizer.variables):
            np.testing.assert_array_equal(a, b, err_msg=a.path)
        np.testing.assert_array_equal(loaded(x), model(x))


# Damaged files and unregistered classes.


def _damage(data, how):
    """`data` emptied, cut in half, or with 16 bytes flipped in member `how`."""
    if how == "empty":
        return b""
    if how == "truncated":
        return data[: len(data) // 2]
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = archive.getinfo(how)
    # The member's bytes follow its 30-byte local header, name and extra field.
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    middle = start + info.compress_size // 2
    damaged = bytearray(data)
    damaged[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    return bytes(damaged)


@pytest.mark.parametrize(
    "how,names",
    [
        ("empty", "path"),
        ("truncated", "path"),
        ("config.json", "member"),
        ("model.weights.h5", "member"),
    ],
)
def test_damaged_keras_file_raises_a_clear_error(tmp_path, how, names):
    model = _compiled_model()
    good = tmp_path / "good.keras"
    model.save(good)
    bad = tmp_path / "bad.keras"
    bad.write_bytes(_damage(good.read_bytes(), how))
    with pytest.raises((ValueError, zipfile.BadZipFile)) as error:
        keras.saving.load_model(bad)
    message = str(error.value)
    if names == "path":  # the archive itself is unreadable
        assert str(bad) in message and ".keras` zip file" in message
    else:  # one member is damaged: it is named, and the checksum caught it
        assert f"'{how}'" in message and "CRC" in message


@pytest.mark.slow
def test_loading_without_import_names_the_registered_class(tmp_path):
    model = _compiled_model()
    path, exported = tmp_path / "model.keras", tmp_path / "exported"
    model.save(path)
    model.export(str(exported), verbose=False)
    x, _ = _data(6, n=4)
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(
        f"""
        import sys
        import keras
        import numpy as np
        import tensorflow as tf
        x = np.load({str(tmp_path / "x.npy")!r})
        # An exported SavedModel serves without keras_bn.
        artifact = tf.saved_model.load({str(exported)!r})
        np.save({str(tmp_path / "served.npy")!r}, artifact.serve(x).numpy())
        try:
            keras.saving.load_model({str(path)!r})
        except Exception as error:
            print("ERROR", type(error).__name__, error)
        else:
            sys.exit("loaded without keras_bn")
        assert "keras_bn" not in sys.modules
        import keras_bn  # the documented fix
        model = keras.saving.load_model({str(path)!r})
        np.save({str(tmp_path / "y.npy")!r}, model.predict(x, verbose=0))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ERROR"), result.stdout
    assert "keras_bn>BatchNormalization" in result.stdout, result.stdout
    want = model.predict(x, verbose=0)
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), want)
    np.testing.assert_allclose(np.load(tmp_path / "served.npy"), want, atol=1e-6)
