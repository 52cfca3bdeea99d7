"""Speed and memory of keras_bn against TensorFlow's fused kernels and Keras.

Five sections, timed ones in one process:

- `bn`: a batch-norm training step (forward, backward to x, gamma and beta
  under `tf.GradientTape`, moving-average update) and an inference forward,
  for `keras_bn.BatchNormalization` (default `fused=None`), keras_bn with
  `fused=False` (the closed form), `keras.layers.BatchNormalization` and
  `tf.compat.v1.nn.fused_batch_norm` (TensorFlow 2's only public wrapper of
  the fused kernel; 2-D inputs reshaped to `[N, 1, 1, C]`; its moving
  averages updated through `exponential_avg_factor`, as the layers do).
  float16 runs use the `mixed_float16` policy for the layers (float32 weights).
- `ce`: softmax cross-entropy training step (mean loss and its gradient to the
  logits), sparse and dense labels, for `keras_bn.losses.SoftmaxCrossEntropy`,
  Keras's `(Sparse)CategoricalCrossentropy(from_logits=True)` and
  `tf.nn.(sparse_)softmax_cross_entropy_with_logits` followed by a mean.
  float16 logits (a mixed-precision model's output) are taken as they come by
  both losses, which compute in float32; the tf.nn row casts them to float32.
- `fit`: one epoch of `model.fit` of a Conv-BN-ReLU CNN and a Dense-BN-ReLU
  MLP on fixed synthetic data, keras_bn's layer and loss against Keras's
  (`jit_compile=False`, SGD with momentum). Fewer repetitions here (3 by
  default) because an epoch takes seconds.
- `memory`: the peak bytes of one BN training step of 1, 4 and 16 stacked
  layers on 32x56x56x128, each implementation of `bn`, eager and
  `tf.function`, float32 and float16, one process per case; the bytes each
  layer keeps for the backward pass, in input-sized tensors. The metric is
  defined in `memory.py`.
- `torch`: when PyTorch is importable, the same BN training step
  (`torch.nn.BatchNorm2d`, channels-last) and cross-entropy with its
  gradient, with as many threads as TensorFlow's intra-op pool, in a process
  of its own (`torch_peer.py`); skipped with the reason otherwise. PyTorch is
  not a dependency.

`bn` and `ce` run in three modes: eager, `tf.function` and
`tf.function(jit_compile=True)` ("xla"); every case runs in every mode.
Implementations are timed round-robin after a warm-up (see `_timing.py`);
medians are per call, in ms. Ratios below 1 mean keras_bn is faster. A
summary of the eager rows (keras_bn / Keras, keras_bn / the tf.nn op) ends
the report.

Usage:
    python benchmarks/run.py                 # full run, about a quarter hour
    python benchmarks/run.py --quick         # tiny shapes, about a minute
    python benchmarks/run.py --only bn ce --out /tmp/results.json
    python benchmarks/run.py --skip memory   # the timed sections only
    python benchmarks/run.py --only memory --memory-depths 1 4 8

TensorFlow's default oneDNN setting is used: set no TF_ENABLE_ONEDNN_OPTS.
The exit status is 1 if a memory case or the PyTorch peer failed (the JSON is
written first).
"""

import argparse
import gc
import inspect
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import memory
import tensorflow as tf
import torch_peer
from _implementations import BN_IMPLS
from _implementations import BN_NAMES
from _implementations import EPSILON
from _implementations import MOMENTUM
from _implementations import bn_layer
from _implementations import random_normal
from _timing import time_interleaved

import keras_bn

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "latest.json"
SECTIONS = ("bn", "ce", "fit", "memory", "torch")

