"""Inference latency of a keras.applications model, folded against unfolded.

`keras_bn.models.fold_batch_normalization` merges every batch-normalization
layer into the convolution before it. This script builds one
keras.applications model (random weights, no download; random moving
statistics so that folding has something to fold), folds it, checks that
both give the same predictions, and times, round-robin after a warm-up (see
`_timing.py`):

- `predict_on_batch(x)`: Keras's compiled predict step on one batch, the
  per-batch latency of serving;
- `predict(x, batch_size=len(x))`: the whole `predict` call, which adds a
  data adapter and a progress loop of its own (a fixed cost per call).

Medians are per call, in ms; the ratio folded / unfolded below 1 means the
folded model is faster.

Usage:
    python benchmarks/fold_latency.py                      # MobileNetV2, 224x224
    python benchmarks/fold_latency.py --model ResNet50 --batch-sizes 1 8
    python benchmarks/fold_latency.py --quick              # tiny, seconds

TensorFlow's default oneDNN setting is used: set no TF_ENABLE_ONEDNN_OPTS.
"""

import argparse
import json
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
from _timing import time_interleaved
from run import load_average
from run import machine_info

import keras_bn

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "fold_latency.json"
MODELS = {
    "MobileNetV2": keras.applications.MobileNetV2,
    "ResNet50": keras.applications.ResNet50,
    "EfficientNetV2B0": keras.applications.EfficientNetV2B0,
}


def build_model(name, image_size, seed):
    """The application with random weights and random moving statistics."""
    model = MODELS[name](weights=None, input_shape=(image_size, image_size, 3))
    rng = np.random.default_rng(seed)
    for layer in keras_bn.models.batch_normalization_layers(model):
        shape = layer.moving_mean.shape
        layer.moving_mean.assign(rng.normal(0.0, 0.1, shape))
        layer.moving_variance.assign(rng.uniform(0.5, 2.0, shape))
    return model


def measure(model, folded, batch_size, image_size, repetitions, seconds):
    x = np.random.default_rng(batch_size).uniform(
        0.0, 255.0, (batch_size, image_size, image_size, 3)
    )
    x = x.astype("float32")
    expected = model.predict_on_batch(x)
    difference = float(np.max(np.abs(folded.predict_on_batch(x) - expected)))
    timings = time_interleaved(
        {
            "predict_on_batch unfolded": lambda: model.predict_on_batch(x),
            "predict_on_batch folded": lambda: folded.predict_on_batch(x),
            "predict unfolded": lambda: model.predict(
                x, batch_size=batch_size, verbose=0
            ),
            "predict folded": lambda: folded.predict(
                x, batch_size=batch_size, verbose=0
            ),
        },
        repetitions=repetitions,
        target_seconds=seconds,
    )
    entry = {
        "batch_size": batch_size,
        "max_abs_prediction_difference": difference,
        "timings": {name: timing.as_dict() for name, timing in timings.items()},
    }
    for call in ("predict_on_batch", "predict"):
        ratio = timings[f"{call} folded"].median / timings[f"{call} unfolded"].median
        entry[f"{call}_ratio"] = ratio
    return entry


def print_table(entries):
    print(
        f"{'batch':>5}  {'predict_on_batch ms':>22}  {'ratio':>5}  "
        f"{'predict ms':>22}  {'ratio':>5}  {'max |diff|':>10}"
    )
    for entry in entries:
        t = {k: v["median_ms"] for k, v in entry["timings"].items()}
        print(
            f"{entry['batch_size']:>5}  "
            f"{t['predict_on_batch unfolded']:>9.2f} -> "
            f"{t['predict_on_batch folded']:>9.2f}  "
            f"{entry['predict_on_batch_ratio']:>5.2f}  "
            f"{t['predict unfolded']:>9.2f} -> {t['predict folded']:>9.2f}  "
            f"{entry['predict_ratio']:>5.2f}  "
            f"{entry['max_abs_prediction_difference']:>10.2g}"
        )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=list(MODELS), default="MobileNetV2")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument(
        "--seconds", type=float, default=1.0, help="duration of one repetition"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.quick:
        args.image_size, args.batch_sizes = 32, [1, 2]
        args.repetitions, args.seconds = 2, 0.05
    keras.utils.set_random_seed(0)
    model = build_model(args.model, args.image_size, seed=0)
    folded = keras_bn.models.fold_batch_normalization(model)
    n_bn = len(keras_bn.models.batch_normalization_layers(model))
    n_left = len(keras_bn.models.batch_normalization_layers(folded))
    print(
        f"{args.model} {args.image_size}x{args.image_size}: {n_bn} BN layers, "
        f"{n_left} left after folding; {len(model.layers)} -> "
        f"{len(folded.layers)} layers"
    )
    load_before = load_average()
    entries = [
        measure(model, folded, size, args.image_size, args.repetitions, args.seconds)
        for size in args.batch_sizes
    ]
    print_table(entries)
    results = {
        "model": args.model,
        "image_size": args.image_size,
        "batch_normalization_layers": n_bn,
        "left_after_folding": n_left,
        "entries": entries,
        "machine": machine_info(),
        "load_average": {"before": load_before, "after": load_average()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
