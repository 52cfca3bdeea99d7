"""Why gamma and beta: BN with and without its learned scale and offset.

Batch normalization gives every unit's input mean 0 and variance 1. The
lecture notes say that without the learned scale `gamma` and offset `beta`
after it the layer loses representation power: a sigmoid fed inputs of mean
0 and variance 1 works mostly in its near-linear middle, and cannot move
away from it. `gamma` and `beta` let the network undo the normalization
wherever that helps, up to recovering the identity.

This script trains the same sigmoid MLP (3 hidden layers of 32 units,
Dense -> BN -> sigmoid) on the digit images with the full layer and with
`keras_bn.BatchNormalization(center=False, scale=False)`, over several seeds,
with Adam, and measures the training loss (what the network can fit, in
inference mode after training), the test accuracy, what the learned gamma
and beta become, and how much of each sigmoid's saturating range
(|input| > 2) the network uses on the test images.

Verdict rule: a variant is better when the mean over seeds of the paired
difference (same seed, same initial Dense weights) exceeds twice its standard
error, for log10 of the training loss and, separately, for test accuracy
(whose error is at least the test set's sampling noise, `sqrt(2 p (1 - p) /
n)` for an accuracy `p` on `n` images). The claim holds if the full layer
reaches the clearly lower training loss. The
figure (a PNG) and a CSV go to --out.
"""

import _common


def parse_args(argv=None):
    parser = _common.ExampleParser("gamma_beta", __doc__)
    parser.add_size("--epochs", "epochs per run", full=40, quick=2)
    parser.add_size("--seeds", "seeds per variant", full=3, quick=1)
    return parser.parse_args(argv)


# Parse before importing TensorFlow: --help and bad arguments answer at once.
ARGS = parse_args() if __name__ == "__main__" else None

import keras  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from keras_bn import BatchNormalization  # noqa: E402
from keras_bn.losses import SoftmaxCrossEntropy  # noqa: E402

HIDDEN_UNITS = 32
HIDDEN_LAYERS = 3
BATCH_SIZE = 64
LEARNING_RATE = 1e-2
SATURATING = 2.0  # |sigmoid input| beyond this: sigmoid' < 0.105, a quarter of its peak
VARIANTS = {
    "with gamma and beta": dict(center=True, scale=True),
    "center=False, scale=False": dict(center=False, scale=False),
}


def build_mlp(input_dim, variant):
    inputs = keras.Input((input_dim,))
    hidden = inputs
    for index in range(1, HIDDEN_LAYERS + 1):
        hidden = keras.layers.Dense(
            HIDDEN_UNITS, use_bias=False, name=f"dense_{index}"
        )(hidden)
        hidden = BatchNormalization(**VARIANTS[variant], name=f"bn_{index}")(hidden)
        hidden = keras.layers.Activation("sigmoid", name=f"sigmoid_{index}")(hidden)
    logits = keras.layers.Dense(10, name="logits")(hidden)
    return keras.Model(inputs, logits)


def sigmoid_inputs(model, x):
    """Each hidden layer's sigmoid inputs on `x`, inference mode: a list of arrays."""
    probe = keras.Model(
        model.inputs,
        [model.get_layer(f"sigmoid_{i}").input for i in range(1, HIDDEN_LAYERS + 1)],
    )
    return probe.predict(x, batch_size=len(x), verbose=0)


def train(data, variant, epochs, seed):
    x_train, y_train, x_test, y_test = data.flat()
    keras.utils.set_random_seed(seed)
    model = build_mlp(x_train.shape[1], variant)
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
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
    train_loss, train_accuracy = model.evaluate(x_train, y_train, verbose=0)
    test_loss, test_accuracy = model.evaluate(x_test, y_test, verbose=0)
    inputs = sigmoid_inputs(model, x_test)
    layers = [model.get_layer(f"bn_{i}") for i in range(1, HIDDEN_LAYERS + 1)]
    return {
        "variant": variant,
        "seed": seed,
        "train_loss": train_loss,
        "train_accuracy": train_accuracy,
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
        **{
            f"saturating_fraction_{i}": float(np.mean(np.abs(v) > SATURATING))
            for i, v in enumerate(inputs, start=1)
        },
        # Kept out of the CSV: per-epoch curves, weights, the last layer's inputs.
        "curves": history,
        "gammas": [
            layer.gamma.numpy() if layer.scale else np.ones(HIDDEN_UNITS)
            for layer in layers
        ],
        "betas": [
            layer.beta.numpy() if layer.center else np.zeros(HIDDEN_UNITS)
            for layer in layers
        ],
        "last_inputs": inputs[-1].ravel(),
    }


