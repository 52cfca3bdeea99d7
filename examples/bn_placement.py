"""BN before or after the activation: Dense -> BN -> ReLU against Dense -> ReLU -> BN.

The lecture notes argue for normalizing before the ReLU: the ReLU is
asymmetric (it zeroes every negative input), so its input should be the
centred, scaled output of BN, and BN after it would normalize a half-zero,
skewed distribution. This script trains the same ReLU MLP (3 hidden layers of
128 units) both ways, over several seeds and SGD learning rates, and measures
after a fixed number of epochs

  - the final test accuracy and training loss (inference mode), and the
    epochs needed to reach 95% test accuracy;
  - the fraction of ReLU units active (input > 0) per layer, on the test
    images, the quantity behind the argument.

The figure plots (a) final test accuracy and (b) final training loss against
the learning rate, (c) test accuracy per epoch at the middle rate, (d) the
active fraction per layer.

Verdict rule, per learning rate and metric (final test accuracy, log10 of the
final training loss, epochs to 95%): one placement is better when the mean
over seeds of the paired difference (same seed) exceeds twice its standard
error; otherwise there is no clear difference. For test accuracy that error
is at least the test set's sampling noise, `sqrt(2 p (1 - p) / n)` for an
accuracy `p` on `n` test images, which no number of seeds averages away.
For each metric, the claim holds when "before" is better at most rates and
"after" at none. The figure (a PNG) and a CSV go to --out.
"""

import _common


def parse_args(argv=None):
    parser = _common.ExampleParser("bn_placement", __doc__)
    parser.add_size("--epochs", "epochs per run", full=20, quick=1)
    parser.add_size("--seeds", "seeds per learning rate", full=4, quick=1)
    return parser.parse_args(argv)


# Parse before importing TensorFlow: --help and bad arguments answer at once.
ARGS = parse_args() if __name__ == "__main__" else None

import keras  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from keras_bn import BatchNormalization  # noqa: E402
from keras_bn.losses import SoftmaxCrossEntropy  # noqa: E402

HIDDEN_UNITS = 128
HIDDEN_LAYERS = 3
BATCH_SIZE = 64
FULL_RATES = (0.01, 0.05, 0.25)
QUICK_RATES = (0.05,)
PLACEMENTS = ("before", "after")
TARGET_ACCURACY = 0.95
# (metric, whether higher is better, how the summary names it)
METRICS = (
    ("test_accuracy", True, "final test accuracy"),
    ("log10_train_loss", False, "log10 of the final training loss"),
    ("epochs_to_target", False, f"epochs to {TARGET_ACCURACY:.0%} test accuracy"),
)
LABELS = {"before": "Dense -> BN -> ReLU", "after": "Dense -> ReLU -> BN"}


def build_mlp(input_dim, placement):
    """Three hidden layers with BN before or after each ReLU, then 10 logits."""
    inputs = keras.Input((input_dim,))
    hidden = inputs
    for index in range(1, HIDDEN_LAYERS + 1):
        # Before the ReLU, BN's beta replaces the Dense bias; after it, the
        # bias shifts the ReLU's input and is kept.
        hidden = keras.layers.Dense(
            HIDDEN_UNITS, use_bias=placement == "after", name=f"dense_{index}"
        )(hidden)
        if placement == "before":
            hidden = BatchNormalization(name=f"bn_{index}")(hidden)
        hidden = keras.layers.ReLU(name=f"relu_{index}")(hidden)
        if placement == "after":
            hidden = BatchNormalization(name=f"bn_{index}")(hidden)
    logits = keras.layers.Dense(10, name="logits")(hidden)
    return keras.Model(inputs, logits)


def active_fractions(model, x):
    """Per hidden layer, the fraction of ReLU inputs > 0 (inference mode)."""
    relu_inputs = keras.Model(
        model.inputs,
        [model.get_layer(f"relu_{i}").input for i in range(1, HIDDEN_LAYERS + 1)],
    )
    values = relu_inputs.predict(x, batch_size=len(x), verbose=0)
    return [float(np.mean(value > 0)) for value in values]


