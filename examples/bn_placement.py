"""BN before or after the activation: Dense -> BN -> ReLU against Dense -> ReLU -> BN.

The lecture notes argue for normalizing before the ReLU: the ReLU is
asymmetric (it zeroes every negative input), so its input should be the
centred, scaled output of BN, and BN after it would normalize a half-zero,
skewed distribution. This script trains the same ReLU MLP (3 hidden layers of
128 units) both ways, over several seeds and SGD learning rates, and measures
after a fixed number of epochs

  - the test accuracy and the training loss (inference mode);
  - the fraction of ReLU units active (input > 0) per layer, on the test
    images, the quantity behind the argument.

The figure plots (a) test accuracy and (b) training loss against the learning
rate (mean and spread over seeds), (c) test accuracy per epoch at the middle
rate, (d) the active fraction per layer.

Verdict rule, per learning rate and metric: one placement is better when the
mean over seeds of the paired difference (same seed, same initial Dense
weights) exceeds twice its standard error; otherwise there is no clear
difference. The claim holds when "before" is better at most rates and
"after" at none, for test accuracy. The figure (a PNG) and a CSV go to --out.
"""

import _common


def parse_args(argv=None):
    parser = _common.make_parser("bn_placement", __doc__)
    parser.add_size("--epochs", "epochs per run", full=20, quick=1)
    parser.add_size("--seeds", "seeds per learning rate", full=4, quick=1)
    return parser.parse_args(argv)


# Parse before importing TensorFlow: --help and bad arguments answer at once.
ARGS = parse_args() if __name__ == "__main__" else None

import keras  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from keras_bn import BatchNormalization  # noqa: E402
from keras_bn.losses import SoftmaxCrossEntropy  # noqa: E402

HIDDEN_UNITS = 128
HIDDEN_LAYERS = 3
BATCH_SIZE = 64
FULL_RATES = (0.01, 0.05, 0.25)
QUICK_RATES = (0.05,)
PLACEMENTS = ("before", "after")
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
        "test_accuracy": test_accuracy,
        "test_accuracy_per_epoch": history["val_accuracy"],
        **{
            f"active_fraction_{i}": fraction
            for i, fraction in enumerate(active_fractions(model, x_test), start=1)
        },
    }


def _finite_or_inf(value):
    return float(value) if np.isfinite(value) else float("inf")


def paired_verdict(rows, rate, metric, higher_is_better):
    """'before', 'after' or 'no clear difference' at one rate, by the stated rule."""
    by_seed = {}
    for row in rows:
        if row["learning_rate"] == rate:
            by_seed.setdefault(row["seed"], {})[row["placement"]] = row[metric]
    differences = np.array(
        [runs["before"] - runs["after"] for runs in by_seed.values()]
    )
    if not higher_is_better:
        differences = -differences
    if not np.all(np.isfinite(differences)):
        return "no clear difference", float("nan"), float("nan")
    mean = float(differences.mean())
    error = float(differences.std(ddof=1) / np.sqrt(len(differences)))
    if len(differences) > 1 and abs(mean) > 2 * error:
        return ("before" if mean > 0 else "after"), mean, error
    return "no clear difference", mean, error


def summarize(rows, rates):
    summary = []
    for rate in rates:
        entry = {"learning_rate": rate}
        for placement in PLACEMENTS:
            runs = [r for r in rows if r["learning_rate"] == rate]
            runs = [r for r in runs if r["placement"] == placement]
            mean, std = _common.mean_and_spread([r["test_accuracy"] for r in runs])
            entry[f"{placement}_test_accuracy"] = mean
            entry[f"{placement}_test_accuracy_std"] = std
            entry[f"{placement}_train_loss"] = float(
                np.median([r["train_loss"] for r in runs])
            )
        for metric, higher in (("test_accuracy", True), ("train_loss", False)):
            better, mean, error = paired_verdict(rows, rate, metric, higher)
            entry[f"{metric}_better"] = better
            entry[f"{metric}_advantage_of_before"] = mean
            entry[f"{metric}_advantage_error"] = error
        summary.append(entry)
    return summary