# Implementations per section, in table order (bn: BN_IMPLS); ratios are
# candidate / baseline.
CE_IMPLS = ("keras_bn", "keras", "tf_nn")
FIT_IMPLS = ("keras_bn", "keras")
RATIOS = {
    "bn": [
        ("keras_bn", "tf_fused"),
        ("keras_bn", "keras"),
        ("keras_bn_closed_form", "tf_fused"),
        ("keras_bn_closed_form", "keras"),
    ],
    "ce": [("keras_bn", "tf_nn"), ("keras_bn", "keras")],
    "fit": [("keras_bn", "keras")],
}
COLUMN_NAMES = {**BN_NAMES, "tf_nn": "tf.nn"}
RATIO_NAMES = {
    "keras_bn": "kbn",
    "keras_bn_closed_form": "cf",
    "keras": "keras",
    "tf_fused": "fused",
    "tf_nn": "tf.nn",
}
TITLES = {
    "bn": "Batch normalization, median ms per call (train: forward, backward to "
    "x, gamma, beta, moving averages)\nkbn = keras_bn.BatchNormalization(), "
    "cf = keras_bn fused=False (closed form), fused = "
    "tf.compat.v1.nn.fused_batch_norm",
    "ce": "Softmax cross-entropy, median ms per call (mean loss and its "
    "gradient to the logits)\nkbn = keras_bn.losses.SoftmaxCrossEntropy, keras "
    "= (Sparse)CategoricalCrossentropy(from_logits=True), tf.nn = "
    "tf.nn.(sparse_)softmax_cross_entropy_with_logits + mean",
    "fit": "model.fit, median ms per epoch (warm-up epoch excluded)\nkbn = "
    "keras_bn BatchNormalization + SoftmaxCrossEntropy(sparse=True), keras = "
    "Keras's BatchNormalization + SparseCategoricalCrossentropy(from_logits=True)",
}

FULL = {
    "repetitions": 7,
    "fit_repetitions": 3,
    "target_seconds": 0.1,
    "bn_cases": [
        (kind, shape, dtype)
        for kind in ("train", "inference")
        for dtype in ("float32", "float16")
        for shape in ((256, 1024), (64, 32, 32, 64), (32, 56, 56, 128))
    ],
    "ce_cases": [
        ((256, 1000), "float32"),
        ((4096, 10), "float32"),
        ((32, 32000), "float32"),
        ((256, 1000), "float16"),
    ],
    "cnn": {"examples": 2048, "image": (32, 32, 3), "filters": (32, 64, 128)},
    "mlp": {"examples": 8192, "features": 784, "units": 512},
    "cnn_batch_size": 64,
    "mlp_batch_size": 256,
    "memory": {"shape": (32, 56, 56, 128), "depths": (1, 4, 16)},
    # One fresh process per memory case: its resident-set peak is its own.
    "memory_process_per_case": True,
    "memory_timeout_seconds": 1800,
    "torch_bn_shapes": [(256, 1024), (64, 32, 32, 64), (32, 56, 56, 128)],
}
QUICK = {
    "repetitions": 3,
    "fit_repetitions": 3,
    "target_seconds": 0.01,
    # One case per kind still covers 2-D and 4-D inputs, float32 and float16.
    "bn_cases": [
        ("train", (32, 16), "float32"),
        ("inference", (4, 4, 4, 8), "float16"),
    ],
    "ce_cases": [((32, 10), "float32"), ((16, 10), "float16")],
    "cnn": {"examples": 64, "image": (8, 8, 3), "filters": (4, 8, 8)},
    "mlp": {"examples": 128, "features": 16, "units": 16},
    "cnn_batch_size": 32,
    "mlp_batch_size": 64,
    "memory": {"shape": (8, 16, 16, 128), "depths": (1, 2)},
    "memory_process_per_case": False,
    "memory_timeout_seconds": 300,
    "torch_bn_shapes": [(32, 16), (4, 4, 4, 8)],
}
CLASSES = 10
MODES = ("eager", "tf.function", "xla")


def compile_step(fn, mode):
    if mode == "eager":
        return fn
    return tf.function(fn, jit_compile=mode == "xla")


def random_labels(shape, classes, seed):
    return tf.random.stateless_uniform(
        shape, seed=[seed, 1], minval=0, maxval=classes, dtype=tf.int32
    )


