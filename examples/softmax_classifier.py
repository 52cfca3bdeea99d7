"""Softmax regression as a linear classifier, hardmax vs softmax, and why cross-entropy.

Softmax regression (a single Dense layer from the inputs to the class logits,
no hidden layer, trained with `keras_bn.losses.SoftmaxCrossEntropy`) assigns
each point the class of the largest logit `w_c . x + b_c`: the boundary
between two classes is where two linear functions are equal, a straight
line. The script generates 2-D data, nothing is downloaded, and measures:

  1. On data that is linearly separable by construction (three classes cut
     by straight lines, with a margin), softmax regression classifies every
     training point correctly.
  2. On data that is not (a disk inside a ring), it cannot; a network with
     one hidden layer, trained the same way, can: the data is learnable, only
     not by a linear classifier.
  3. Hardmax (a one-hot vector at the largest logit) against softmax: both
     pick the same class, but the hardmax is a step function whose gradient
     is zero (TensorFlow returns none), so nothing could be learned through
     it; the softmax is smooth, and tends to the hardmax as the logits grow.
  4. Why cross-entropy: for probabilities, the loss `-log p_true` is the
     negative log-likelihood, and its gradient with respect to the logits is
     `p - y`, large exactly when the model is confidently wrong. The squared
     error between the softmax and the one-hot label has a gradient that
     vanishes there. From a confidently wrong start, the script trains the
     same softmax regression with both losses and counts the epochs to 95%
     training accuracy.

The figure shows the decision regions, softmax and hardmax along a line, the
gradients of both losses, and the two trainings. The figure (a PNG) and a CSV
go to --out.
"""

import _common


def parse_args(argv=None):
    parser = _common.ExampleParser("softmax_classifier", __doc__, data=False)
    parser.add_size("--epochs", "epochs per training", full=100, quick=3)
    parser.add_size("--points", "points per data set", full=600, quick=120)
    return parser.parse_args(argv)


# Parse before importing TensorFlow: --help and bad arguments answer at once.
ARGS = parse_args() if __name__ == "__main__" else None

import keras  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

import keras_bn  # noqa: E402
from keras_bn.losses import SoftmaxCrossEntropy  # noqa: E402

BATCH_SIZE = 32
LEARNING_RATE = 0.05
HIDDEN_UNITS = 32
TARGET_ACCURACY = 0.95
# The linear scores that define the separable classes, and their margin.
SEPARATING_WEIGHTS = np.array([[1.0, 0.0], [-0.5, 0.87], [-0.5, -0.87]])
MARGIN = 0.3
# The confidently wrong start: a fitted model's logits, negated and scaled.
WRONG_START_SCALE = 4.0
LIMITS = (-3.0, 3.0)


def separable_data(n, rng):
    """Three classes cut by three straight lines through the origin, with a margin."""
    points = []
    while len(points) < n:
        x = rng.uniform(*LIMITS, size=(4 * n, 2))
        scores = x @ SEPARATING_WEIGHTS.T
        top2 = np.sort(scores, axis=1)[:, -2:]
        keep = top2[:, 1] - top2[:, 0] > MARGIN
        points.extend(x[keep])
    x = np.asarray(points[:n], dtype="float32")
    return x, np.argmax(x @ SEPARATING_WEIGHTS.T, axis=1).astype("int32")


def ring_data(n, rng):
    """Class 0 in a disk of radius 1, class 1 in a ring from radius 1.6 to 2.6."""
    labels = rng.integers(0, 2, n).astype("int32")
    radius = np.where(
        labels == 0, np.sqrt(rng.uniform(0, 1, n)), rng.uniform(1.6, 2.6, n)
    )
    angle = rng.uniform(0, 2 * np.pi, n)
    x = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    return x.astype("float32"), labels


def build(num_classes, hidden):
    layers = [keras.Input((2,))]
    if hidden:
        layers.append(keras.layers.Dense(HIDDEN_UNITS, activation="relu"))
    layers.append(keras.layers.Dense(num_classes))
    return keras.Sequential(layers)


