"""Fold batch normalization into the convolutions for inference, and time it.

In inference, batch normalization is a fixed per-channel affine map, so it
merges into the kernel and bias of the convolution before it:
`keras_bn.models.fold_batch_normalization(model)` returns a copy without
those BN layers whose predictions equal the original's up to float32
rounding. The script
  1. trains a Conv-BN-ReLU CNN on the digit images;
  2. folds it and compares the two models' test logits and accuracy;
  3. saves the folded model to `.keras` and loads it in a fresh Python
     process in which `import keras_bn` is made to fail: the folded model
     holds Keras's own layers only;
  4. times `predict_on_batch` (Keras's compiled predict step, the per-batch
     latency of serving) of both models at several batch sizes, round-robin
     after a warm-up, and does the same for a MobileNetV2 (random weights,
     no download) at 128x128, whose 52 BN layers all fold.

Figures and CSV files go to --out.
"""

import statistics
import subprocess
import sys
import textwrap
import time

import _common


def parse_args(argv=None):
    parser = _common.ExampleParser("fold_speedup", __doc__)
    parser.add_size("--epochs", "training epochs", full=10, quick=1)
    parser.add_size("--repetitions", "timed repetitions", full=9, quick=2)
    parser.add_size("--image-size", "MobileNetV2's image size", full=128, quick=32)
    return parser.parse_args(argv)


# Parse before importing TensorFlow: --help and bad arguments answer at once.
ARGS = parse_args() if __name__ == "__main__" else None

import keras  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from cnn_save_load import build_cnn  # noqa: E402  (Conv-BN-ReLU x 3)

import keras_bn  # noqa: E402
from keras_bn.losses import SoftmaxCrossEntropy  # noqa: E402

FOLDED_FILE = "folded.keras"
IMAGES_FILE = "test_images.npy"
RELOADED_FILE = "reloaded_logits.npy"
RELOAD_WITHOUT_KERAS_BN = textwrap.dedent(
    """
    import sys
    sys.modules["keras_bn"] = None  # any import of keras_bn now fails
    import keras, numpy as np
    model = keras.saving.load_model(sys.argv[1])
    np.save(sys.argv[3], model.predict(np.load(sys.argv[2]), verbose=0))
    print(f"[fresh process, no keras_bn] loaded {sys.argv[1]}")
    """
)


def mobilenet(image_size):
    """MobileNetV2 with random weights and random moving statistics."""
    model = keras.applications.MobileNetV2(
        weights=None, input_shape=(image_size, image_size, 3)
    )
    rng = np.random.default_rng(0)
    for layer in keras_bn.models.batch_normalization_layers(model):
        shape = layer.moving_mean.shape
        layer.moving_mean.assign(rng.normal(0.0, 0.1, shape))
        layer.moving_variance.assign(rng.uniform(0.5, 2.0, shape))
    return model


def median_latencies(models, x, repetitions, seconds):
    """Median seconds per `predict_on_batch` call, timed round-robin.

    Each repetition runs every model's loop once, the starting model rotated,
    so that drifting machine load hits all alike.
    """
    for model in models.values():  # warm-up: tracing, allocations
        model.predict_on_batch(x)
    start = time.perf_counter()
    next(iter(models.values())).predict_on_batch(x)
    calls = max(1, round(seconds / (time.perf_counter() - start)))
    times = {name: [] for name in models}
    names = list(models)
    for repetition in range(repetitions):
        shift = repetition % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            for _ in range(calls):
                models[name].predict_on_batch(x)
            times[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(values) for name, values in times.items()}


def time_models(label, model, folded, images, batch_sizes, repetitions, seconds):
    rows = []
    for batch_size in batch_sizes:
        x = np.resize(images, (batch_size, *images.shape[1:]))
        median = median_latencies(
            {"unfolded": model, "folded": folded}, x, repetitions, seconds
        )
        rows.append(
            {
                "model": label,
                "batch_size": batch_size,
                "unfolded_ms": median["unfolded"] * 1e3,
                "folded_ms": median["folded"] * 1e3,
                "ratio": median["folded"] / median["unfolded"],
            }
        )
        print(
            f"{label}, batch {batch_size}: {rows[-1]['unfolded_ms']:.2f} ms -> "
            f"{rows[-1]['folded_ms']:.2f} ms per predict_on_batch"
        )
    return rows


def reload_without_keras_bn(run_dir):
    paths = [str(run_dir / name) for name in (FOLDED_FILE, IMAGES_FILE, RELOADED_FILE)]
    command = [sys.executable, "-c", RELOAD_WITHOUT_KERAS_BN, *paths]
    subprocess.run(command, check=True)
    return np.load(run_dir / RELOADED_FILE)


