"""BN as a regularizer: BN without dropout, against dropout, against neither.

In training, batch normalization normalizes each example with the statistics
of its mini-batch, so an example's output depends on which other examples
share its batch: noise that, like dropout's, may keep the network from
memorizing the training set. This script trains one ReLU MLP (3 hidden
layers of 256 units) three ways, with no other regularizer (no weight decay,
no early stopping, no data augmentation):

  - BN between each Dense layer and its ReLU, no dropout;
  - no BN, dropout after each ReLU;
  - no BN, no dropout;

with Adam and the same schedule, over several seeds, and measures after every
epoch the train-test gap: training minus test accuracy and test minus
training loss, both in inference mode (no dropout, BN's moving statistics).

Verdict rule: a variant regularizes more when its final accuracy gap is
smaller than the plain network's by more than twice the standard error of
the paired difference (same seed, same initial weights). That error is the
larger of the spread over seeds and the test set's own sampling noise,
`sqrt(2 p (1 - p) / n)` for an accuracy `p` on `n` test images (0.009 for 98%
of 450): a difference of a few test images is not a clear one. The loss gap
is compared the same way. The figure (a PNG) and a CSV go to --out.
"""

import _common


def parse_args(argv=None):
    parser = _common.ExampleParser("bn_regularization", __doc__)
    parser.add_size("--epochs", "epochs per run", full=40, quick=1)
    parser.add_size("--seeds", "seeds per variant", full=3, quick=1)
    parser.add_argument(
        "--dropout",
        type=_common.unit_fraction,
        default=0.3,
        help="dropout rate of the dropout network (default: %(default)s)",
    )
    return parser.parse_args(argv)


# Parse before importing TensorFlow: --help and bad arguments answer at once.
ARGS = parse_args() if __name__ == "__main__" else None

import keras  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import keras_bn  # noqa: E402
from keras_bn import BatchNormalization  # noqa: E402
from keras_bn.losses import SoftmaxCrossEntropy  # noqa: E402

HIDDEN_UNITS = 256
HIDDEN_LAYERS = 3
BATCH_SIZE = 32
LEARNING_RATE = 1e-3
VARIANTS = ("BN, no dropout", "dropout, no BN", "plain")


def build_mlp(input_dim, variant, dropout):
    inputs = keras.Input((input_dim,))
    hidden = inputs
    use_bn = variant == "BN, no dropout"
    for _ in range(HIDDEN_LAYERS):
        hidden = keras.layers.Dense(HIDDEN_UNITS, use_bias=not use_bn)(hidden)
        if use_bn:
            hidden = BatchNormalization()(hidden)
        hidden = keras.layers.ReLU()(hidden)
        if variant == "dropout, no BN":
            hidden = keras.layers.Dropout(dropout)(hidden)
    logits = keras.layers.Dense(10)(hidden)
    return keras.Model(inputs, logits)


class TrainingSetEvaluation(keras.callbacks.Callback):
    """After each epoch, loss and accuracy on the training set, inference mode.

    `fit`'s own training metrics average over the epoch in training mode
    (with dropout active and BN on batch statistics), which would not be
    comparable across the variants.
    """

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y
        self.losses, self.accuracies = [], []

    def on_epoch_end(self, epoch, logs=None):
        loss, accuracy = self.model.evaluate(
            self.x, self.y, batch_size=len(self.x), verbose=0
        )
        self.losses.append(loss)
        self.accuracies.append(accuracy)


