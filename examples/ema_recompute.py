"""EMA weights need their own BN statistics: recompute them after training.

`keras.optimizers.Adam(use_ema=True)` keeps an exponential moving average of
the trainable weights and swaps it into the model when `fit` ends. The
batch-normalization layers' moving statistics are not trainable weights:
they stay the averages of the inputs the *raw* weights produced, and no
longer match the averaged weights. `keras_bn.models.recompute_statistics`
runs the model in training mode over the training set and sets every BN
layer's statistics to those of the weights it now holds (Ioffe & Szegedy's
inference step, as SWA's `update_bn`).

The script trains a Conv-BN-ReLU CNN on the digit images with EMA
(`ema_momentum` 0.999, an average over about 1,000 steps) and, at the end of
every epoch, measures the test accuracy of
  - the raw weights with their moving statistics (what validation in `fit`
    shows), and with statistics recomputed on the training set;
  - the EMA weights with those same moving statistics (what `fit` leaves
    you), and with recomputed statistics,
each on a copy of the model, so that training is not touched. After `fit`
it recomputes the model's own statistics with `recompute_statistics` (the
callback `keras_bn.callbacks.RecomputeStatistics(x_train, batch_size=32)`
does the same at the end of `fit`). It repeats this for several seeds.

Figures and CSV files go to --out.
"""

import _common


def parse_args(argv=None):
    parser = _common.ExampleParser("ema_recompute", __doc__)
    parser.add_size("--epochs", "training epochs per seed", full=20, quick=2)
    parser.add_size("--seeds", "seeds, from --seed on", full=3, quick=1)
    parser.add_argument(
        "--learning-rate",
        type=_common.positive_float,
        default=3e-3,
        help="Adam's learning rate (default: %(default)s)",
    )
    parser.add_argument(
        "--ema-momentum",
        type=_common.unit_fraction,
        default=0.999,
        help="weight of the old average per step (default: %(default)s)",
    )
    parser.add_argument(
        "--bn-momentum",
        type=_common.unit_fraction,
        default=0.9,
        help="momentum of BN's moving statistics (default: %(default)s)",
    )
    return parser.parse_args(argv)


# Parse before importing TensorFlow: --help and bad arguments answer at once.
ARGS = parse_args() if __name__ == "__main__" else None

import keras  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from keras_bn import BatchNormalization  # noqa: E402
from keras_bn.callbacks import RecomputeStatistics  # noqa: E402
from keras_bn.losses import SoftmaxCrossEntropy  # noqa: E402
from keras_bn.models import recompute_statistics  # noqa: E402

BATCH_SIZE = 32
WEIGHTS = ("raw", "EMA")
STATISTICS = ("moving", "recomputed")


def build_cnn(image_shape, bn_momentum):
    """Two Conv-BN-ReLU blocks, global average pooling, a Dense classifier."""
    inputs = keras.Input((*image_shape, 1))
    hidden = inputs
    for index, filters in enumerate((32, 64), start=1):
        hidden = keras.layers.Conv2D(
            filters, 3, padding="same", use_bias=False, name=f"conv_{index}"
        )(hidden)
        hidden = BatchNormalization(momentum=bn_momentum, name=f"bn_{index}")(hidden)
        hidden = keras.layers.ReLU(name=f"relu_{index}")(hidden)
    hidden = keras.layers.GlobalAveragePooling2D(name="average")(hidden)
    logits = keras.layers.Dense(10, name="logits")(hidden)
    return keras.Model(inputs, logits, name="digits_cnn")


def compile_model(model, optimizer):
    model.compile(optimizer, SoftmaxCrossEntropy(sparse=True), metrics=["accuracy"])


