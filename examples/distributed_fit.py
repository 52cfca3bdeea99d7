"""Synchronized batch normalization under tf.distribute.MirroredStrategy.

Trains the same Conv-BN-ReLU network on the digit images twice, mirrored over
every GPU present (or over 2 logical CPU devices when there is none): once
with `synchronized=True`, where every replica normalizes with the statistics
of the global batch, and once with per-replica statistics. It then prints how
far the replicas' moving statistics disagree: not at all when synchronized.

    python examples/distributed_fit.py            # a few seconds to a minute
    python examples/distributed_fit.py --quick    # a few seconds
"""

import tensorflow as tf

# Devices must be configured before TensorFlow initializes them.
GPUS = tf.config.list_physical_devices("GPU")
if not GPUS:
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * 2,
    )

import keras  # noqa: E402
import numpy as np  # noqa: E402
from _common import Stopwatch  # noqa: E402
from _common import make_parser  # noqa: E402
from _common import prepare_run  # noqa: E402
from _common import print_table  # noqa: E402
from _common import write_csv  # noqa: E402

import keras_bn  # noqa: E402


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


def replica_disagreement(model):
    """Largest difference between replicas' copies of any BN statistic."""
    worst = 0.0
    for layer in model.layers:
        if isinstance(layer, keras_bn.BatchNormalization):
            for variable in (layer.moving_mean, layer.moving_variance):
                copies = [v.numpy() for v in variable.value.values]
                worst = max(worst, max(np.abs(c - copies[0]).max() for c in copies))
    return worst


def main():
    parser = make_parser("distributed_fit", __doc__)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    clock = Stopwatch()
    data = prepare_run(args)
    if args.quick:
        data, args.epochs = data.shrink(256, 128), 1
    devices = [d.name for d in tf.config.list_logical_devices("GPU" if GPUS else "CPU")]
    strategy = tf.distribute.MirroredStrategy(devices)
    print(f"replicas: {strategy.num_replicas_in_sync} ({', '.join(devices)})")
    x_train, x_test = data.x_train[..., None], data.x_test[..., None]
    rows = []
    for synchronized in (True, False):
        keras.utils.set_random_seed(args.seed)
        with strategy.scope():
            model = build_model(data.image_shape, synchronized)
            model.compile(
                optimizer=keras.optimizers.Adam(3e-3),
                loss=keras_bn.losses.SoftmaxCrossEntropy(sparse=True),
                metrics=["accuracy"],
            )
        print(f"\nsynchronized={synchronized}")
        model.fit(x_train, data.y_train, batch_size=32, epochs=args.epochs, verbose=2)
        _, accuracy = model.evaluate(x_test, data.y_test, verbose=0)
        rows.append(
            {
                "synchronized": synchronized,
                "test_accuracy": accuracy,
                "replica_disagreement": replica_disagreement(model),
            }
        )
    print()
    print_table(rows)
    write_csv(args.out / "distributed_fit.csv", rows)
    agree = rows[0]["replica_disagreement"] == 0.0
    print(
        "\nWith synchronized=True the replicas' moving statistics are "
        + ("identical" if agree else "NOT identical")
        + f"; with per-replica statistics they differ by up to "
        f"{rows[1]['replica_disagreement']:.3g}. ({clock.seconds():.0f} s)"
    )


if __name__ == "__main__":
    main()