def train(data, placement, learning_rate, epochs, seed):
    """Trains one network; returns a dict of its results."""
    x_train, y_train, x_test, y_test = data.flat()
    keras.utils.set_random_seed(seed)
    model = build_mlp(x_train.shape[1], placement)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate, momentum=0.9),
        loss=SoftmaxCrossEntropy(sparse=True),
        metrics=["accuracy"],
    )
    history = model.fit(
        x_train,
        y_train,
        batch_size=BATCH_SIZE,
        epochs=epochs,
        validation_data=(x_test, y_test),
        verbose=0,
    ).history
    train_loss, _ = model.evaluate(x_train, y_train, verbose=0)
    _, test_accuracy = model.evaluate(x_test, y_test, verbose=0)
    return {
        "placement": placement,
        "learning_rate": learning_rate,
        "seed": seed,
        "train_loss": _finite_or_inf(train_loss),
        "log10_train_loss": float(np.log10(train_loss)),
        "test_accuracy": test_accuracy,
        "epochs_to_target": _epochs_to(history["val_accuracy"], TARGET_ACCURACY),
        "test_accuracy_per_epoch": history["val_accuracy"],
        **{
            f"active_fraction_{i}": fraction
            for i, fraction in enumerate(active_fractions(model, x_test), start=1)
        },
    }


def _epochs_to(accuracies, target):
    """First epoch with test accuracy >= target; epochs + 1 if never."""
    reached = [epoch for epoch, a in enumerate(accuracies, start=1) if a >= target]
    return reached[0] if reached else len(accuracies) + 1


def _finite_or_inf(value):
    return float(value) if np.isfinite(value) else float("inf")


def paired_verdict(rows, rate, metric, higher_is_better, floor=0.0):
    """'before', 'after' or 'no clear difference' at one rate, by the stated rule."""
    by_seed = {}
    for row in rows:
        if row["learning_rate"] == rate:
            by_seed.setdefault(row["seed"], {})[row["placement"]] = row[metric]
    advantages = np.array([runs["before"] - runs["after"] for runs in by_seed.values()])
    mean = float(advantages.mean()) if len(advantages) else float("nan")
    error, sign = float("nan"), 0
    if len(advantages) > 1 and np.all(np.isfinite(advantages)):
        spread = float(advantages.std(ddof=1) / np.sqrt(len(advantages)))
        error = max(spread, floor)
        sign = int(np.sign(mean)) if abs(mean) > 2 * error else 0
    if not higher_is_better:
        mean, sign = 0.0 - mean, -sign
    better = {1: "before", -1: "after", 0: "no clear difference"}[sign]
    return better, mean, error


def summarize(rows, rates, n_test):
    summary = []
    for rate in rates:
        entry = {"learning_rate": rate}
        for placement in PLACEMENTS:
            runs = [r for r in rows if r["learning_rate"] == rate]
            runs = [r for r in runs if r["placement"] == placement]
            entry[f"{placement}_test_accuracy"] = float(
                np.mean([r["test_accuracy"] for r in runs])
            )
            entry[f"{placement}_train_loss"] = float(
                np.median([r["train_loss"] for r in runs])
            )
            entry[f"{placement}_epochs_to_target"] = float(
                np.mean([r["epochs_to_target"] for r in runs])
            )
            # A run that ends above chance level (log 10) did not train.
            entry[f"{placement}_failed_runs"] = sum(
                r["train_loss"] > np.log(10) for r in runs
            )
        accuracy = np.mean(
            [r["test_accuracy"] for r in rows if r["learning_rate"] == rate]
        )
        # The test set's sampling noise for two accuracies near `accuracy`.
        noise = float(np.sqrt(2.0 * accuracy * (1.0 - accuracy) / n_test))
        floors = {"test_accuracy": noise}
        for metric, higher, _ in METRICS:
            better, mean, error = paired_verdict(
                rows, rate, metric, higher, floors.get(metric, 0.0)
            )
            entry[f"{metric}_better"] = better
            entry[f"{metric}_advantage_of_before"] = mean
            entry[f"{metric}_advantage_error"] = error
        summary.append(entry)
    return summary


def report(summary):
    """Prints per metric and rate which placement was better, and the verdicts."""
    for metric, _, name in METRICS:
        parts = [
            f"{entry['learning_rate']:g}: {_better_words(entry[f'{metric}_better'])} "
            f"(before's advantage {entry[f'{metric}_advantage_of_before']:+.3g} "
            f"+- {entry[f'{metric}_advantage_error']:.2g})"
            for entry in summary
        ]
        print(f"{name}, by learning rate: " + "; ".join(parts) + ".")
    for entry in summary:
        failed = [entry[f"{p}_failed_runs"] for p in PLACEMENTS]
        if any(failed):
            print(
                f"At learning rate {entry['learning_rate']:g}, runs that did not "
                f"train (final loss above log 10): {failed[0]} before, "
                f"{failed[1]} after."
            )
    for metric, _, name in METRICS:
        verdicts = [entry[f"{metric}_better"] for entry in summary]
        before, after = verdicts.count("before"), verdicts.count("after")
        held = before > len(verdicts) / 2 and after == 0
        print(
            f"{name}: the claim {'held' if held else 'did NOT hold'} (BN before "
            f"the ReLU clearly better at {before} of {len(verdicts)} learning "
            f"rates, after it at {after})."
        )