def squared_error_on_softmax(labels, logits):
    """sum_c (softmax(z)_c - y_c)^2 per example, against one-hot labels."""
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    one_hot = tf.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return tf.reduce_sum(tf.square(keras_bn.ops.softmax(logits) - one_hot), axis=-1)


def fit(model, x, y, loss, epochs):
    model.compile(
        optimizer=keras.optimizers.SGD(LEARNING_RATE, momentum=0.9),
        loss=loss,
        metrics=["accuracy"],
    )
    history = model.fit(x, y, batch_size=BATCH_SIZE, epochs=epochs, verbose=0)
    accuracy = float(model.evaluate(x, y, verbose=0)[1])
    return history.history, accuracy


def epochs_to(accuracies, target):
    reached = [epoch for epoch, a in enumerate(accuracies, start=1) if a >= target]
    return reached[0] if reached else None


def hardmax(logits):
    return tf.one_hot(tf.argmax(logits, axis=-1), logits.shape[-1], dtype=logits.dtype)


def gradients_through(function, logits, labels):
    """Gradient of cross-entropy-like -sum(y * log(f(z) + tiny)) with respect to z."""
    logits = tf.constant(logits)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        probabilities = function(logits)
        loss = -tf.reduce_sum(labels * tf.math.log(probabilities + 1e-7))
    gradient = tape.gradient(loss, logits)
    return None if gradient is None else gradient.numpy()


def loss_gradients(p_true):
    """|dL/dz_true| of cross-entropy and of the squared error, 2 classes.

    The logits are (z, 0) with the true class first, so p_true = sigmoid(z).
    """
    z = tf.constant(np.log(p_true / (1 - p_true)), dtype="float64")
    logits = tf.stack([z, tf.zeros_like(z)], axis=1)
    labels = tf.zeros(len(p_true), dtype="int32")
    results = {}
    for name, function in (
        ("cross-entropy", _cross_entropy),
        ("squared error", squared_error_on_softmax),
    ):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            loss = tf.reduce_sum(function(labels, logits))
        results[name] = np.abs(tape.gradient(loss, logits).numpy()[:, 0])
    return results


def _cross_entropy(labels, logits):
    return keras_bn.ops.sparse_softmax_cross_entropy(labels, logits)


def wrong_start(model, fitted):
    """Sets `model` to the fitted model's weights, negated and scaled up."""
    model.set_weights([-WRONG_START_SCALE * w for w in fitted.get_weights()])


def run(args):
    rng = np.random.default_rng(args.seed)
    x_sep, y_sep = separable_data(args.points, rng)
    x_ring, y_ring = ring_data(args.points, rng)
    results = {"data": {"separable": (x_sep, y_sep), "ring": (x_ring, y_ring)}}
    models = {}
    for index, (name, x, y, classes, hidden) in enumerate(
        (
            ("softmax regression, separable", x_sep, y_sep, 3, False),
            ("softmax regression, ring", x_ring, y_ring, 2, False),
            ("one hidden layer, ring", x_ring, y_ring, 2, True),
        ),
        start=1,
    ):
        keras.utils.set_random_seed(args.seed)
        model = build(classes, hidden)
        history, accuracy = fit(
            model, x, y, SoftmaxCrossEntropy(sparse=True), args.epochs
        )
        models[name] = model
        results[name] = {"accuracy": accuracy, "history": history}
        _common.announce(index, 5, f"{name}: training accuracy {accuracy:.3f}")

    fitted = models["softmax regression, separable"]
    for index, (name, loss) in enumerate(
        (
            ("cross-entropy", SoftmaxCrossEntropy(sparse=True)),
            ("squared error", squared_error_on_softmax),
        ),
        start=4,
    ):
        model = build(3, hidden=False)
        wrong_start(model, fitted)
        start_accuracy = float(
            np.mean(np.argmax(model.predict(x_sep, verbose=0), -1) == y_sep)
        )
        history, accuracy = fit(model, x_sep, y_sep, loss, args.epochs)
        results[f"wrong start, {name}"] = {
            "accuracy": accuracy,
            "start_accuracy": start_accuracy,
            "history": history,
            "epochs_to_target": epochs_to(history["accuracy"], TARGET_ACCURACY),
        }
        _common.announce(
            index,
            5,
            f"from a confidently wrong start ({start_accuracy:.2f}), {name}: "
            f"training accuracy {accuracy:.3f}",
        )
    results["models"] = models
    return results