def train(data, variant, args, seed):
    x_train, y_train, x_test, y_test = data.flat()
    keras.utils.set_random_seed(seed)
    model = build_mlp(x_train.shape[1], variant, args.dropout)
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss=SoftmaxCrossEntropy(sparse=True),
        metrics=["accuracy"],
    )
    on_train = TrainingSetEvaluation(x_train, y_train)
    history = model.fit(
        x_train,
        y_train,
        batch_size=BATCH_SIZE,
        epochs=args.epochs,
        validation_data=(x_test, y_test),
        validation_batch_size=len(x_test),
        callbacks=[on_train],
        verbose=0,
    ).history
    # The spread of the per-image test losses at the end, for the verdict's
    # allowance for the test set's sampling noise.
    logits = model.predict(x_test, batch_size=len(x_test), verbose=0)
    per_image = keras_bn.ops.sparse_softmax_cross_entropy(y_test, logits)
    loss_spread = float(np.std(keras.ops.convert_to_numpy(per_image)))
    return [
        {
            "variant": variant,
            "seed": seed,
            "epoch": epoch + 1,
            "train_loss": on_train.losses[epoch],
            "train_accuracy": on_train.accuracies[epoch],
            "test_loss": history["val_loss"][epoch],
            "test_accuracy": history["val_accuracy"][epoch],
            "accuracy_gap": on_train.accuracies[epoch] - history["val_accuracy"][epoch],
            "loss_gap": history["val_loss"][epoch] - on_train.losses[epoch],
            "final_test_loss_std": loss_spread,
        }
        for epoch in range(args.epochs)
    ]


def final_rows(rows):
    last = max(row["epoch"] for row in rows)
    return [row for row in rows if row["epoch"] == last]


def summarize(rows, n_test):
    finals = final_rows(rows)
    by_variant = {
        v: sorted((r for r in finals if r["variant"] == v), key=lambda r: r["seed"])
        for v in VARIANTS
    }
    summary = []
    for variant, runs in by_variant.items():
        entry = {"variant": variant}
        for key in ("train_accuracy", "test_accuracy", "accuracy_gap", "loss_gap"):
            values = np.array([r[key] for r in runs], dtype=float)
            entry[key] = float(values.mean())
            entry[f"{key}_std"] = float(values.std())
        summary.append(entry)
    # The test set's sampling noise, which no number of seeds averages away.
    accuracy = np.mean([r["test_accuracy"] for r in finals])
    floors = {
        "accuracy_gap": float(np.sqrt(2.0 * accuracy * (1.0 - accuracy) / n_test)),
        "loss_gap": float(
            np.sqrt(2.0 / n_test) * np.mean([r["final_test_loss_std"] for r in finals])
        ),
    }
    comparisons = {}
    for first, second in (
        ("BN, no dropout", "plain"),
        ("dropout, no BN", "plain"),
        ("BN, no dropout", "dropout, no BN"),
    ):
        by_variant_pair = (by_variant[first], by_variant[second])
        for key in ("accuracy_gap", "loss_gap"):
            differences = [a[key] - b[key] for a, b in zip(*by_variant_pair)]
            comparisons[(first, second, key)] = paired(differences, floors[key])
    return summary, comparisons


def paired(differences, floor):
    """`(mean, error, sign)` of paired differences, by the verdict rule.

    The error is the larger of the spread over seeds and `floor`; the sign
    is +1 or -1 when the mean exceeds twice the error (two seeds at least).
    """
    differences = np.array(differences, dtype=float)
    mean = float(differences.mean()) if len(differences) else float("nan")
    if len(differences) < 2 or not np.all(np.isfinite(differences)):
        return mean, float("nan"), 0
    error = max(float(differences.std(ddof=1) / np.sqrt(len(differences))), floor)
    return mean, error, int(np.sign(mean)) if abs(mean) > 2 * error else 0


def report(summary, comparisons):
    for entry in summary:
        print(
            f"{entry['variant']}: train accuracy {entry['train_accuracy']:.4f}, "
            f"test accuracy {entry['test_accuracy']:.4f}, accuracy gap "
            f"{entry['accuracy_gap']:.4f} +- {entry['accuracy_gap_std']:.4f}, "
            f"loss gap {entry['loss_gap']:.3f} +- {entry['loss_gap_std']:.3f}"
        )
    words = {-1: "clearly smaller than", 1: "clearly larger than", 0: "not clearly"}
    for (first, second, key), (mean, error, sign) in comparisons.items():
        relation = words[sign] + (" different from" if sign == 0 else "")
        print(
            f"  {key.replace('_', ' ')}: {first} {relation} {second} "
            f"({mean:+.4f} +- {error:.4f})"
        )
    bn_sign = comparisons[("BN, no dropout", "plain", "accuracy_gap")][2]
    if bn_sign == -1:
        print(
            "The claim held: BN alone gave a clearly smaller train-test accuracy "
            "gap than the plain network."
        )
    else:
        print(
            "The claim did NOT hold on this data: BN alone did not give a "
            "clearly smaller train-test accuracy gap than the plain network."
        )