class Probe(keras.callbacks.Callback):
    """Test accuracy of the current weights, with moving and recomputed BN.

    At each epoch end, copies the model's weights into a twin model, evaluates
    it, recomputes the twin's statistics on the training set and evaluates
    again. The trained model is only read.
    """

    def __init__(self, label, twin, x_train, test, rows, seed):
        super().__init__()
        self.label, self.twin, self.test = label, twin, test
        self.rows, self.seed = rows, seed
        self.recomputer = RecomputeStatistics(x_train, batch_size=BATCH_SIZE)
        self.recomputer.set_model(twin)

    def on_epoch_end(self, epoch, logs=None):
        self.twin.set_weights(self.model.get_weights())
        for statistics in STATISTICS:
            if statistics == "recomputed":
                self.recomputer.recompute()
            accuracy = self.twin.evaluate(*self.test, verbose=0)[1]
            self.rows.append(
                {
                    "seed": self.seed,
                    "epoch": epoch + 1,
                    "weights": self.label,
                    "statistics": statistics,
                    "test_accuracy": accuracy,
                }
            )


def train_one_seed(data, args, seed, rows):
    """Trains with EMA; returns the final accuracies and the last BN's means."""
    keras.utils.set_random_seed(seed)
    x_train, x_test = data.x_train[..., None], data.x_test[..., None]
    test = (x_test, data.y_test)
    model = build_cnn(data.x_train.shape[1:], args.bn_momentum)
    compile_model(
        model,
        keras.optimizers.Adam(
            args.learning_rate, use_ema=True, ema_momentum=args.ema_momentum
        ),
    )
    twin = keras.models.clone_model(model)  # evaluated only
    compile_model(twin, "adam")
    callbacks = [
        Probe("raw", twin, x_train, test, rows, seed),
        # Swaps the EMA weights in at each epoch end (and back at the next
        # epoch's start), for the probe after it.
        keras.callbacks.SwapEMAWeights(swap_on_epoch=True),
        Probe("EMA", twin, x_train, test, rows, seed),
    ]
    model.fit(
        x_train,
        data.y_train,
        batch_size=BATCH_SIZE,
        epochs=args.epochs,
        callbacks=callbacks,
        verbose=2 if seed == args.seed else 0,
    )
    moving_mean = keras.ops.convert_to_numpy(model.get_layer("bn_2").moving_mean)
    stale = model.evaluate(*test, verbose=0)[1]  # fit ends with EMA weights
    print(f"seed {seed}: recomputing the EMA model's statistics on the training set")
    recompute_statistics(model, x_train, batch_size=BATCH_SIZE)
    recomputed = model.evaluate(*test, verbose=0)[1]
    means = (
        moving_mean,
        keras.ops.convert_to_numpy(model.get_layer("bn_2").moving_mean),
    )
    return {"seed": seed, "ema_moving": stale, "ema_recomputed": recomputed}, means


def final_summary(rows, epochs):
    """Mean and std over seeds of the last epoch's accuracies."""
    summary = []
    for weights in WEIGHTS:
        for statistics in STATISTICS:
            values = [
                row["test_accuracy"]
                for row in rows
                if row["epoch"] == epochs
                and row["weights"] == weights
                and row["statistics"] == statistics
            ]
            summary.append(
                {
                    "weights": weights,
                    "statistics": statistics,
                    "mean_test_accuracy": float(np.mean(values)),
                    "std_test_accuracy": float(np.std(values)),
                    "seeds": len(values),
                }
            )
    return summary


