"""A Conv-BN-ReLU CNN: fit, save, reload in a fresh process, and the two BN modes.

The script
  1. trains a small CNN on the digit images with `fit` (Keras's progress bar);
  2. saves it with `model.save(".../digits_cnn.keras")`;
  3. runs itself again in a fresh Python process (`--reload`), which only
     needs `import keras_bn` to find the custom layer and loss, loads the file,
     predicts the test set and evaluates it; the predictions are compared with
     the original model's, value for value;
  4. shows training vs inference mode: in inference mode (`predict`,
     `evaluate`, `model(x)`) BN uses its moving statistics, so an image's
     logits do not depend on the other images of the batch; in training mode
     (`model(x, training=True)`) BN normalizes with the batch's own statistics,
     so they do, accuracy depends on the batch size, and every such call
     updates the moving statistics.

While the weights change fast, early in training, the moving statistics trail
them, and test accuracy (inference mode) trails training accuracy (batch
statistics); --bn-momentum 0.9 shortens their memory from about 100 steps to
about 10.

The figure (a PNG) and CSV files go to --out.
"""

import subprocess
import sys

import _common


def parse_args(argv=None):
    parser = _common.ExampleParser("cnn_save_load", __doc__)
    parser.add_size("--epochs", "training epochs", full=15, quick=1)
    parser.add_argument(
        "--bn-momentum",
        type=_common.unit_fraction,
        default=0.99,
        help="momentum of BN's moving statistics (default: %(default)s, Keras's)",
    )
    parser.add_argument(
        "--reload",
        action="store_true",
        help="only load --out/digits_cnn.keras in this process, predict the "
        "saved test images and evaluate (the script runs itself this way)",
    )
    return parser.parse_args(argv)


# Parse before importing TensorFlow: --help and bad arguments answer at once.
ARGS = parse_args() if __name__ == "__main__" else None

import keras  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from keras_bn import BatchNormalization  # noqa: E402
from keras_bn.losses import SoftmaxCrossEntropy  # noqa: E402

MODEL_FILE = "digits_cnn.keras"
IMAGES_FILE = "test_images.npy"
LABELS_FILE = "test_labels.npy"
RELOADED_FILE = "reloaded_predictions.npz"
PREDICT_BATCH_SIZE = 128
TRAINING_MODE_BATCH_SIZES = (4, 32, 128)


def build_cnn(image_shape, bn_momentum=0.99):
    """Conv-BN-ReLU blocks; BN's beta replaces the convolutions' bias."""
    inputs = keras.Input((*image_shape, 1))
    hidden = inputs
    for index, filters in enumerate((32, 32, 64), start=1):
        hidden = keras.layers.Conv2D(
            filters, 3, padding="same", use_bias=False, name=f"conv_{index}"
        )(hidden)
        hidden = BatchNormalization(momentum=bn_momentum, name=f"bn_{index}")(hidden)
        hidden = keras.layers.ReLU(name=f"relu_{index}")(hidden)
        if index == 2:
            hidden = keras.layers.MaxPooling2D(name="pool")(hidden)
    hidden = keras.layers.GlobalAveragePooling2D(name="average")(hidden)
    logits = keras.layers.Dense(10, name="logits")(hidden)
    return keras.Model(inputs, logits, name="digits_cnn")


def reload_and_predict(run_dir):
    """Runs in the fresh process: load the saved model, predict, evaluate."""
    import keras_bn  # noqa: F401  (registers keras_bn's layer and loss)

    model = keras.saving.load_model(run_dir / MODEL_FILE)
    images = np.load(run_dir / IMAGES_FILE)
    labels = np.load(run_dir / LABELS_FILE)
    logits = model.predict(images, batch_size=PREDICT_BATCH_SIZE, verbose=0)
    loss, accuracy = model.evaluate(images, labels, verbose=0)
    np.savez(run_dir / RELOADED_FILE, logits=logits, loss=loss, accuracy=accuracy)
    print(f"[fresh process] reloaded {MODEL_FILE}: test accuracy {accuracy:.4f}")


def reload_in_fresh_process(run_dir):
    """Runs this script with `--reload` in a new interpreter; returns its results."""
    command = [sys.executable, __file__, "--reload", "--out", str(run_dir)]
    subprocess.run(command, check=True)
    with np.load(run_dir / RELOADED_FILE) as saved:
        return saved["logits"], float(saved["loss"]), float(saved["accuracy"])


def compare_modes(model_path, model, x_test, y_test):
    """Accuracy and batch dependence in inference vs training mode.

    Training-mode calls update BN's moving statistics, so they run on a
    second copy of the model, loaded from the saved file.
    """
    results = {}
    alone = model(x_test[:1], training=False)
    in_batch = model(x_test[:32], training=False)[:1]
    results["inference_logit_change_alone_vs_batch"] = _max_abs(alone, in_batch)

    copy = keras.saving.load_model(model_path)
    first_batch = copy(x_test[:32], training=True)[:1]
    other_batch = copy(np.concatenate([x_test[:1], x_test[32:63]]), training=True)
    results["training_logit_change_other_batch"] = _max_abs(
        first_batch, other_batch[:1]
    )
    for batch_size in TRAINING_MODE_BATCH_SIZES:
        predictions = [
            np.argmax(copy(x_test[start : start + batch_size], training=True), -1)
            for start in range(0, len(x_test), batch_size)
        ]
        accuracy = np.mean(np.concatenate(predictions) == y_test)
        results[f"training_mode_accuracy_batch_{batch_size}"] = float(accuracy)
    moving_mean = model.get_layer("bn_1").moving_mean
    copy_mean = copy.get_layer("bn_1").moving_mean
    results["moving_mean_change_after_training_calls"] = _max_abs(
        moving_mean, copy_mean
    )
    return results


