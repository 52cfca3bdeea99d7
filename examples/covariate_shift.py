"""Internal covariate shift: Figure 1 of Ioffe & Szegedy (2015), reproduced.

An MLP with three hidden layers of 100 sigmoid units is trained with plain
SGD on mini-batches of 60, once as is and once with batch normalization
before each sigmoid. The script plots

  (a) test accuracy against the training step, for both networks;
  (b, c) the 15th, 50th and 85th percentiles of the input of one sigmoid of
      the last hidden layer, over training, without and with BN.

It prints the number of steps each network needs to reach a test-accuracy
threshold, and how far the sigmoid's input distribution moves. The figure
(a PNG) and a CSV go to --out.

The percentiles are recorded by `keras_bn.callbacks.ActivationStatistics` on
the test images, in inference mode. BN runs with momentum 0.9 here, so its
moving statistics follow the weights within a few steps; at step 0 they still
hold their initial values (mean 0, variance 1).

Reference: S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating Deep
Network Training by Reducing Internal Covariate Shift", ICML 2015.
"""

import _common


def parse_args(argv=None):
    parser = _common.ExampleParser("covariate_shift", __doc__)
    parser.add_size(
        "--steps", "training steps, a multiple of --eval-every", full=6000, quick=100
    )
    parser.add_size(
        "--eval-every",
        "steps between evaluations and percentile records",
        full=50,
        quick=20,
    )
    parser.add_argument(
        "--learning-rate",
        type=_common.positive_float,
        default=0.5,
        help="SGD learning rate, the same for both networks (default: %(default)s)",
    )
    parser.add_argument(
        "--init-stddev",
        type=_common.positive_float,
        default=0.1,
        help="stddev of the Gaussian initial weights (default: %(default)s)",
    )
    parser.add_argument(
        "--threshold",
        type=_common.unit_fraction,
        default=0.9,
        help="test accuracy to reach (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.steps % args.eval_every:
        steps, every = args.steps, args.eval_every
        parser.error(f"--steps ({steps}) must be a multiple of --eval-every ({every})")
    return args


# Parse before importing TensorFlow: --help and bad arguments answer at once.
ARGS = parse_args() if __name__ == "__main__" else None

import keras  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_bn import BatchNormalization  # noqa: E402
from keras_bn.callbacks import ActivationStatistics  # noqa: E402
from keras_bn.losses import SoftmaxCrossEntropy  # noqa: E402

HIDDEN_LAYERS = 3
HIDDEN_UNITS = 100
BATCH_SIZE = 60
WATCHED_LAYER = f"sigmoid_{HIDDEN_LAYERS}"
WATCHED_UNIT = 0
PERCENTILES = (15, 50, 85)
# Fast moving statistics: the probe runs in inference mode, so BN's moving
# averages must settle within a few records to show what training sees.
BN_MOMENTUM = 0.9


def build_mlp(input_dim, use_bn, init_stddev):
    """The paper's MNIST network: 3 x 100 sigmoids, small Gaussian weights."""
    inputs = keras.Input((input_dim,))
    hidden = inputs
    for index in range(1, HIDDEN_LAYERS + 1):
        hidden = keras.layers.Dense(
            HIDDEN_UNITS,
            use_bias=not use_bn,  # BN's beta replaces the bias
            kernel_initializer=keras.initializers.RandomNormal(stddev=init_stddev),
            name=f"dense_{index}",
        )(hidden)
        if use_bn:
            hidden = BatchNormalization(momentum=BN_MOMENTUM, name=f"bn_{index}")(
                hidden
            )
        hidden = keras.layers.Activation("sigmoid", name=f"sigmoid_{index}")(hidden)
    logits = keras.layers.Dense(10, name="logits")(hidden)
    return keras.Model(inputs, logits, name="mlp_bn" if use_bn else "mlp")


def train(data, use_bn, args):
    """Trains one network; returns (steps, test accuracies, percentile stats).

    Keras prints one line per evaluation, every `args.eval_every` steps.
    """
    x_train, y_train, x_test, y_test = data.flat()
    keras.utils.set_random_seed(args.seed)
    model = build_mlp(x_train.shape[1], use_bn, args.init_stddev)
    model.compile(
        optimizer=keras.optimizers.SGD(args.learning_rate),
        loss=SoftmaxCrossEntropy(sparse=True),
        metrics=["accuracy"],
    )
    batches = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train))
        .shuffle(len(x_train), seed=args.seed)
        .repeat()
        .batch(BATCH_SIZE, drop_remainder=True)
    )
    stats = ActivationStatistics(
        [WATCHED_LAYER],
        probe_data=x_test,
        percentiles=PERCENTILES,
        every_n_steps=args.eval_every,
        feature_index=WATCHED_UNIT,
    )
    initial_accuracy = model.evaluate(x_test, y_test, verbose=0)[1]
    # One Keras "epoch" per evaluation: validation runs every eval_every steps.
    history = model.fit(
        batches,
        steps_per_epoch=args.eval_every,
        epochs=args.steps // args.eval_every,
        validation_data=(x_test, y_test),
        validation_batch_size=len(x_test),
        callbacks=[stats],
        shuffle=False,  # the dataset is shuffled
        verbose=2,
    )
    accuracies = [initial_accuracy, *history.history["val_accuracy"]]
    steps = np.arange(len(accuracies)) * args.eval_every
    return steps, np.asarray(accuracies), stats