def plot(rows, summary, means, first_seed, path):
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.2), layout="constrained")
    styles = {"moving": "--", "recomputed": "-"}
    colors = dict(zip(WEIGHTS, _common.COLORS))
    for weights in WEIGHTS:
        for statistics in STATISTICS:
            points = [
                (row["epoch"], row["test_accuracy"])
                for row in rows
                if row["seed"] == first_seed
                and row["weights"] == weights
                and row["statistics"] == statistics
            ]
            epochs, accuracy = zip(*points)
            axes[0].plot(
                epochs,
                accuracy,
                styles[statistics],
                marker="o",
                markersize=3,
                color=colors[weights],
                label=f"{weights} weights, {statistics} statistics",
            )
    axes[0].set(
        title=f"(a) test accuracy during training (seed {first_seed})",
        xlabel="epoch",
        ylim=(0, 1.02),
    )
    axes[0].xaxis.get_major_locator().set_params(integer=True)
    labels = [f"{s['weights']}\n{s['statistics']}" for s in summary]
    bars = axes[1].bar(
        labels,
        [s["mean_test_accuracy"] for s in summary],
        yerr=[s["std_test_accuracy"] for s in summary],
        color=[colors[s["weights"]] for s in summary],
        alpha=0.8,
        capsize=4,
    )
    axes[1].bar_label(bars, fmt="%.3f")
    axes[1].set(
        title=f"(b) after the last epoch, mean +- std over {summary[0]['seeds']} seeds",
        ylim=(0, 1.1),
    )
    stale, recomputed = means
    axes[2].scatter(recomputed, stale, s=12, color=colors["EMA"])
    low, high = min(stale.min(), recomputed.min()), max(stale.max(), recomputed.max())
    axes[2].plot([low, high], [low, high], **_common.THRESHOLD_STYLE, label="equal")
    axes[2].set(
        title="(c) bn_2 moving mean per channel, EMA model",
        xlabel="recomputed for the EMA weights",
        ylabel="moving average (from the raw weights)",
    )
    _common.save_figure(figure, path, legend=[axes[0], axes[2]], ncols=3)


def report(summary, finals, n_test):
    """Prints the accuracies and whether recomputing clearly helped."""
    accuracy = {
        (s["weights"], s["statistics"]): s["mean_test_accuracy"] for s in summary
    }
    stale = [f["ema_moving"] for f in finals]
    recomputed = [f["ema_recomputed"] for f in finals]
    print(
        f"After fit (EMA weights, moving statistics of the raw weights): test "
        f"accuracy {np.mean(stale):.3f}; after recompute_statistics: "
        f"{np.mean(recomputed):.3f}; the raw weights with their own moving "
        f"statistics: {accuracy[('raw', 'moving')]:.3f} (means over "
        f"{len(finals)} seeds)."
    )
    # A clear gain: the mean gain over seeds (each model against itself)
    # exceeds twice its standard error, with two seeds at least. That error is
    # at least the test set's own sampling noise, sqrt(2 p (1 - p) / n) for
    # accuracies near p on n images, which no number of seeds averages away.
    gains = np.subtract(recomputed, stale)
    gain, error = float(gains.mean()), float("nan")
    if len(gains) > 1 and np.all(np.isfinite(gains)):
        p = np.mean(recomputed)
        noise = float(np.sqrt(2.0 * p * (1.0 - p) / n_test))
        error = max(float(gains.std(ddof=1) / np.sqrt(len(gains))), noise)
    if gain > 2 * error:
        print(
            f"Recomputing the statistics restored the EMA model's accuracy: "
            f"+{gain:.3f} (standard error {error:.3f})."
        )
    else:
        print(
            f"No clear difference from recomputing here ({gain:+.3f}, standard "
            f"error {error:.3f}, {len(finals)} seeds)."
        )


def main(args):
    data = _common.start_run(args)
    if args.quick:
        data = data.shrink(256, 128)
    seeds = range(args.seed, args.seed + args.seeds)
    rows, finals = [], []
    for index, seed in enumerate(seeds, start=1):
        _common.announce(index, len(seeds), f"seed {seed}: {args.epochs} epochs")
        final, means = train_one_seed(data, args, seed, rows)
        finals.append(final)
        if seed == args.seed:
            first_means = means
    summary = final_summary(rows, args.epochs)
    _common.write_csv(args.out / "ema_recompute.csv", rows)
    _common.write_csv(args.out / "final.csv", summary)
    _common.write_csv(args.out / "after_fit.csv", finals)
    plot(rows, summary, first_means, args.seed, args.out / "ema_recompute.png")
    _common.print_table(summary)
    with _common.verdicts(args):
        report(summary, finals, len(data.x_test))
    _common.print_wall_time(args, "figures and CSV")


if __name__ == "__main__":
    main(ARGS)