def _max_abs(a, b):
    a, b = keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
    return float(np.max(np.abs(a - b)))


def plot(history, numbers, path):
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.4), layout="constrained")
    inference_color, training_color = _common.COLORS[:2]
    epochs = np.arange(1, len(history["loss"]) + 1)
    axes[0].plot(
        epochs,
        history["accuracy"],
        "o-",
        color=training_color,
        label="training mode (batch statistics): training images during fit",
    )
    axes[0].plot(
        epochs,
        history["val_accuracy"],
        "o-",
        color=inference_color,
        label="inference mode (moving statistics): test images",
    )
    axes[0].set(
        title="(a) accuracy during fit",
        xlabel="epoch",
        ylabel="accuracy",
        ylim=(0, 1.02),
    )
    labels = ["inference\n(saved)", "inference\n(reloaded)"]
    values = [numbers["test_accuracy"], numbers["reloaded_test_accuracy"]]
    for batch_size in TRAINING_MODE_BATCH_SIZES:
        labels.append(f"training\nbatch {batch_size}")
        values.append(numbers[f"training_mode_accuracy_batch_{batch_size}"])
    colors = [inference_color] * 2 + [training_color] * len(TRAINING_MODE_BATCH_SIZES)
    bars = axes[1].bar(labels, values, color=colors)
    axes[1].bar_label(bars, fmt="%.3f")
    axes[1].set(
        title="(b) test accuracy by BN mode",
        ylabel="test accuracy",
        ylim=(0, 1.08),
    )
    _common.save_figure(figure, path, legend=[axes[0]])


def report_effects(numbers, history):
    """Prints the measured lag, reload check and mode differences in words."""
    for epoch in sorted({0, len(history["loss"]) - 1}):
        print(
            f"Epoch {epoch + 1}: training accuracy over the epoch (batch statistics) "
            f"{history['accuracy'][epoch]:.3f}, test accuracy after it (moving "
            f"statistics) {history['val_accuracy'][epoch]:.3f}."
        )
    if numbers["reload_identical_predictions"]:
        print("The model reloaded in a fresh process predicts identical logits.")
    else:
        print(
            "The reloaded model's logits differ by up to "
            f"{numbers['reload_max_abs_logit_difference']:.3g}."
        )
    print(
        "Inference mode: an image's logits change by "
        f"{numbers['inference_logit_change_alone_vs_batch']:.2g} between "
        "predicting it alone and in a batch; training mode: by "
        f"{numbers['training_logit_change_other_batch']:.2g} between two "
        "batches, and one BN layer's moving mean moved by "
        f"{numbers['moving_mean_change_after_training_calls']:.2g}."
    )


def main(args):
    if args.reload:
        reload_and_predict(args.out)
        return
    data = _common.start_run(args)
    if args.quick:
        data = data.shrink(128, 64)
    x_train, x_test = data.x_train[..., None], data.x_test[..., None]
    y_train, y_test = data.y_train, data.y_test

    model = build_cnn(data.x_train.shape[1:], args.bn_momentum)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=SoftmaxCrossEntropy(sparse=True),
        metrics=["accuracy"],
    )
    history = model.fit(
        x_train,
        y_train,
        batch_size=32,
        epochs=args.epochs,
        validation_data=(x_test, y_test),
        verbose=1,
    ).history
    test_loss, test_accuracy = model.evaluate(x_test, y_test, verbose=0)
    logits = model.predict(x_test, batch_size=PREDICT_BATCH_SIZE, verbose=0)

    model_path = args.out / MODEL_FILE
    model.save(model_path)
    np.save(args.out / IMAGES_FILE, x_test)
    np.save(args.out / LABELS_FILE, y_test)
    reloaded_logits, reloaded_loss, reloaded_accuracy = reload_in_fresh_process(
        args.out
    )

    numbers = {
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
        "reloaded_test_loss": reloaded_loss,
        "reloaded_test_accuracy": reloaded_accuracy,
        "reload_max_abs_logit_difference": _max_abs(logits, reloaded_logits),
        "reload_identical_predictions": int(np.array_equal(logits, reloaded_logits)),
        **compare_modes(model_path, model, x_test, y_test),
    }
    history_rows = [
        {"epoch": epoch + 1, **{key: values[epoch] for key, values in history.items()}}
        for epoch in range(args.epochs)
    ]
    _common.write_csv(args.out / "history.csv", history_rows)
    _common.write_csv(
        args.out / "cnn_save_load.csv",
        [{"quantity": key, "value": value} for key, value in numbers.items()],
    )
    plot(history, numbers, args.out / "cnn_save_load.png")
    _common.print_table([{"quantity": k, "value": v} for k, v in numbers.items()])
    with _common.verdicts(args):
        report_effects(numbers, history)
    _common.print_wall_time(args)


if __name__ == "__main__":
    main(ARGS)