def compare(rows, n_test):
    """The paired comparisons of the stated rule: full minus reduced layer."""
    full, reduced = (
        sorted((r for r in rows if r["variant"] == v), key=lambda r: r["seed"])
        for v in VARIANTS
    )
    accuracy = np.mean([r["test_accuracy"] for r in rows])
    # The test set's sampling noise for two accuracies near `accuracy`.
    noise = float(np.sqrt(2.0 * accuracy * (1.0 - accuracy) / n_test))
    results = {}
    for metric, transform, floor in (
        ("log10_train_loss", lambda r: np.log10(r["train_loss"]), 0.0),
        ("test_accuracy", lambda r: r["test_accuracy"], noise),
    ):
        differences = np.array(
            [transform(f) - transform(r) for f, r in zip(full, reduced)]
        )
        mean = float(differences.mean()) if len(differences) else float("nan")
        # Two seeds at least, and the differences finite, or no standard error.
        seeds = len(differences) > 1 and np.all(np.isfinite(differences))
        spread = differences.std(ddof=1) / np.sqrt(len(differences)) if seeds else None
        error = max(float(spread), floor) if seeds else float("nan")
        clear = abs(mean) > 2 * error  # False when the error is nan
        results[metric] = (mean, error, int(np.sign(mean)) if clear else 0)
    return results


def report(rows, comparison):
    for variant in VARIANTS:
        runs = [r for r in rows if r["variant"] == variant]
        loss = np.median([r["train_loss"] for r in runs])
        accuracy = float(np.mean([r["test_accuracy"] for r in runs]))
        spread = float(np.std([r["test_accuracy"] for r in runs]))
        saturating = np.mean(
            [
                r[f"saturating_fraction_{i}"]
                for r in runs
                for i in range(1, HIDDEN_LAYERS + 1)
            ]
        )
        print(
            f"{variant}: training loss (median over seeds) {loss:.3g}, test "
            f"accuracy {accuracy:.4f} +- {spread:.4f}; {saturating:.1%} of "
            f"the sigmoid inputs have |input| > {SATURATING:g}."
        )
    mean, error, sign = comparison["log10_train_loss"]
    words = {-1: "clearly lower", 1: "clearly higher", 0: "not clearly different"}
    print(
        "With gamma and beta the training loss was "
        f"{words[sign]} (log10 difference {mean:+.2f} +- {error:.2f}, a factor "
        f"{10**-mean:.3g} lower)."
    )
    mean, error, sign = comparison["test_accuracy"]
    words = {1: "clearly higher", -1: "clearly lower", 0: "not clearly different"}
    print(
        f"Test accuracy with gamma and beta: {words[sign]} ({mean:+.4f} +- "
        f"{error:.4f})."
    )
    held = comparison["log10_train_loss"][2] == -1
    print(
        "The claim "
        + ("held" if held else "did NOT hold")
        + ": without gamma and beta the network "
        + ("fit" if held else "did not clearly fit")
        + " the training set less well."
    )