def report(summary):
    for entry in summary:
        print(
            f"learning rate {entry['learning_rate']:g}: test accuracy before "
            f"{entry['before_test_accuracy']:.4f}, after "
            f"{entry['after_test_accuracy']:.4f} (paired advantage of before "
            f"{entry['test_accuracy_advantage_of_before']:+.4f} +- "
            f"{entry['test_accuracy_advantage_error']:.4f}): "
            f"{_better_words(entry['test_accuracy_better'])}; training loss: "
            f"{_better_words(entry['train_loss_better'])}."
        )
    verdicts = [entry["test_accuracy_better"] for entry in summary]
    before, after = verdicts.count("before"), verdicts.count("after")
    if before > len(verdicts) / 2 and after == 0:
        print(
            f"The claim held: BN before the ReLU gave the better test accuracy "
            f"at {before} of {len(verdicts)} learning rates, after it at none."
        )
    else:
        print(
            "The claim did NOT hold on this data: BN before the ReLU was "
            f"better at {before} of {len(verdicts)} learning rates, after it "
            f"at {after}, no clear difference at {len(verdicts) - before - after}."
        )


def _better_words(better):
    if better == "no clear difference":
        return better
    return f"{LABELS[better]} better"


def plot(rows, summary, rates, path):
    figure, axes = plt.subplots(1, 4, figsize=(19, 4.4), layout="constrained")
    colors = dict(zip(PLACEMENTS, _common.COLORS))
    for placement in PLACEMENTS:
        style = dict(color=colors[placement], label=LABELS[placement])
        axes[0].errorbar(
            rates,
            [entry[f"{placement}_test_accuracy"] for entry in summary],
            yerr=[entry[f"{placement}_test_accuracy_std"] for entry in summary],
            fmt="o-",
            capsize=3,
            **style,
        )
        for row in rows:
            if row["placement"] == placement:
                axes[1].plot(
                    row["learning_rate"], row["train_loss"], "o", alpha=0.6, **style
                )
        middle = rates[len(rates) // 2]
        curves = np.array(
            [
                row["test_accuracy_per_epoch"]
                for row in rows
                if row["placement"] == placement and row["learning_rate"] == middle
            ]
        )
        epochs = np.arange(1, curves.shape[1] + 1)
        axes[2].plot(epochs, curves.mean(axis=0), "o-", markersize=3, **style)
        layers = np.arange(1, HIDDEN_LAYERS + 1)
        fractions = [
            np.mean(
                [
                    row[f"active_fraction_{layer}"]
                    for row in rows
                    if row["placement"] == placement and row["learning_rate"] == middle
                ]
            )
            for layer in layers
        ]
        offset = -0.2 if placement == "before" else 0.2
        axes[3].bar(layers + offset, fractions, width=0.4, **style)
    axes[0].set(
        title="(a) test accuracy after training",
        xlabel="SGD learning rate (momentum 0.9)",
        ylabel="test accuracy (mean +- std over seeds)",
        xscale="log",
    )
    axes[1].set(
        title="(b) training loss after training",
        xlabel="SGD learning rate (momentum 0.9)",
        ylabel="training loss, one point per seed (log scale)",
        xscale="log",
        yscale="log",
    )
    axes[2].set(
        title=f"(c) test accuracy per epoch, rate {middle:g}",
        xlabel="epoch",
        ylabel="test accuracy (mean over seeds)",
    )
    axes[3].axhline(0.5, **_common.THRESHOLD_STYLE, label="half of the units")
    axes[3].set(
        title=f"(d) ReLU units active on test images, rate {middle:g}",
        xlabel="hidden layer",
        ylabel="fraction of ReLU inputs > 0",
        xticks=layers,
        ylim=(0, 1),
    )
    _common.legend_below(figure, axes[2], axes[3])
    _common.save_figure(figure, path)


def main(args):
    rates = QUICK_RATES if args.quick else FULL_RATES
    clock = _common.Stopwatch()
    data = _common.prepare_run(args)
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
    summary = summarize(rows, rates)
    plot(rows, summary, rates, args.out / "bn_placement.png")
    _common.print_table(
        summary,
        [
            "learning_rate",
            "before_test_accuracy",
            "after_test_accuracy",
            "test_accuracy_better",
            "before_train_loss",
            "after_train_loss",
            "train_loss_better",
        ],
    )
    report(summary)
    print(f"wall time: {clock.seconds():.0f} s; figure and CSV in {args.out}")


if __name__ == "__main__":
    main(ARGS)