def require_features(sections):
    """Fails loudly when a keras_bn feature the benchmark times is missing."""
    missing = []
    if "bn" in sections:
        params = inspect.signature(keras_bn.BatchNormalization.__init__).parameters
        if "fused" not in params:
            missing.append("the `fused` argument of keras_bn.BatchNormalization")
    if "ce" in sections or "fit" in sections:
        try:
            from keras_bn.losses import SoftmaxCrossEntropy
        except ImportError:
            SoftmaxCrossEntropy = None
        params = (
            ()
            if SoftmaxCrossEntropy is None
            else (inspect.signature(SoftmaxCrossEntropy).parameters)
        )
        if "sparse" not in params:
            missing.append("keras_bn.losses.SoftmaxCrossEntropy(sparse=...)")
    if missing:
        raise SystemExit(
            "benchmarks/run.py: cannot benchmark, keras_bn lacks "
            + "; ".join(missing)
            + "."
        )


# --- Batch normalization ----------------------------------------------------


def layer_step(layer, x, dy, training):
    layer(x, training=False)  # builds the weights outside any tf.function

    def inference():
        return layer(x, training=False)

    def train():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return tape.gradient(y, [x, *layer.trainable_weights], output_gradients=dy)

    return train if training else inference


def bn_steps(kind, shape, dtype, mode):
    x = random_normal(shape, 1, dtype)
    dy = random_normal(shape, 2, dtype)
    training = kind == "train"
    steps = {}
    for impl in BN_IMPLS:
        step = layer_step(bn_layer(impl, dtype, shape[-1]), x, dy, training)
        steps[impl] = compile_step(step, mode)
    return steps


def bn_cases(config):
    for kind, shape, dtype in config["bn_cases"]:
        for mode in MODES:
            case = {"kind": kind, "shape": list(shape), "dtype": dtype}
            yield (
                case,
                mode,
                lambda k=kind, s=shape, d=dtype, m=mode: bn_steps(k, s, d, m),
            )


# --- Softmax cross-entropy --------------------------------------------------


def keras_bn_cross_entropy(sparse):
    from keras_bn.losses import SoftmaxCrossEntropy

    return SoftmaxCrossEntropy(sparse=sparse)


def ce_losses(sparse):
    # tf.nn computes in the logits' dtype; the losses compute float16 logits
    # in float32, so the tf.nn row casts them (a no-op for float32).
    if sparse:
        keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

        def tf_nn(labels, logits):
            return tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(
                    labels=labels, logits=tf.cast(logits, tf.float32)
                )
            )

    else:
        keras_loss = keras.losses.CategoricalCrossentropy(from_logits=True)

        def tf_nn(labels, logits):
            return tf.reduce_mean(
                tf.nn.softmax_cross_entropy_with_logits(
                    labels=labels, logits=tf.cast(logits, tf.float32)
                )
            )

    return {
        "keras_bn": keras_bn_cross_entropy(sparse),
        "keras": keras_loss,
        "tf_nn": tf_nn,
    }


def ce_steps(sparse, shape, dtype, mode):
    logits = random_normal(shape, 3, dtype)
    labels = random_labels(shape[:-1], shape[-1], 4)
    if not sparse:
        labels = tf.one_hot(labels, shape[-1])

    def training_step(loss_fn):
        def step():
            with tf.GradientTape() as tape:
                tape.watch(logits)
                loss = loss_fn(labels, logits)
            return loss, tape.gradient(loss, logits)

        return step

    losses = ce_losses(sparse)
    return {impl: compile_step(training_step(losses[impl]), mode) for impl in CE_IMPLS}


def ce_cases(config):
    for sparse in (True, False):
        for shape, dtype in config["ce_cases"]:
            for mode in MODES:
                kind = "sparse" if sparse else "dense"
                case = {"kind": kind, "shape": list(shape), "dtype": dtype}
                yield (
                    case,
                    mode,
                    lambda sp=sparse, s=shape, d=dtype, m=mode: ce_steps(sp, s, d, m),
                )


# --- End to end: model.fit ---------------------------------------------------


def cnn_model(batch_norm, image, filters):
    inputs = keras.Input(image)
    x = inputs
    for i, f in enumerate(filters):
        strides = 1 if i == 0 else 2
        x = keras.layers.Conv2D(f, 3, strides, padding="same", use_bias=False)(x)
        x = batch_norm()(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES)(x))


def mlp_model(batch_norm, features, units):
    inputs = keras.Input((features,))
    x = inputs
    for _ in range(3):
        x = keras.layers.Dense(units, use_bias=False)(x)
        x = batch_norm()(x)
        x = keras.layers.ReLU()(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES)(x))


