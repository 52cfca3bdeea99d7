"""Batch normalization vs none: a ReLU MLP trained with Adam, across learning rates.

The same MLP (Dense -> [BN] -> ReLU, three times, then a linear layer of 10
logits) is trained with and without batch normalization, with the loss
`keras_bn.losses.SoftmaxCrossEntropy`. For each learning rate of a sweep
(1e-3 to 3e-1 by default) the script records the training loss and the test
loss and accuracy after every epoch, and plots

  (a) training loss and (b) test accuracy per epoch, at the lowest and the
      highest learning rate of the sweep;
  (c) final test accuracy against the learning rate.

Batch normalization should keep training stable at rates where the plain
network degrades. The figure (a PNG) and a CSV go to --out.
"""

import _common


def parse_args(argv=None):
    parser = _common.ExampleParser("bn_vs_plain", __doc__)
    parser.add_size("--epochs", "epochs per run", full=30, quick=2)
    return parser.parse_args(argv)


# Parse before importing TensorFlow: --help and bad arguments answer at once.
ARGS = parse_args() if __name__ == "__main__" else None

import keras  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from keras_bn import BatchNormalization  # noqa: E402
from keras_bn.losses import SoftmaxCrossEntropy  # noqa: E402

HIDDEN_UNITS = 256
HIDDEN_LAYERS = 3
BATCH_SIZE = 64
FULL_RATES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
QUICK_RATES = (1e-1,)
MODELS = ("plain", "BN")


def build_mlp(input_dim, use_bn):
    """Three ReLU layers; BN between each Dense and its ReLU if `use_bn`."""
    inputs = keras.Input((input_dim,))
    hidden = inputs
    for index in range(1, HIDDEN_LAYERS + 1):
        hidden = keras.layers.Dense(
            HIDDEN_UNITS, use_bias=not use_bn, name=f"dense_{index}"
        )(hidden)
        if use_bn:
            hidden = BatchNormalization(name=f"bn_{index}")(hidden)
        hidden = keras.layers.ReLU(name=f"relu_{index}")(hidden)
    logits = keras.layers.Dense(10, name="logits")(hidden)
    return keras.Model(inputs, logits)


def train(data, use_bn, learning_rate, epochs, seed):
    """Trains one network; returns one dict of numbers per epoch."""
    x_train, y_train, x_test, y_test = data.flat()
    keras.utils.set_random_seed(seed)
    model = build_mlp(x_train.shape[1], use_bn)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
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
    return [
        {
            "model": "BN" if use_bn else "plain",
            "learning_rate": learning_rate,
            "epoch": epoch + 1,
            "train_loss": history["loss"][epoch],
            "test_loss": history["val_loss"][epoch],
            "test_accuracy": history["val_accuracy"][epoch],
        }
        for epoch in range(epochs)
    ]


def final_accuracies(rows):
    """{(model, learning_rate): test accuracy after the last epoch}."""
    last_epoch = max(row["epoch"] for row in rows)
    return {
        (row["model"], row["learning_rate"]): row["test_accuracy"]
        for row in rows
        if row["epoch"] == last_epoch
    }


def plot(rows, rates, path):
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.4), layout="constrained")
    colors = dict(zip(MODELS, _common.COLORS))
    for rate, style in ((rates[0], "-"), (rates[-1], "--")):
        for model in MODELS:
            run = [
                r for r in rows if r["model"] == model and r["learning_rate"] == rate
            ]
            epochs = [r["epoch"] for r in run]
            label = f"{model}, lr={rate:g}"
            kwargs = dict(color=colors[model], linestyle=style, label=label)
            axes[0].plot(epochs, [r["train_loss"] for r in run], **kwargs)
            axes[1].plot(epochs, [r["test_accuracy"] for r in run], **kwargs)
    axes[0].set(
        title="(a) training loss",
        xlabel="epoch",
        ylabel="training loss (log scale)",
        yscale="log",
    )
    axes[1].set(
        title="(b) test accuracy",
        xlabel="epoch",
        ylabel="test accuracy",
        ylim=(0, 1),
    )
    finals = final_accuracies(rows)
    for model in MODELS:
        accuracies = [finals[(model, rate)] for rate in rates]
        axes[2].plot(
            rates, accuracies, "o-", color=colors[model], label=f"{model}, final"
        )
    axes[2].set(
        title="(c) final test accuracy vs learning rate",
        xlabel="Adam learning rate",
        ylabel="test accuracy after the last epoch",
        xscale="log",
        ylim=(0, 1),
    )
    _common.save_figure(figure, path, legend=[axes[0], axes[2]])


def report_effects(finals, rates, tolerance):
    """Prints the rates at which each model stays within `tolerance` of its best."""
    for model in MODELS:
        best = max(finals[(model, rate)] for rate in rates)
        good = [rate for rate in rates if finals[(model, rate)] >= best - tolerance]
        print(
            f"{model}: best final test accuracy {best:.3f}; within "
            f"{tolerance:.0%} of it at learning rates "
            f"{', '.join(f'{rate:g}' for rate in good)}"
        )
    top = rates[-1]
    gap = finals[("BN", top)] - finals[("plain", top)]
    if gap > 0:
        print(f"At the highest rate ({top:g}) BN is ahead by {gap:.3f} test accuracy.")
    else:
        print(f"BN's tolerance of high rates did not show at {top:g} (gap {gap:.3f}).")


def main(args):
    rates = QUICK_RATES if args.quick else FULL_RATES
    data = _common.start_run(args)
    if args.quick:
        data = data.shrink(512, 256)

    rows = []
    runs = [(rate, use_bn) for rate in rates for use_bn in (False, True)]
    for index, (rate, use_bn) in enumerate(runs, start=1):
        run = train(data, use_bn, rate, args.epochs, args.seed)
        rows += run
        _common.announce(
            index,
            len(runs),
            f"{run[-1]['model']}, learning rate {rate:g}: {args.epochs} epochs, "
            f"final test accuracy {run[-1]['test_accuracy']:.3f}",
        )
    _common.write_csv(args.out / "bn_vs_plain.csv", rows)
    plot(rows, rates, args.out / "bn_vs_plain.png")

    finals = final_accuracies(rows)
    _common.print_table(
        [
            {"learning_rate": rate, **{m: finals[(m, rate)] for m in MODELS}}
            for rate in rates
        ]
    )
    with _common.verdicts(args):
        report_effects(finals, rates, tolerance=0.02)
    _common.print_wall_time(args)


if __name__ == "__main__":
    main(ARGS)
