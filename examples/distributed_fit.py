"""Synchronized batch normalization under tf.distribute.MirroredStrategy.

Trains the same Conv-BN-ReLU network on the digit images twice, mirrored over
every GPU present (or over 2 logical CPU devices when there is none): once
with `synchronized=True`, where every replica normalizes with the statistics
of the global batch, and once with per-replica statistics. It then prints how
far the replicas' moving statistics disagree: not at all when synchronized.

The figure plots, for both runs and every BN channel, the second replica's
moving mean and moving variance minus the first's: zero when the replicas
agree. The figure (a PNG) and a CSV go to --out.

    python examples/distributed_fit.py            # about half a minute
    python examples/distributed_fit.py --quick    # a few seconds
"""

import _common


def parse_args(argv=None):
    parser = _common.ExampleParser("distributed_fit", __doc__)
    parser.add_size("--epochs", "epochs per run", full=5, quick=1)
    return parser.parse_args(argv)


# Parse before importing TensorFlow: --help and bad arguments answer at once.
ARGS = parse_args() if __name__ == "__main__" else None

import keras  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_bn  # noqa: E402

MODES = {True: "synchronized=True", False: "per-replica statistics"}


def mirrored_devices():
    """Every GPU, or 2 logical CPU devices; call before TensorFlow runs an op."""
    if tf.config.list_physical_devices("GPU"):
        return [device.name for device in tf.config.list_logical_devices("GPU")]
    try:
        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("CPU")[0],
            [tf.config.LogicalDeviceConfiguration()] * 2,
        )
    except RuntimeError:
        pass  # already initialized (set up by the caller); use what is there
    return [device.name for device in tf.config.list_logical_devices("CPU")]


def build_model(image_shape, synchronized):
    layers = [keras.Input((*image_shape, 1))]
    for filters in (16, 32):
        layers += [
            keras.layers.Conv2D(filters, 3, padding="same", use_bias=False),
            # momentum 0.9: a few hundred steps are too few for the default
            # 0.99 to forget the initial moving statistics (0 and 1).
            keras_bn.BatchNormalization(synchronized=synchronized, momentum=0.9),
            keras.layers.ReLU(),
        ]
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
    return keras.Sequential(layers)


def replica_copies(model):
    """Each BN statistic over all BN layers: array [replicas, channels]."""
    copies = {"moving_mean": [], "moving_variance": []}
    for layer in model.layers:
        if isinstance(layer, keras_bn.BatchNormalization):
            for name in copies:
                variable = getattr(layer, name).value
                copies[name].append(np.stack([v.numpy() for v in variable.values]))
    return {name: np.concatenate(arrays, axis=1) for name, arrays in copies.items()}


def replica_disagreement(copies):
    """Largest difference between replicas' copies of any BN statistic."""
    return float(max(np.abs(values - values[0]).max() for values in copies.values()))


def plot(copies_by_mode, rows, path):
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    for ax, name in zip(axes, ("moving_mean", "moving_variance")):
        for (synchronized, copies), color, marker in zip(
            copies_by_mode.items(), _common.COLORS, ("o", "x")
        ):
            difference = copies[name][1] - copies[name][0]
            ax.plot(
                np.arange(len(difference)),
                difference,
                marker,
                color=color,
                markersize=4,
                label=MODES[synchronized],
            )
        label = name.replace("_", " ")
        ax.axhline(0.0, **_common.THRESHOLD_STYLE, label="replicas equal")
        ax.set(
            title=f"{label}: replica 1 - replica 0",
            xlabel="BN channel (both BN layers, in order)",
            ylabel=f"difference of the {label}",
        )
    accuracies = ", ".join(
        f"{MODES[row['synchronized']]} {row['test_accuracy']:.3f}" for row in rows
    )
    figure.suptitle(f"Test accuracy: {accuracies}")
    _common.save_figure(figure, path, legend=[axes[0]])


def main(args):
    devices = mirrored_devices()
    data = _common.start_run(args)
    if args.quick:
        data = data.shrink(256, 128)
    strategy = tf.distribute.MirroredStrategy(devices)
    print(f"replicas: {strategy.num_replicas_in_sync} ({', '.join(devices)})")
    x_train, x_test = data.x_train[..., None], data.x_test[..., None]
    rows, copies_by_mode = [], {}
    for index, synchronized in enumerate((True, False), start=1):
        keras.utils.set_random_seed(args.seed)
        with strategy.scope():
            model = build_model(data.x_train.shape[1:], synchronized)
            model.compile(
                optimizer=keras.optimizers.Adam(3e-3),
                loss=keras_bn.losses.SoftmaxCrossEntropy(sparse=True),
                metrics=["accuracy"],
            )
        _common.announce(index, 2, f"{MODES[synchronized]}: {args.epochs} epochs")
        model.fit(x_train, data.y_train, batch_size=32, epochs=args.epochs, verbose=2)
        _, accuracy = model.evaluate(x_test, data.y_test, verbose=0)
        copies = copies_by_mode[synchronized] = replica_copies(model)
        rows.append(
            {
                "synchronized": synchronized,
                "test_accuracy": accuracy,
                "replica_disagreement": replica_disagreement(copies),
            }
        )
    print()
    _common.print_table(rows)
    _common.write_csv(args.out / "distributed_fit.csv", rows)
    plot(copies_by_mode, rows, args.out / "distributed_fit.png")
    agree = rows[0]["replica_disagreement"] == 0.0
    with _common.verdicts(args):
        print(
            "\nWith synchronized=True the replicas' moving statistics are "
            + ("identical" if agree else "NOT identical")
            + "; with per-replica statistics they differ by up to "
            f"{rows[1]['replica_disagreement']:.3g}."
        )
    _common.print_wall_time(args)


if __name__ == "__main__":
    main(ARGS)
