"""Batch size with batch normalization: time per epoch vs generalization gap.

A ReLU MLP with BN (Dense -> BN -> ReLU, twice) is trained with batch sizes
from 8 to 512. Small batches cost more time per epoch (more, smaller steps);
in exchange, the statistics BN computes on a small batch are noisy, and that
noise regularizes. The script measures, for each batch size and seed, the
seconds per epoch and the gap between training and test accuracy (both in
inference mode, after training), and plots one against the other.

The learning rate of SGD with momentum grows in proportion to the batch size
(0.05 per 32 examples), which keeps the gradient noise scale (rate / batch
size) about constant: what changes with the batch size is mainly the noise of
BN's batch statistics. Every run trains for the same number of epochs, and at
least a minimum number of steps so large batches also fit the training set.
The figure (a PNG) and a CSV go to --out.
"""

import time

import _common


def parse_args(argv=None):
    parser = _common.ExampleParser("batch_size_tradeoff", __doc__)
    parser.add_size("--epochs", "epochs per run", full=15, quick=2)
    parser.add_size("--seeds", "seeds per batch size", full=3, quick=1)
    return parser.parse_args(argv)


# Parse before importing TensorFlow: --help and bad arguments answer at once.
ARGS = parse_args() if __name__ == "__main__" else None

import keras  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from keras_bn import BatchNormalization  # noqa: E402
from keras_bn.losses import SoftmaxCrossEntropy  # noqa: E402

HIDDEN_UNITS = 512
HIDDEN_LAYERS = 2
RATE_PER_32 = 0.05
FULL_BATCH_SIZES = (8, 16, 32, 64, 128, 256, 512)
QUICK_BATCH_SIZES = (16, 128)


class EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch of `fit`."""

    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def build_mlp(input_dim):
    inputs = keras.Input((input_dim,))
    hidden = inputs
    for index in range(1, HIDDEN_LAYERS + 1):
        hidden = keras.layers.Dense(
            HIDDEN_UNITS, use_bias=False, name=f"dense_{index}"
        )(hidden)
        hidden = BatchNormalization(name=f"bn_{index}")(hidden)
        hidden = keras.layers.ReLU(name=f"relu_{index}")(hidden)
    logits = keras.layers.Dense(10, name="logits")(hidden)
    return keras.Model(inputs, logits)


def train(data, batch_size, epochs, min_steps, seed):
    """Trains one network; returns a dict of its timing and accuracies."""
    x_train, y_train, x_test, y_test = data.flat()
    steps_per_epoch = -(-len(x_train) // batch_size)
    epochs = max(epochs, -(-min_steps // steps_per_epoch))
    learning_rate = RATE_PER_32 * batch_size / 32
    keras.utils.set_random_seed(seed)
    model = build_mlp(x_train.shape[1])
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate, momentum=0.9),
        loss=SoftmaxCrossEntropy(sparse=True),
        metrics=["accuracy"],
    )
    timer = EpochTimer()
    model.fit(
        x_train,
        y_train,
        batch_size=batch_size,
        epochs=epochs,
        callbacks=[timer],
        verbose=0,
    )
    train_loss, train_accuracy = model.evaluate(x_train, y_train, verbose=0)
    test_loss, test_accuracy = model.evaluate(x_test, y_test, verbose=0)
    # The first epoch also traces and compiles the step function.
    seconds = timer.seconds[1:] or timer.seconds
    return {
        "batch_size": batch_size,
        "seed": seed,
        "learning_rate": learning_rate,
        "epochs": epochs,
        "seconds_per_epoch": float(np.median(seconds)),
        "train_accuracy": train_accuracy,
        "test_accuracy": test_accuracy,
        "accuracy_gap": train_accuracy - test_accuracy,
        "train_loss": train_loss,
        "test_loss": test_loss,
    }


def summarize(rows, batch_sizes):
    """One row per batch size: means over seeds, and the gap's spread."""
    summary = []
    for batch_size in batch_sizes:
        runs = [row for row in rows if row["batch_size"] == batch_size]
        gaps = [row["accuracy_gap"] for row in runs]
        summary.append(
            {
                "batch_size": batch_size,
                "seconds_per_epoch": np.mean([r["seconds_per_epoch"] for r in runs]),
                "train_accuracy": np.mean([r["train_accuracy"] for r in runs]),
                "test_accuracy": np.mean([r["test_accuracy"] for r in runs]),
                "gap_mean": float(np.mean(gaps)),
                "gap_std": float(np.std(gaps)),
            }
        )
    return summary