def _better_words(better):
    if better == "no clear difference":
        return better
    return f"{better} better"


def plot(rows, summary, rates, path):
    figure, axes = plt.subplots(1, 4, figsize=(19, 4.4), layout="constrained")
    colors = dict(zip(PLACEMENTS, _common.COLORS))
    middle = rates[len(rates) // 2]
    for placement in PLACEMENTS:
        style = dict(color=colors[placement], label=LABELS[placement])
        runs = [row for row in rows if row["placement"] == placement]
        for ax, metric in ((axes[0], "test_accuracy"), (axes[1], "train_loss")):
            ax.plot(
                [r["learning_rate"] for r in runs],
                [r[metric] for r in runs],
                "o",
                alpha=0.5,
                color=colors[placement],
            )
        axes[0].plot(
            rates, [e[f"{placement}_test_accuracy"] for e in summary], "-", **style
        )
        axes[1].plot(
            rates, [e[f"{placement}_train_loss"] for e in summary], "-", **style
        )
        curves = np.array(
            [r["test_accuracy_per_epoch"] for r in runs if r["learning_rate"] == middle]
        )
        epochs = np.arange(1, curves.shape[1] + 1)
        axes[2].plot(epochs, curves.mean(axis=0), "o-", markersize=3, **style)
        layers = np.arange(1, HIDDEN_LAYERS + 1)
        fractions = [
            np.mean(
                [
                    r[f"active_fraction_{layer}"]
                    for r in runs
                    if r["learning_rate"] == middle
                ]
            )
            for layer in layers
        ]
        offset = -0.2 if placement == "before" else 0.2
        axes[3].bar(layers + offset, fractions, width=0.4, color=colors[placement])
    axes[0].set(
        title="(a) final test accuracy (points: seeds)",
        xlabel="SGD learning rate (momentum 0.9)",
        ylabel="test accuracy (line: mean over seeds)",
        xscale="log",
    )
    axes[1].set(
        title="(b) final training loss (points: seeds)",
        xlabel="SGD learning rate (momentum 0.9)",
        ylabel="training loss (line: median; log scale)",
        xscale="log",
        yscale="log",
    )
    axes[2].axhline(
        TARGET_ACCURACY,
        **_common.THRESHOLD_STYLE,
        label=f"{TARGET_ACCURACY:.0%} test accuracy",
    )
    axes[2].set(
        title=f"(c) test accuracy per epoch, learning rate {middle:g}",
        xlabel="epoch",
        ylabel="test accuracy (mean over seeds)",
    )
    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[3].axhline(0.5, color="gray", linestyle="--", linewidth=1, label="half")
    axes[3].set(
        title=f"(d) active ReLU units, test images, rate {middle:g}",
        xlabel="hidden layer",
        ylabel="fraction of ReLU inputs > 0",
        xticks=layers,
        ylim=(0, 1),
    )
    _common.save_figure(figure, path, legend=[axes[0], axes[2], axes[3]])


def main(args):
    rates = QUICK_RATES if args.quick else FULL_RATES
    data = _common.start_run(args)
    if args.quick:
        data = data.shrink(256, 128)
    runs = [
        (rate, args.seed + offset, placement)
        for rate in rates
        for offset in range(args.seeds)
        for placement in PLACEMENTS
    ]
    rows = []
    for index, (rate, seed, placement) in enumerate(runs, start=1):
        row = train(data, placement, rate, args.epochs, seed)
        rows.append(row)
        _common.announce(
            index,
            len(runs),
            f"{LABELS[placement]}, learning rate {rate:g}, seed {seed}: test "
            f"accuracy {row['test_accuracy']:.3f}, training loss "
            f"{row['train_loss']:.3g}",
        )
    _common.write_csv(
        args.out / "bn_placement.csv",
        [
            {k: v for k, v in row.items() if k != "test_accuracy_per_epoch"}
            for row in rows
        ],
    )
    summary = summarize(rows, rates, len(data.x_test))
    plot(rows, summary, rates, args.out / "bn_placement.png")
    _common.print_table(
        summary,
        [
            "learning_rate",
            "before_test_accuracy",
            "after_test_accuracy",
            "before_train_loss",
            "after_train_loss",
            "before_epochs_to_target",
            "after_epochs_to_target",
        ],
    )
    with _common.verdicts(args):
        report(summary)
    _common.print_wall_time(args)


if __name__ == "__main__":
    main(ARGS)