def fit_steps(model_name, config):
    if model_name == "cnn":
        spec = config["cnn"]
        x = random_normal((spec["examples"], *spec["image"]), 5)
        labels = random_labels((spec["examples"],), CLASSES, 6)
        batch_size = config["cnn_batch_size"]

        def build(batch_norm):
            return cnn_model(batch_norm, spec["image"], spec["filters"])

    else:
        spec = config["mlp"]
        x = random_normal((spec["examples"], spec["features"]), 7)
        labels = random_labels((spec["examples"],), CLASSES, 8)
        batch_size = config["mlp_batch_size"]

        def build(batch_norm):
            return mlp_model(batch_norm, spec["features"], spec["units"])

    # tf.data's autotuning stalls epochs here in steps of about 0.6 s, which
    # swamps the models' differences; both models get the same plain pipeline.
    options = tf.data.Options()
    options.autotune.enabled = False
    data = (
        tf.data.Dataset.from_tensor_slices((x, labels))
        .batch(batch_size)
        .with_options(options)
    )
    choices = {
        "keras_bn": (
            keras_bn.BatchNormalization,
            lambda: keras_bn_cross_entropy(sparse=True),
        ),
        "keras": (
            keras.layers.BatchNormalization,
            lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        ),
    }
    steps = {}
    for impl in FIT_IMPLS:
        batch_norm, loss = choices[impl]
        keras.utils.set_random_seed(0)  # the same initial weights for both
        model = build(batch_norm)
        model.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
            loss=loss(),
            jit_compile=False,
        )
        steps[impl] = lambda m=model: m.fit(data, epochs=1, verbose=0, shuffle=False)
    return steps


def fit_cases(config):
    for model_name in ("cnn", "mlp"):
        spec = dict(config[model_name], batch_size=config[f"{model_name}_batch_size"])
        case = {"kind": model_name, **spec}
        yield case, "fit", lambda n=model_name: fit_steps(n, config)


# --- Memory, the PyTorch peer ------------------------------------------------


def run_memory(config, depths):
    spec = config["memory"]
    return memory.run_memory_section(
        spec["shape"],
        depths or spec["depths"],
        config["memory_process_per_case"],
        config["memory_timeout_seconds"],
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )


def torch_cases(config):
    """The float32 BN training and cross-entropy cases, labelled as in bn/ce."""
    cases = [
        {"kind": "train", "shape": list(shape), "dtype": "float32"}
        for shape in config["torch_bn_shapes"]
    ]
    cases += [
        {"kind": kind, "shape": list(shape), "dtype": "float32"}
        for kind in ("sparse", "dense")
        for shape, dtype in config["ce_cases"]
        if dtype == "float32"
    ]
    return [dict(c, label=case_label("torch", c)) for c in cases]


def tensorflow_threads():
    """TensorFlow's intra-op threads: its setting, or the cores it defaults to."""
    threads = tf.config.threading.get_intra_op_parallelism_threads()
    if threads > 0:
        return threads
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def run_torch(config, repetitions):
    return torch_peer.run_torch_section(
        torch_cases(config),
        tensorflow_threads(),
        repetitions,
        config["target_seconds"],
        timeout=1800,
    )


def eager_summary(sections):
    """The eager rows of bn and ce: keras_bn / Keras and keras_bn / tf."""
    rows = []
    for section, reference in (("bn", "tf_fused"), ("ce", "tf_nn")):
        for e in sections.get(section, []):
            if e["mode"] == "eager":
                rows.append(
                    {
                        "section": section,
                        "label": e["label"],
                        "keras_bn/keras": e["ratios"]["keras_bn/keras"],
                        "keras_bn/tf": e["ratios"][f"keras_bn/{reference}"],
                    }
                )
    if not rows:
        return None
    worst = max(rows, key=lambda r: r["keras_bn/keras"])
    return {"rows": rows, "worst_keras_bn/keras": worst}