def verdicts(results, epochs):
    separable = results["softmax regression, separable"]["accuracy"]
    linear_ring = results["softmax regression, ring"]["accuracy"]
    hidden_ring = results["one hidden layer, ring"]["accuracy"]
    logits = np.array([[2.0, 1.0, -1.0]], dtype="float32")
    labels = tf.constant([[0.0, 1.0, 0.0]])
    through_hardmax = gradients_through(hardmax, logits, labels)
    through_softmax = gradients_through(keras_bn.ops.softmax, logits, labels)
    hardmax_flat = through_hardmax is None or not np.any(through_hardmax)
    ce = results["wrong start, cross-entropy"]["epochs_to_target"]
    se = results["wrong start, squared error"]["epochs_to_target"]
    return [
        {
            "claim": "softmax regression separates linearly separable data",
            "measured": f"training accuracy {separable:.4f}",
            "rule": "every training point correct (accuracy 1)",
            "held": separable == 1.0,
        },
        {
            "claim": "softmax regression cannot separate the ring",
            "measured": f"training accuracy {linear_ring:.3f}, with one hidden "
            f"layer {hidden_ring:.3f}",
            "rule": "linear below 0.9 while one hidden layer reaches 0.95",
            "held": linear_ring < 0.9 and hidden_ring >= 0.95,
        },
        {
            "claim": "no gradient passes through hardmax; softmax passes one",
            "measured": "gradient through hardmax "
            + ("none" if through_hardmax is None else str(through_hardmax.tolist()))
            + ", through softmax "
            + np.array2string(through_softmax.ravel(), precision=3),
            "rule": "hardmax gives none or zeros, softmax a non-zero gradient",
            "held": hardmax_flat and bool(np.any(through_softmax)),
        },
        {
            "claim": "from a confidently wrong start, cross-entropy learns faster "
            "than the squared error",
            "measured": f"epochs to {TARGET_ACCURACY:.0%}: cross-entropy "
            f"{ce or 'never'}, squared error {se or 'never'} (of {epochs})",
            "rule": "cross-entropy reaches it, in fewer epochs than squared error",
            "held": ce is not None and (se is None or ce < se),
        },
    ]


def _regions(ax, model, x, y, title):
    grid = np.linspace(*LIMITS, 300)
    xx, yy = np.meshgrid(grid, grid)
    points = np.stack([xx.ravel(), yy.ravel()], axis=1).astype("float32")
    logits = model.predict(points, batch_size=len(points), verbose=0)
    probabilities = keras.ops.convert_to_numpy(keras_bn.ops.softmax(logits))
    classes = probabilities.shape[1]
    colors = _common.COLORS[:classes]
    ax.contourf(
        xx,
        yy,
        probabilities.argmax(1).reshape(xx.shape),
        levels=np.arange(classes + 1) - 0.5,
        cmap=ListedColormap(colors),
        alpha=0.25,
    )
    contours = ax.contour(
        xx,
        yy,
        probabilities.max(1).reshape(xx.shape),
        levels=[0.6, 0.9, 0.99],
        colors="gray",
        linewidths=0.8,
    )
    ax.clabel(contours, fmt="%.2f", fontsize=7)
    for label, color in zip(range(classes), colors):
        ax.scatter(*x[y == label].T, s=6, color=color)
    ax.set(
        title=title,
        xlabel="x1",
        ylabel="x2",
        xlim=LIMITS,
        ylim=LIMITS,
        aspect="equal",
    )