def plot(latency, logits, folded_logits, path):
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.2), layout="constrained")
    labels = list(dict.fromkeys(row["model"] for row in latency))
    for index, (ax, label) in enumerate(zip(axes[:2], labels)):
        rows = [row for row in latency if row["model"] == label]
        positions = np.arange(len(rows))
        bars_of = (("unfolded_ms", "with BN", -0.2), ("folded_ms", "folded", 0.2))
        for (key, name, offset), color in zip(bars_of, _common.COLORS):
            bars = ax.bar(
                positions + offset,
                [row[key] for row in rows],
                0.4,
                label=name,
                color=color,
            )
        ax.bar_label(bars, [f"x{row['ratio']:.2f}" for row in rows])
        ax.set_xticks(positions, [f"batch {row['batch_size']}" for row in rows])
        ax.set(title=f"({'ab'[index]}) {label}", ylabel="ms per predict_on_batch")
    axes[2].scatter(logits.ravel(), folded_logits.ravel(), s=2, color=_common.COLORS[2])
    axes[2].set(
        title="(c) digits test logits",
        xlabel="model with BN",
        ylabel="folded model",
    )
    _common.save_figure(figure, path, legend=[axes[0]])


def main(args):
    seconds = 0.02 if args.quick else 0.5  # one repetition of one model
    data = _common.start_run(args)
    if args.quick:
        data = data.shrink(256, 128)
    x_train, x_test = data.x_train[..., None], data.x_test[..., None]

    model = build_cnn(data.x_train.shape[1:], bn_momentum=0.9)
    model.compile(
        keras.optimizers.Adam(3e-3),
        SoftmaxCrossEntropy(sparse=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, data.y_train, batch_size=32, epochs=args.epochs, verbose=2)
    folded = keras_bn.models.fold_batch_normalization(model)  # not compiled
    print(
        f"folded: {len(model.layers)} -> {len(folded.layers)} layers, BN layers "
        f"left: {len(keras_bn.models.batch_normalization_layers(folded))}"
    )
    logits = model.predict(x_test, verbose=0)
    folded_logits = folded.predict(x_test, verbose=0)
    folded.save(args.out / FOLDED_FILE)
    np.save(args.out / IMAGES_FILE, x_test)
    reloaded = reload_without_keras_bn(args.out)

    image_size = args.image_size
    net = mobilenet(image_size)
    net_images = np.random.default_rng(0).uniform(
        0, 255, (32, image_size, image_size, 3)
    )
    latency = time_models(
        "digits CNN", model, folded, x_test, (1, 32, 256), args.repetitions, seconds
    ) + time_models(
        f"MobileNetV2 {image_size}x{image_size}",
        net,
        keras_bn.models.fold_batch_normalization(net),
        net_images.astype("float32"),
        (1, 16),
        args.repetitions,
        seconds,
    )
    numbers = {
        "test_accuracy": float(np.mean(np.argmax(logits, -1) == data.y_test)),
        "folded_test_accuracy": float(
            np.mean(np.argmax(folded_logits, -1) == data.y_test)
        ),
        "max_abs_logit_difference": float(np.max(np.abs(folded_logits - logits))),
        "max_abs_logit": float(np.max(np.abs(logits))),
        "same_predicted_class": float(
            np.mean(np.argmax(logits, -1) == np.argmax(folded_logits, -1))
        ),
        "reloaded_without_keras_bn_max_abs_difference": float(
            np.max(np.abs(reloaded - folded_logits))
        ),
    }
    _common.write_csv(args.out / "latency.csv", latency)
    _common.write_csv(
        args.out / "fold_speedup.csv",
        [{"quantity": key, "value": value} for key, value in numbers.items()],
    )
    plot(latency, logits, folded_logits, args.out / "fold_speedup.png")
    _common.print_table(latency)
    _common.print_table([{"quantity": k, "value": v} for k, v in numbers.items()])
    with _common.verdicts(args):
        print(
            f"The folded model's logits differ by at most "
            f"{numbers['max_abs_logit_difference']:.2g} (largest logit "
            f"{numbers['max_abs_logit']:.3g}); it predicts the same class for "
            f"{numbers['same_predicted_class']:.1%} of the test images and loads "
            "without keras_bn."
        )
    _common.print_wall_time(args, "figures and CSV")


if __name__ == "__main__":
    main(ARGS)