def format_eager_summary(summary):
    width = max(len("case"), *(len(r["label"]) for r in summary["rows"]))
    header = f"{'section':<7}  {'case':<{width}}  {'kbn/keras':>9}  {'kbn/tf':>9}"
    lines = [
        "Eager mode, all bn and ce cases: keras_bn / Keras's built-in, and "
        "keras_bn / tf (bn: the fused op, ce: tf.nn)",
        header,
        "-" * len(header),
    ]
    for r in summary["rows"]:
        lines.append(
            f"{r['section']:<7}  {r['label']:<{width}}  "
            f"{r['keras_bn/keras']:>9.2f}  {r['keras_bn/tf']:>9.2f}"
        )
    worst = summary["worst_keras_bn/keras"]
    lines.append(
        f"largest keras_bn / Keras: {worst['keras_bn/keras']:.2f} "
        f"({worst['section']} {worst['label']})"
    )
    return "\n".join(lines)


def section_failures(results):
    """Names of the memory rows and peer that failed (timed sections raise)."""
    failures = []
    if "memory" in results["sections"]:
        for row in memory.failed_rows(results["sections"]["memory"]):
            failures.append(f"memory {row['impl']} {row['mode']} {row['dtype']}")
    if "error" in results["sections"].get("torch", {}):
        failures.append("torch peer")
    return failures


# --- Running, reporting ------------------------------------------------------


def run_section(section, cases, repetitions, target_seconds):
    entries = []
    for case, mode, make_steps in cases:
        gc.collect()
        started = time.perf_counter()
        timings = time_interleaved(make_steps(), repetitions, target_seconds)
        medians = {impl: t.median * 1e3 for impl, t in timings.items()}
        ratios = {f"{a}/{b}": medians[a] / medians[b] for a, b in RATIOS[section]}
        entry = {
            "section": section,
            "case": case,
            "label": case_label(section, case),
            "mode": mode,
            "medians_ms": medians,
            "ratios": ratios,
            "timings": {impl: t.as_dict() for impl, t in timings.items()},
        }
        entries.append(entry)
        print(
            f"  {section} {entry['label']} [{mode}] "
            f"{time.perf_counter() - started:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    return entries


def case_label(section, case):
    """`train 256x1024`, `sparse 256x1000 float16`, `cnn epoch`."""
    if section == "fit":
        return f"{case['kind']} epoch"
    shape = "x".join(str(d) for d in case["shape"])
    dtype = "" if case["dtype"] == "float32" else f" {case['dtype']}"
    return f"{case['kind']} {shape}{dtype}"


def format_table(section, entries):
    impls = list(entries[0]["medians_ms"])
    ratio_names = list(entries[0]["ratios"])
    label_width = max(len("case"), *(len(e["label"]) for e in entries))
    columns = [COLUMN_NAMES[i] for i in impls] + [
        "/".join(RATIO_NAMES[p] for p in r.split("/")) for r in ratio_names
    ]
    widths = [max(9, len(c)) for c in columns]
    header = f"{'case':<{label_width}}  {'mode':<11}  " + "  ".join(
        f"{c:>{w}}" for c, w in zip(columns, widths)
    )
    lines = [header, "-" * len(header)]
    for e in entries:
        values = [f"{e['medians_ms'][i]:.3f}" for i in impls]
        values += [f"{e['ratios'][r]:.2f}" for r in ratio_names]
        lines.append(
            f"{e['label']:<{label_width}}  {e['mode']:<11}  "
            + "  ".join(f"{v:>{w}}" for v, w in zip(values, widths))
        )
    return "\n".join(lines)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def onednn_setting():
    value = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    try:
        from tensorflow.python.util import _pywrap_util_port

        enabled = bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        enabled = None
    return {"TF_ENABLE_ONEDNN_OPTS": value, "onednn_enabled": enabled}


def git_revision():
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def machine_info():
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_bn": keras_bn.__version__,
        "keras_bn_revision": git_revision(),
        "onednn": onednn_setting(),
        "tf_threads": {
            "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
        },
    }