def plot(rows, summary, n_test, path):
    figure, axes = plt.subplots(1, 4, figsize=(19, 4.4), layout="constrained")
    colors = dict(zip(VARIANTS, _common.COLORS))
    for variant in VARIANTS:
        runs = [r for r in rows if r["variant"] == variant]
        epochs = sorted({r["epoch"] for r in runs})
        style = dict(color=colors[variant], label=variant)

        def mean_curve(key, runs=runs, epochs=epochs):
            return [np.mean([r[key] for r in runs if r["epoch"] == e]) for e in epochs]

        axes[0].plot(epochs, mean_curve("test_accuracy"), **style)
        axes[0].plot(
            epochs, mean_curve("train_accuracy"), linestyle=":", color=colors[variant]
        )
        axes[1].plot(epochs, mean_curve("accuracy_gap"), **style)
        axes[2].plot(epochs, mean_curve("loss_gap"), **style)
    names = [entry["variant"] for entry in summary]
    finals = final_rows(rows)
    for position, variant in enumerate(names):
        gaps = [r["accuracy_gap"] for r in finals if r["variant"] == variant]
        accuracy = np.mean(
            [r["test_accuracy"] for r in finals if r["variant"] == variant]
        )
        axes[3].bar(
            position,
            np.mean(gaps),
            yerr=np.sqrt(accuracy * (1 - accuracy) / n_test),
            capsize=4,
            color=colors[variant],
            alpha=0.8,
        )
        axes[3].plot([position] * len(gaps), gaps, "o", color="black", markersize=4)
    axes[0].plot([], [], linestyle=":", color="gray", label="dotted: training set")
    axes[0].set(
        title="(a) accuracy per epoch (inference mode)",
        xlabel="epoch",
        ylabel="accuracy, mean over seeds (solid: test)",
        ylim=(0.9, 1.005),
    )
    axes[1].set(
        title="(b) train - test accuracy per epoch",
        xlabel="epoch",
        ylabel="accuracy gap, mean over seeds",
    )
    axes[2].set(
        title="(c) test - train loss per epoch",
        xlabel="epoch",
        ylabel="loss gap, mean over seeds",
    )
    axes[3].set(
        title="(d) final accuracy gap (points: seeds)",
        ylabel=f"gap; error bar: s.e. of a test accuracy on {n_test} images",
        xticks=range(len(names)),
        xticklabels=names,
    )
    _common.save_figure(figure, path, legend=[axes[0]])


def main(args):
    data = _common.start_run(args)
    if args.quick:
        data = data.shrink(256, 128)
    runs = [(args.seed + s, v) for s in range(args.seeds) for v in VARIANTS]
    rows = []
    for index, (seed, variant) in enumerate(runs, start=1):
        run = train(data, variant, args, seed)
        rows += run
        _common.announce(
            index,
            len(runs),
            f"{variant}, seed {seed}: {args.epochs} epochs, train accuracy "
            f"{run[-1]['train_accuracy']:.4f}, test accuracy "
            f"{run[-1]['test_accuracy']:.4f}",
        )
    _common.write_csv(args.out / "bn_regularization.csv", rows)
    summary, comparisons = summarize(rows, len(data.x_test))
    plot(rows, summary, len(data.x_test), args.out / "bn_regularization.png")
    _common.print_table(
        summary,
        ["variant", "train_accuracy", "test_accuracy", "accuracy_gap", "loss_gap"],
    )
    with _common.verdicts(args):
        report(summary, comparisons)
    _common.print_wall_time(args)


if __name__ == "__main__":
    main(ARGS)