def plot(results, path):
    figure, axes = plt.subplots(2, 3, figsize=(16, 10), layout="constrained")
    axes = axes.ravel()
    models = results["models"]
    x_sep, y_sep = results["data"]["separable"]
    x_ring, y_ring = results["data"]["ring"]
    for ax, name, (x, y), label in (
        (axes[0], "softmax regression, separable", (x_sep, y_sep), "a"),
        (axes[1], "softmax regression, ring", (x_ring, y_ring), "b"),
        (axes[2], "one hidden layer, ring", (x_ring, y_ring), "c"),
    ):
        _regions(
            ax,
            models[name],
            x,
            y,
            f"({label}) {name}: accuracy {results[name]['accuracy']:.3f}\n"
            "(shading: predicted class; gray: max softmax probability)",
        )

    # (d) along the line x2 = 0.5 of panel (a): softmax probabilities vs hardmax.
    line = np.linspace(*LIMITS, 400)
    points = np.stack([line, np.full_like(line, 0.5)], axis=1).astype("float32")
    logits = models["softmax regression, separable"].predict(points, verbose=0)
    probabilities = keras.ops.convert_to_numpy(keras_bn.ops.softmax(logits))
    hard = keras.ops.convert_to_numpy(hardmax(tf.constant(logits)))
    for c, color in zip(range(3), _common.COLORS):
        axes[3].plot(line, probabilities[:, c], color=color, label=f"class {c}")
        axes[3].plot(line, hard[:, c], color=color, linestyle="--", linewidth=1)
    axes[3].plot([], [], color="gray", label="softmax (solid)")
    axes[3].plot([], [], color="gray", linestyle="--", label="hardmax (dashed)")
    axes[3].set(
        title="(d) along the line x2 = 0.5 in (a): softmax vs hardmax",
        xlabel="x1",
        ylabel="output for each class",
        ylim=(-0.05, 1.05),
    )

    p_true = np.linspace(0.001, 0.999, 400)
    gradients = loss_gradients(p_true)
    for (name, values), color in zip(gradients.items(), _common.COLORS[3:]):
        axes[4].plot(p_true, values, color=color, label=name)
    axes[4].set(
        title="(e) how hard each loss pushes the true logit (2 classes)",
        xlabel="softmax probability of the true class",
        ylabel="|dL / dz_true|",
    )

    for name, color in zip(("cross-entropy", "squared error"), _common.COLORS[3:]):
        history = results[f"wrong start, {name}"]["history"]
        epochs = np.arange(1, len(history["accuracy"]) + 1)
        axes[5].plot(epochs, history["accuracy"], color=color, label=name)
    axes[5].axhline(
        TARGET_ACCURACY,
        **_common.THRESHOLD_STYLE,
        label=f"{TARGET_ACCURACY:.0%} training accuracy",
    )
    axes[5].set(
        title="(f) separable data, from a confidently wrong start",
        xlabel="epoch",
        ylabel="training accuracy (over the epoch)",
        ylim=(-0.03, 1.03),
    )
    _common.save_figure(figure, path, legend=[axes[3], axes[4], axes[5]], ncols=4)


def main(args):
    _common.start_run(args)
    print(f"data: {args.points} generated 2-D points per data set; output: {args.out}")
    results = run(args)
    rows = verdicts(results, args.epochs)
    _common.write_csv(args.out / "softmax_classifier.csv", rows)
    plot(results, args.out / "softmax_classifier.png")
    with _common.verdicts(args):
        for row in rows:
            print(
                f"{row['claim']}: {'held' if row['held'] else 'did NOT hold'} "
                f"({row['measured']}; rule: {row['rule']})."
            )
    _common.print_wall_time(args)


if __name__ == "__main__":
    main(ARGS)