def plot(rows, path):
    figure, axes = plt.subplots(2, 3, figsize=(16, 8.4), layout="constrained")
    axes = axes.ravel()
    colors = dict(zip(VARIANTS, _common.COLORS))
    for variant in VARIANTS:
        runs = [r for r in rows if r["variant"] == variant]
        style = dict(color=colors[variant], label=variant)
        losses = np.mean([r["curves"]["loss"] for r in runs], axis=0)
        accuracies = np.mean([r["curves"]["val_accuracy"] for r in runs], axis=0)
        epochs = np.arange(1, len(losses) + 1)
        axes[0].plot(epochs, losses, **style)
        axes[1].plot(epochs, accuracies, **style)
        axes[4].hist(
            runs[0]["last_inputs"],
            bins=60,
            density=True,
            histtype="step",
            linewidth=1.5,
            **style,
        )
        fractions = [
            np.mean([r[f"saturating_fraction_{i}"] for r in runs])
            for i in range(1, HIDDEN_LAYERS + 1)
        ]
        offset = -0.2 if variant == next(iter(VARIANTS)) else 0.2
        axes[5].bar(np.arange(1, HIDDEN_LAYERS + 1) + offset, fractions, 0.4, **style)
    full = next(r for r in rows if r["variant"] == next(iter(VARIANTS)))
    rng = np.random.default_rng(0)
    for ax, values, start, name in (
        (axes[2], full["gammas"], 1.0, "gamma"),
        (axes[3], full["betas"], 0.0, "beta"),
    ):
        for layer, layer_values in enumerate(values, start=1):
            jitter = rng.uniform(-0.15, 0.15, len(layer_values))
            ax.plot(
                layer + jitter,
                layer_values,
                "o",
                markersize=4,
                color=colors[next(iter(VARIANTS))],
                alpha=0.7,
            )
        ax.axhline(start, **_common.THRESHOLD_STYLE, label="initial value")
        ax.set(
            title=f"({'cd'[name == 'beta']}) learned {name}, one point per unit "
            f"(seed {full['seed']})",
            xlabel="hidden layer",
            ylabel=f"{name} after training",
            xticks=range(1, HIDDEN_LAYERS + 1),
        )
    axes[0].set(
        title="(a) training loss per epoch (training mode)",
        xlabel="epoch",
        ylabel="training loss, mean over seeds (log scale)",
        yscale="log",
    )
    axes[1].set(
        title="(b) test accuracy per epoch",
        xlabel="epoch",
        ylabel="test accuracy, mean over seeds",
    )
    curve = np.linspace(*axes[4].get_xlim(), 200)
    twin = axes[4].twinx()
    twin.plot(
        curve, 1 / (1 + np.exp(-curve)), color="gray", linewidth=1, label="sigmoid"
    )
    twin.set(ylabel="sigmoid(input)", ylim=(0, 1))
    axes[4].set(
        title=f"(e) last layer's sigmoid inputs, test images (seed {full['seed']})",
        xlabel="sigmoid input",
        ylabel="density",
    )
    axes[5].axhline(
        0.0455,
        color="gray",
        linestyle="--",
        linewidth=1,
        label="a standard normal: 4.6%",
    )
    axes[5].set(
        title=f"(f) sigmoid inputs with |input| > {SATURATING:g} (saturating)",
        xlabel="hidden layer",
        ylabel="fraction of test-image inputs, mean over seeds",
        xticks=range(1, HIDDEN_LAYERS + 1),
    )
    _common.save_figure(figure, path, legend=[axes[0], axes[2], twin, axes[5]])


def main(args):
    data = _common.start_run(args)
    if args.quick:
        data = data.shrink(256, 128)
    runs = [(args.seed + s, variant) for s in range(args.seeds) for variant in VARIANTS]
    rows = []
    for index, (seed, variant) in enumerate(runs, start=1):
        row = train(data, variant, args.epochs, seed)
        rows.append(row)
        _common.announce(
            index,
            len(runs),
            f"{variant}, seed {seed}: training loss {row['train_loss']:.3g}, "
            f"test accuracy {row['test_accuracy']:.3f}",
        )
    hidden = ("curves", "gammas", "betas", "last_inputs")
    table = [{k: v for k, v in row.items() if k not in hidden} for row in rows]
    for row, entry in zip(rows, table):
        for name in ("gammas", "betas"):
            for layer, values in enumerate(row[name], start=1):
                entry[f"{name[:-1]}_{layer}_mean"] = float(np.mean(values))
                entry[f"{name[:-1]}_{layer}_std"] = float(np.std(values))
    _common.write_csv(args.out / "gamma_beta.csv", table)
    plot(rows, args.out / "gamma_beta.png")
    _common.print_table(
        table, ["variant", "seed", "train_loss", "test_accuracy", "gamma_3_mean"]
    )
    with _common.verdicts(args):
        report(rows, compare(rows, len(data.x_test)))
    _common.print_wall_time(args)


if __name__ == "__main__":
    main(ARGS)