def load_average():
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def summary_line(results):
    machine, settings = results["machine"], results["settings"]
    onednn = {True: "on", False: "off", None: "unknown"}
    line = (
        f"{machine['cpu_model']}, {machine['cpus_available']} cores, "
        f"TF {machine['tensorflow']}, Keras {machine['keras']}, oneDNN "
        f"{onednn[machine['onednn']['onednn_enabled']]}; "
        f"{settings['repetitions']} reps ({settings['fit_repetitions']} for fit)"
    )
    start, end = results["load_average_start"], results["load_average_end"]
    if start and end:
        line += f"; 1-min load average {start[0]:.1f} -> {end[0]:.1f}"
    return line + ("; QUICK: tiny shapes" if settings["quick"] else "")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes, 3 repetitions, fewer cases, memory cases in one "
        "process: every code path in about a minute (not for drawing conclusions)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        help="run only these sections (default: all)",
    )
    parser.add_argument(
        "--skip",
        nargs="+",
        choices=SECTIONS,
        default=(),
        help="leave out these sections",
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=DEFAULT_OUT,
        help=f"JSON output path (default: {DEFAULT_OUT.relative_to(REPO)})",
    )
    parser.add_argument(
        "--reps",
        type=int,
        default=None,
        help="repetitions of the bn, ce and torch cases (default 7, 3 with --quick)",
    )
    parser.add_argument(
        "--fit-reps",
        type=int,
        default=None,
        help="repetitions of the fit epochs (default 3)",
    )
    parser.add_argument(
        "--memory-depths",
        type=int,
        nargs="+",
        default=None,
        help="stack depths of the memory section, two or more (default 1 4 16; "
        "1 2 with --quick)",
    )
    args = parser.parse_args(argv)
    for name in ("reps", "fit_reps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    depths = args.memory_depths
    if depths is not None and (len(set(depths)) < 2 or min(depths) < 1):
        parser.error(f"--memory-depths needs two or more depths >= 1, got {depths}")
    return args


def main(argv=None):
    args = parse_args(argv)
    sections = [
        s
        for s in SECTIONS
        if (args.only is None or s in args.only) and s not in args.skip
    ]
    if not sections:
        raise SystemExit("benchmarks/run.py: --only and --skip leave no section.")
    require_features(sections)
    config = QUICK if args.quick else FULL
    repetitions = args.reps or config["repetitions"]
    fit_repetitions = args.fit_reps or config["fit_repetitions"]
    tf.get_logger().setLevel("ERROR")  # retracing notices: every case traces anew
    keras.utils.set_random_seed(0)

    results = {
        "machine": machine_info(),
        "settings": {
            "quick": args.quick,
            "sections": sections,
            "repetitions": repetitions,
            "fit_repetitions": fit_repetitions,
            "target_seconds_per_repetition": config["target_seconds"],
            "momentum": MOMENTUM,
            "epsilon": EPSILON,
            "tensorflow_threads": tensorflow_threads(),
        },
        "load_average_start": load_average(),
        "sections": {},
    }
    started = time.perf_counter()
    runners = {
        "bn": lambda: run_section(
            "bn", bn_cases(config), repetitions, config["target_seconds"]
        ),
        "ce": lambda: run_section(
            "ce", ce_cases(config), repetitions, config["target_seconds"]
        ),
        # One epoch per repetition; the untimed first one traces the train step.
        "fit": lambda: run_section("fit", fit_cases(config), fit_repetitions, None),
        "memory": lambda: run_memory(config, args.memory_depths),
        "torch": lambda: run_torch(config, repetitions),
    }
    for section in sections:
        print(f"{section}:", file=sys.stderr, flush=True)
        results["sections"][section] = runners[section]()
    results["eager_summary"] = eager_summary(results["sections"])
    results["load_average_end"] = load_average()
    results["wall_seconds"] = time.perf_counter() - started

    print(summary_line(results))
    for section, content in results["sections"].items():
        if section == "memory":
            print(f"\n{memory.format_memory_table(content)}")
        elif section == "torch":
            print(f"\n{torch_peer.format_torch_table(content, results['sections'])}")
        else:
            print(f"\n{TITLES[section]}\n{format_table(section, content)}")
    if results["eager_summary"] is not None:
        print(f"\n{format_eager_summary(results['eager_summary'])}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwall time {results['wall_seconds']:.0f} s; results in {args.out}")
    failures = section_failures(results)
    if failures:
        raise SystemExit("benchmarks/run.py: failed: " + ", ".join(failures))


if __name__ == "__main__":
    main()
