"""Vanishing and exploding gradients in a deep MLP, with and without BN.

Two deep networks (20 hidden layers of 64 units by default) are trained with
SGD on the digit images, each once as is and once with batch normalization
between every Dense layer and its activation:

  - sigmoid units with Keras's default (Glorot) initial weights, where the
    gradient shrinks on its way back through every layer: it vanishes;
  - tanh units with large Gaussian initial weights (stddev 3 / sqrt(fan_in)),
    where it grows on its way back: it explodes.

Every few steps the script records the norm of the loss gradient with
respect to each hidden layer's kernel, on a fixed batch of 256 training
images, in training mode (the gradient that SGD applies), and the test
accuracy. The figure shows, per network: (a) the gradient norm of each layer
at initialization, (b) after training, (c) the ratio of the first layer's
gradient norm to the last's during training, (d) test accuracy.

Verdict rule: gradients "vanish" ("explode") when the first hidden layer's
gradient norm is under 1/10 (over 10x) the last hidden layer's. The claim
holds for a network if they vanish or explode without BN at initialization
and stay within that factor with BN at every record. The figure (a PNG) and
a CSV go to --out.
"""

import _common


def parse_args(argv=None):
    parser = _common.ExampleParser("vanishing_gradients", __doc__)
    parser.add_size("--depth", "hidden layers", full=20, quick=6)
    parser.add_size("--steps", "SGD steps per network", full=1500, quick=10)
    parser.add_size(
        "--record-every", "steps between gradient records", full=50, quick=5
    )
    parser.add_argument(
        "--learning-rate",
        type=_common.positive_float,
        default=0.05,
        help="SGD learning rate (momentum 0.9), the same for every network "
        "(default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.steps % args.record_every:
        steps, every = args.steps, args.record_every
        parser.error(
            f"--steps ({steps}) must be a multiple of --record-every ({every})"
        )
    return args


# Parse before importing TensorFlow: --help and bad arguments answer at once.
ARGS = parse_args() if __name__ == "__main__" else None

import keras  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from keras_bn import BatchNormalization  # noqa: E402
from keras_bn.losses import SoftmaxCrossEntropy  # noqa: E402

WIDTH = 64
BATCH_SIZE = 64
PROBE_SIZE = 256
# A gradient norm ratio beyond this factor counts as vanishing or exploding.
FACTOR = 10.0
TANH_GAIN = 3.0
NETWORKS = {
    "sigmoid": dict(activation="sigmoid", initializer=lambda fan_in: "glorot_uniform"),
    "tanh, large init": dict(
        activation="tanh",
        initializer=lambda fan_in: keras.initializers.RandomNormal(
            stddev=TANH_GAIN / np.sqrt(fan_in)
        ),
    ),
}
MODELS = ("plain", "BN")


def build_mlp(input_dim, depth, network, use_bn):
    """`depth` x (Dense -> [BN] -> activation), then 10 logits."""
    spec = NETWORKS[network]
    inputs = keras.Input((input_dim,))
    hidden, fan_in = inputs, input_dim
    for index in range(1, depth + 1):
        hidden = keras.layers.Dense(
            WIDTH,
            use_bias=not use_bn,  # BN's beta replaces the bias
            kernel_initializer=spec["initializer"](fan_in),
            name=f"dense_{index}",
        )(hidden)
        if use_bn:
            hidden = BatchNormalization(name=f"bn_{index}")(hidden)
        hidden = keras.layers.Activation(spec["activation"])(hidden)
        fan_in = WIDTH
    logits = keras.layers.Dense(10, name="logits")(hidden)
    return keras.Model(inputs, logits)


def train(data, network, use_bn, args):
    """Trains one network; returns one dict per record (step, norms, accuracy)."""
    x_train, y_train, x_test, y_test = data.flat()
    keras.utils.set_random_seed(args.seed)
    model = build_mlp(x_train.shape[1], args.depth, network, use_bn)
    kernels = [model.get_layer(f"dense_{i}").kernel for i in range(1, args.depth + 1)]
    optimizer = keras.optimizers.SGD(args.learning_rate, momentum=0.9)
    loss_fn = SoftmaxCrossEntropy(sparse=True)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)

    @tf.function
    def probe(x, y):
        """Per-layer gradient norms on (x, y), and the test accuracy.

        The gradient is the one SGD would apply, in training mode, without
        applying it (the probe's batch statistics do enter BN's moving
        averages, which only the test accuracy reads).
        """
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        norms = tf.stack([tf.norm(g) for g in tape.gradient(loss, kernels)])
        predictions = tf.argmax(model(x_test, training=False), axis=-1)
        accuracy = tf.reduce_mean(tf.cast(predictions == y_test, tf.float32))
        return norms, accuracy

    rng = np.random.default_rng(args.seed)
    probe_batch = (x_train[:PROBE_SIZE], y_train[:PROBE_SIZE])
    records = []
    for step in range(args.steps + 1):
        if step % args.record_every == 0:
            norms, accuracy = probe(*probe_batch)
            norms = norms.numpy()
            records.append(
                {"step": step, "norms": norms, "test_accuracy": float(accuracy)}
            )
            if step % (args.steps // 4 or 1) == 0:
                print(
                    f"    step {step:>5}: first/last layer gradient norm "
                    f"{norms[0] / norms[-1]:.2g}, test accuracy "
                    f"{records[-1]['test_accuracy']:.3f}",
                    flush=True,
                )
        if step < args.steps:
            batch = rng.integers(0, len(x_train), BATCH_SIZE)
            train_step(x_train[batch], y_train[batch])
    return records


def ratio(record):
    """First hidden layer's gradient norm over the last's."""
    return float(record["norms"][0] / record["norms"][-1])


def within_factor(value):
    return 1.0 / FACTOR <= value <= FACTOR


def verdicts(results):
    """One summary row per network, with the verdict by the stated rule."""
    rows = []
    for network in NETWORKS:
        plain, bn = results[(network, "plain")], results[(network, "BN")]
        plain_ratio = ratio(plain[0])
        bn_ratios = [ratio(record) for record in bn]
        if plain_ratio < 1.0 / FACTOR:
            without = "vanish"
        elif plain_ratio > FACTOR:
            without = "explode"
        else:
            without = "neither vanish nor explode"
        bn_holds = all(within_factor(value) for value in bn_ratios)
        rows.append(
            {
                "network": network,
                "plain_ratio_at_init": plain_ratio,
                "plain_ratio_final": ratio(plain[-1]),
                "bn_ratio_at_init": bn_ratios[0],
                "bn_ratio_min": min(bn_ratios),
                "bn_ratio_max": max(bn_ratios),
                "plain_final_accuracy": plain[-1]["test_accuracy"],
                "bn_final_accuracy": bn[-1]["test_accuracy"],
                "without_bn": without,
                "bn_within_factor": bn_holds,
                "claim_holds": without != "neither vanish nor explode" and bn_holds,
            }
        )
    return rows


def report(rows, depth):
    for row in rows:
        print(
            f"{row['network']}, {depth} layers: without BN the gradients "
            f"{row['without_bn']} (first/last layer {row['plain_ratio_at_init']:.2g} "
            f"at initialization, {row['plain_ratio_final']:.2g} after training); "
            "with BN the ratio stays in "
            f"[{row['bn_ratio_min']:.2g}, {row['bn_ratio_max']:.2g}] over training, "
            + ("within" if row["bn_within_factor"] else "NOT within")
            + f" {FACTOR:g}x. Final test accuracy {row['plain_final_accuracy']:.3f} "
            f"without BN, {row['bn_final_accuracy']:.3f} with."
        )
        print(
            "  The claim "
            + ("held" if row["claim_holds"] else "did NOT hold")
            + " for this network."
        )


def plot(results, depth, path):
    figure, axes = plt.subplots(
        len(NETWORKS), 4, figsize=(19, 4.2 * len(NETWORKS)), layout="constrained"
    )
    layers = np.arange(1, depth + 1)
    colors = dict(zip(MODELS, _common.COLORS))
    for row, network in zip(axes, NETWORKS):
        for model in MODELS:
            records = results[(network, model)]
            style = dict(color=colors[model], label=model)
            row[0].plot(layers, records[0]["norms"], "o-", markersize=3, **style)
            row[1].plot(layers, records[-1]["norms"], "o-", markersize=3, **style)
            steps = [record["step"] for record in records]
            row[2].plot(steps, [ratio(record) for record in records], **style)
            row[3].plot(steps, [r["test_accuracy"] for r in records], **style)
        for ax, when in zip(row[:2], ("at initialization", "after training")):
            ax.set(
                title=f"{network}: ({'ab'[when != 'at initialization']}) {when}",
                xlabel="hidden layer (1 = nearest the input)",
                ylabel="gradient norm of the layer's kernel",
                yscale="log",
            )
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        row[2].axhline(1.0, **_common.THRESHOLD_STYLE, label="equal norms")
        for level in (FACTOR, 1.0 / FACTOR):
            row[2].axhline(
                level,
                color="gray",
                linestyle="--",
                linewidth=1,
                label=f"{FACTOR:g}x apart (the verdict's bound)",
            )
        row[2].set(
            title=f"{network}: (c) first / last layer during training",
            xlabel="training step",
            ylabel="gradient norm, layer 1 / layer " + str(depth),
            yscale="log",
        )
        row[3].set(
            title=f"{network}: (d) test accuracy",
            xlabel="training step",
            ylabel="test accuracy",
            ylim=(0, 1),
        )
    _common.save_figure(figure, path, legend=[axes[0][0], axes[0][2]])


def main(args):
    data = _common.start_run(args)
    if args.quick:
        data = data.shrink(512, 256)
    results = {}
    runs = [(network, model) for network in NETWORKS for model in MODELS]
    for index, (network, model) in enumerate(runs, start=1):
        _common.announce(
            index, len(runs), f"{network}, {model}: {args.steps} SGD steps"
        )
        results[(network, model)] = train(data, network, model == "BN", args)

    rows = [
        {
            "network": network,
            "model": model,
            "step": record["step"],
            "layer": layer,
            "gradient_norm": float(norm),
            "test_accuracy": record["test_accuracy"],
        }
        for (network, model), records in results.items()
        for record in records
        for layer, norm in enumerate(record["norms"], start=1)
    ]
    _common.write_csv(args.out / "vanishing_gradients.csv", rows)
    plot(results, args.depth, args.out / "vanishing_gradients.png")
    summary = verdicts(results)
    _common.print_table(
        summary,
        [
            "network",
            "plain_ratio_at_init",
            "plain_ratio_final",
            "bn_ratio_min",
            "bn_ratio_max",
            "plain_final_accuracy",
            "bn_final_accuracy",
        ],
    )
    with _common.verdicts(args):
        report(summary, args.depth)
    _common.print_wall_time(args)


if __name__ == "__main__":
    main(ARGS)