def steps_to_reach(steps, accuracies, threshold):
    """First recorded step with test accuracy >= threshold, or None."""
    reached = np.flatnonzero(accuracies >= threshold)
    return int(steps[reached[0]]) if len(reached) else None


def distribution_drift(percentiles):
    """Ranges of the median and of the 15th-85th spread over the records.

    The first record (step 0) is left out: the BN network's probe then shows
    the moving statistics' initial values (mean 0, variance 1), not data.
    """
    settled = percentiles[1:]
    spread = settled[:, 2] - settled[:, 0]
    return {
        "median_min": float(settled[:, 1].min()),
        "median_max": float(settled[:, 1].max()),
        "spread_min": float(spread.min()),
        "spread_max": float(spread.max()),
    }


def report_effects(summary, threshold):
    """Prints, in words, whether BN trained faster and kept the input still."""
    plain, bn = summary
    key = f"steps_to_{threshold:g}"
    if bn[key] is None:
        print(f"Faster training did not show: BN never reached {threshold:.0%}.")
    elif plain[key] is None:
        print(f"BN reached {threshold:.0%} at step {bn[key]}; without BN never.")
    elif bn[key] < plain[key]:
        print(
            f"BN reached {threshold:.0%} test accuracy at step {bn[key]}, "
            f"{plain[key] / bn[key]:.0f}x fewer steps than without BN "
            f"({plain[key]})."
        )
    else:
        print(
            f"Faster training did not show: BN reached {threshold:.0%} at step "
            f"{bn[key]}, without BN at step {plain[key]}."
        )
    ranges = [row["median_max"] - row["median_min"] for row in summary]
    verdict = "more stable" if ranges[1] < ranges[0] else "NOT more stable"
    print(
        f"The sigmoid input's median moved over a range of {ranges[0]:.2f} "
        f"without BN and {ranges[1]:.2f} with BN: {verdict} with BN."
    )


def plot(results, threshold, path):
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.4), layout="constrained")
    for color, (name, (steps, accuracies, _)) in zip(_common.COLORS, results.items()):
        axes[0].plot(steps, accuracies, color=color, label=name)
    axes[0].axhline(
        threshold,
        **_common.THRESHOLD_STYLE,
        label=f"{threshold:.0%} test-accuracy threshold",
    )
    axes[0].set(
        title="(a) test accuracy",
        xlabel="training step",
        ylabel="test accuracy",
        ylim=(0, 1),
    )
    limits = _shared_limits(
        [stats.percentiles[WATCHED_LAYER] for *_, stats in results.values()]
    )
    styles = dict(zip(PERCENTILES, (":", "-", "--")))
    for ax, label, (name, (*_, stats)) in zip(axes[1:], "bc", results.items()):
        values = stats.percentiles[WATCHED_LAYER]
        for column, level in enumerate(PERCENTILES):
            ax.plot(
                stats.steps,
                values[:, column],
                color="black",
                linestyle=styles[level],
                linewidth=1.2,
                label=f"{level}th percentile",
            )
        ax.set(
            title=f"({label}) {name}: input of one last-layer sigmoid",
            xlabel="training step",
            ylabel="sigmoid input (test images)",
            ylim=limits,
        )
    _common.save_figure(figure, path, legend=[axes[0], axes[1]])


def _shared_limits(arrays):
    low = min(array.min() for array in arrays)
    high = max(array.max() for array in arrays)
    margin = 0.05 * (high - low)
    return low - margin, high + margin


def main(args):
    data = _common.start_run(args)
    results = {}
    for index, (name, use_bn) in enumerate(
        (("without BN", False), ("with BN", True)), start=1
    ):
        _common.announce(
            index,
            2,
            f"{name}: {args.steps} steps; each Keras epoch below is "
            f"{args.eval_every} steps and one evaluation",
        )
        results[name] = train(data, use_bn=use_bn, args=args)

    rows, summary = [], []
    for name, (steps, accuracies, stats) in results.items():
        percentiles = stats.percentiles[WATCHED_LAYER]
        # Evaluations and percentile records share the grid 0, eval_every, ...
        for step, accuracy, values in zip(steps, accuracies, percentiles):
            rows.append(
                {
                    "model": name,
                    "step": int(step),
                    "test_accuracy": float(accuracy),
                    **{f"p{level}": float(v) for level, v in zip(PERCENTILES, values)},
                }
            )
        summary.append(
            {
                "model": name,
                f"steps_to_{args.threshold:g}": steps_to_reach(
                    steps, accuracies, args.threshold
                ),
                "final_accuracy": float(accuracies[-1]),
                **distribution_drift(percentiles),
            }
        )
    _common.write_csv(args.out / "covariate_shift.csv", rows)
    plot(results, args.threshold, args.out / "covariate_shift.png")
    _common.print_table(summary)
    with _common.verdicts(args):
        report_effects(summary, args.threshold)
    _common.print_wall_time(args)


if __name__ == "__main__":
    main(ARGS)