def plot(summary, path):
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    seconds = [row["seconds_per_epoch"] for row in summary]
    gaps = [row["gap_mean"] for row in summary]
    axes[0].errorbar(
        seconds,
        gaps,
        yerr=[row["gap_std"] for row in summary],
        fmt="o-",
        color=_common.COLORS[0],
        capsize=3,
        label="gap, mean +- std over seeds",
    )
    for row, x, y in zip(summary, seconds, gaps):
        axes[0].annotate(
            str(row["batch_size"]), (x, y), xytext=(5, 5), textcoords="offset points"
        )
    axes[0].margins(x=0.1, y=0.1)
    axes[0].set(
        title="(a) cost vs generalization gap (labels: batch size)",
        xlabel="seconds per epoch",
        xscale="log",
        ylabel="train accuracy - test accuracy",
    )
    sizes = [row["batch_size"] for row in summary]
    for color, key in zip(_common.COLORS[1:], ("train_accuracy", "test_accuracy")):
        label = key.replace("_", " ")
        axes[1].plot(
            sizes, [row[key] for row in summary], "o-", color=color, label=label
        )
    axes[1].set(
        title="(b) accuracy after training",
        xlabel="batch size",
        xscale="log",
        ylabel="accuracy (inference mode)",
    )
    axes[1].set_xticks(sizes, [str(size) for size in sizes])
    _common.save_figure(figure, path, legend=[axes[0], axes[1]])


def report_effects(summary):
    """Prints the measured cost ratio and whether the gap grows with batch size."""
    small, large = summary[0], summary[-1]
    print(
        f"An epoch at batch size {small['batch_size']} took "
        f"{small['seconds_per_epoch'] / large['seconds_per_epoch']:.1f}x as long "
        f"as at {large['batch_size']}."
    )
    log_sizes = np.log2([row["batch_size"] for row in summary])
    gaps = [row["gap_mean"] for row in summary]
    correlation = float(np.corrcoef(log_sizes, gaps)[0, 1])
    print(
        f"Gap at batch size {small['batch_size']}: {small['gap_mean']:.4f} "
        f"+- {small['gap_std']:.4f}; at {large['batch_size']}: "
        f"{large['gap_mean']:.4f} +- {large['gap_std']:.4f}; correlation of gap "
        f"with log2(batch size): {correlation:.2f}."
    )
    if correlation > 0.7 and small["gap_mean"] < large["gap_mean"]:
        print("Smaller batches gave a smaller generalization gap.")
    else:
        print(
            "The regularizing effect of small batches did not show clearly here: "
            "the gap does not grow steadily with the batch size."
        )


def main(args):
    min_steps = 10 if args.quick else 150
    batch_sizes = QUICK_BATCH_SIZES if args.quick else FULL_BATCH_SIZES
    data = _common.start_run(args)
    if args.quick:
        data = data.shrink(256, 256)

    runs = [
        (args.seed + offset, batch_size)
        for offset in range(args.seeds)
        for batch_size in batch_sizes
    ]
    rows = []
    for index, (seed, batch_size) in enumerate(runs, start=1):
        row = train(data, batch_size, args.epochs, min_steps, seed)
        rows.append(row)
        _common.announce(
            index,
            len(runs),
            f"batch size {batch_size}, seed {seed}: {row['epochs']} epochs, "
            f"{row['seconds_per_epoch']:.2f} s per epoch, gap "
            f"{row['accuracy_gap']:.3f}",
        )
    _common.write_csv(args.out / "batch_size_tradeoff.csv", rows)
    summary = summarize(rows, batch_sizes)
    plot(summary, args.out / "batch_size_tradeoff.png")
    _common.print_table(summary)
    with _common.verdicts(args):
        report_effects(summary)
    _common.print_wall_time(args)


if __name__ == "__main__":
    main(ARGS)
