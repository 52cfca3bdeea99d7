"""GPU check: placement, numerics against a reference device, XLA, speed.

Four sections, each run on `--device` (default `GPU:0`):

- `placement`: the fused batch-norm kernels (`FusedBatchNormV3`,
  `FusedBatchNormGradV3`), the cross-entropy ops and the large-vocabulary
  op (`linear_softmax_cross_entropy`, per token and its fast gradient for a
  mean) run on the device, for every dtype, eagerly, under `tf.function`
  and under XLA; nothing moves a floating-point tensor between devices
  inside a step. Graph modes are read from TensorFlow's run metadata (the
  partitioned graphs it executed, each node with the device it ran on,
  `_Send`/`_Recv` nodes for every transfer). Eager ops are read from
  `tf.debugging.set_log_device_placement` in a child process (the setting
  takes effect only at start-up), and reads of tensors into host memory
  (`.numpy()`, `bool()`, `tf.get_static_value`) are counted in this
  process. Every op must be a standard TensorFlow op (no Python callbacks
  such as `EagerPyFunc`).
- `numerics`: every layer path of `keras_bn.BatchNormalization` (fused and
  closed form, automatic, channels-first, synchronized, Ghost BN, renorm,
  `momentum=None`, masks) and `keras_bn.losses.SoftmaxCrossEntropy` (dense,
  sparse, per-pixel), under the policies `float32`, `mixed_float16` and
  `mixed_bfloat16`, in training and inference, and the large-vocabulary op
  (both paths, several blocks of tokens): outputs, gradients and the
  moving statistics on the device, eagerly and under `tf.function`, against
  the same computation run eagerly on `--reference` (default `CPU:0`).
- `xla`: the same cases under `tf.function(jit_compile=True)` on the device:
  each must compile and match the reference.
- `speed`: the main ratios of `benchmarks/run.py` (keras_bn against
  Keras's built-ins and the tf.nn / fused kernels, medians of several
  repetitions), on the device. Reported, not judged.

Tolerances. A result of dtype `d` computed by two devices may differ by one
rounding to `d` (2 units of roundoff of `d`, relative to the result's largest
magnitude) plus the float32 rounding error of its reductions (`n` terms per
reduction: 8 * sqrt(n) units of float32 roundoff, the statistical growth of
rounding error in a sum with room for a few chained reductions). Each row
prints the largest error as a fraction of that bound: "pass" means every
fraction is at most 1.

On a machine without a GPU the script says so and exits 0; `--device CPU:1
--reference CPU:0` (the script splits the CPU into two logical devices) runs
the very same checks between two CPU devices. Exit status 1 if a check failed.

Usage:
    python benchmarks/gpu_check.py                   # GPU:0 against CPU:0
    python benchmarks/gpu_check.py --device CPU:1    # CPU against CPU
    python benchmarks/gpu_check.py --quick --skip speed
"""

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

import keras_bn

HERE = pathlib.Path(__file__).resolve().parent
SECTIONS = ("placement", "numerics", "xla", "speed")
POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
# Units of roundoff: half the spacing of the dtype's numbers at 1.
ROUNDOFF = {"float32": 2**-24, "float16": 2**-11, "bfloat16": 2**-8, "float64": 2**-53}
# Rounding error in a float32 sum of n terms grows as sqrt(n) (as n in the
# worst case, which would let relative errors of 2e-4 pass); 8 allows for a
# few chained reductions (mean, variance, gradients).
FLOAT32_REDUCTION_SAFETY = 8
TRANSFER_OPS = {"_Send", "_Recv", "_HostSend", "_HostRecv"}
PYTHON_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}

# Layer paths: constructor arguments, input shape, whether a mask is passed.
BN_PATHS = {
    "fused": ({"fused": True}, (16, 5, 5, 8), False),
    "fused_channels_first": ({"fused": True, "axis": 1}, (16, 8, 5, 5), False),
    "closed_form": ({"fused": False}, (16, 5, 5, 8), False),
    "automatic": ({}, (16, 5, 5, 8), False),
    "synchronized": ({"synchronized": True}, (16, 5, 5, 8), False),
    "ghost": ({"virtual_batch_size": 4}, (16, 5, 5, 8), False),
    "renorm": (
        {"renorm": True, "renorm_clipping": {"rmax": 2.0, "rmin": 0.5, "dmax": 1.0}},
        (16, 5, 5, 8),
        False,
    ),
    "momentum_none": ({"momentum": None}, (16, 5, 5, 8), False),
    "masked": ({}, (16, 10, 8), True),
}
CE_PATHS = {
    "sparse": (True, (32, 10)),
    "dense": (False, (32, 10)),
    "sparse_per_pixel": (True, (4, 5, 5, 6)),
}
QUICK_BN_PATHS = ("fused", "closed_form", "synchronized", "masked")
# The large-vocabulary op: its `reduction` and (tokens, features, classes).
# Chunks of 4 classes make the fast gradient two blocks of 16 tokens, the
# second padded.
LINEAR_PATHS = {"linear": (None, (24, 8, 40)), "linear_mean": ("mean", (24, 8, 40))}
QUICK_CE_PATHS = ("sparse", "dense", "linear_mean")


@dataclasses.dataclass
class Check:
    """One row of the report; `passed` None: not checked, with the reason."""

    section: str
    name: str
    passed: bool | None
    detail: str = ""


# --- Devices ------------------------------------------------------------------


def split_cpu():
    """Two logical CPUs, so that CPU-vs-CPU runs have two devices and the
    synchronized path two replicas. Must run before TensorFlow starts."""
    cpus = tf.config.list_physical_devices("CPU")
    try:
        if len(tf.config.get_logical_device_configuration(cpus[0]) or []) < 2:
            tf.config.set_logical_device_configuration(
                cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
            )
    except RuntimeError:
        pass  # already initialized (e.g. by a test's conftest): keep as is


def full_name(device):
    """`GPU:0` as TensorFlow names placed nodes, or None if it does not exist."""
    kind, _, index = device.upper().partition(":")
    for logical in tf.config.list_logical_devices(kind):
        if logical.name.endswith(f"device:{kind}:{index or 0}"):
            return logical.name
    return None


def replica_devices(device):
    """Two devices of the device's kind for the synchronized path, or one."""
    kind = device.upper().partition(":")[0]
    names = [d.name for d in tf.config.list_logical_devices(kind)]
    return names[:2] if len(names) >= 2 else [full_name(device)]


# --- Placement ----------------------------------------------------------------


@contextlib.contextmanager
def host_reads():
    """Records every read of an eager tensor into host memory (`.numpy()`,
    `bool()`, `float()`, `tf.get_static_value`), as (dtype, shape, device).

    All of them go through `_EagerTensorBase._numpy`, a TensorFlow internal;
    if it has moved, nothing is recorded and the list holds None.
    """
    from tensorflow.python.framework import ops

    reads = []
    original = getattr(ops._EagerTensorBase, "_numpy", None)
    if original is None:
        reads.append(None)
        yield reads
        return

    def recording(self):
        reads.append((self.dtype.name, tuple(self.shape), self.device))
        return original(self)

    ops._EagerTensorBase._numpy = recording
    try:
        yield reads
    finally:
        ops._EagerTensorBase._numpy = original


def same_device(a, b):
    """Whether two device names (full or short) name the same device."""
    a, b = tf.DeviceSpec.from_string(a), tf.DeviceSpec.from_string(b)
    return (a.device_type, a.device_index) == (b.device_type, b.device_index)


def on_host(device):
    return tf.DeviceSpec.from_string(device).device_type == "CPU"


def executed_graph_nodes(make_step):
    """(op, device, dtypes) of every node TensorFlow ran for the graph
    function that `make_step` returns, from the partitioned graphs of the run
    metadata (recorded when a function is instantiated, hence from the first
    call on). Uses TensorFlow's eager context (`tensorflow.python`)."""
    from tensorflow.python.eager import context

    ctx = context.context()
    step = make_step()  # eager set-up, before recording
    ctx.enable_run_metadata()
    try:
        ctx.export_run_metadata()  # drops anything recorded before
        step()
        step()
        metadata = ctx.export_run_metadata()
    finally:
        ctx.disable_run_metadata()
    nodes = []
    for graph in metadata.function_graphs:
        for partition in graph.partition_graphs:
            for node in partition.node:
                dtypes = {
                    tf.dtypes.DType(v.type).name
                    for k, v in node.attr.items()
                    if k in ("T", "dtype", "tensor_type", "DstT", "out_type", "U")
                    and v.type
                }
                nodes.append((node.op, node.device, dtypes))
    return nodes


def placement_problems(nodes, target, expected):
    """What breaks placement: ops off the target device (shape arithmetic
    in int32/int64 on the host excepted), float transfers between devices,
    Python callbacks, unknown ops, and expected kernels that did not run.
    `dtypes` None: unknown (eager logs), counted as floating."""
    problems = []
    for op, device, dtypes in nodes:
        floating = dtypes is None or any(tf.as_dtype(d).is_floating for d in dtypes)
        if op in TRANSFER_OPS:
            if floating:
                problems.append(f"transfer {op} {sorted(dtypes or ())}")
        elif op in PYTHON_OPS:
            problems.append(f"Python callback {op}")
        elif not (op.startswith("_") or hasattr(tf.raw_ops, op)):
            problems.append(f"non-standard op {op}")
        elif device and not same_device(device, target) and floating:
            problems.append(f"{op} on {device}")
    ran = {op for op, device, _ in nodes if not device or same_device(device, target)}
    for kernel in expected:
        # oneDNN builds rename the fused kernels (`_MklNativeFusedBatchNormV3`).
        if not any(op == kernel or op.endswith("Native" + kernel) for op in ran):
            problems.append(f"{kernel} did not run on the device")
    return sorted(set(problems))


def bn_placement_step(policy, training, mode):
    """A fused batch-norm step (forward and gradients, or inference)."""
    layer = keras_bn.BatchNormalization(fused=True, dtype=policy)
    x = tf.cast(tf.random.stateless_normal([16, 5, 5, 8], [1, 2]), layer.compute_dtype)
    layer(x, training=False)

    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training)
        return y, tape.gradient(y, [x, *layer.trainable_weights])

    return compile_step(step, mode)


def ce_placement_step(sparse, dtype, mode):
    loss = keras_bn.losses.SoftmaxCrossEntropy(sparse=sparse)
    logits = tf.cast(tf.random.stateless_normal([32, 10], [3, 4]), dtype)
    labels = tf.random.stateless_uniform([32], [5, 6], maxval=10, dtype=tf.int32)
    if not sparse:
        labels = tf.one_hot(labels, 10)

    def step():
        with tf.GradientTape() as tape:
            tape.watch(logits)
            value = loss(labels, logits)
        return value, tape.gradient(value, logits)

    return compile_step(step, mode)


def linear_placement_step(path, dtype, mode):
    inputs = linear_inputs(path, dtype)
    step = linear_step(LINEAR_PATHS[path][0])
    return compile_step(lambda: step(*inputs), mode)


def placement_cases(modes, quick=False):
    """(name, mode, make_step, expected kernels) for every placement case."""
    policies = ("float32",) if quick else POLICIES
    for mode in modes:
        for policy in policies:
            dtype = policy.replace("mixed_", "")
            for training in (True, False):
                expected = ()
                if mode != "xla":  # XLA compiles its own kernels
                    expected = ("FusedBatchNormV3",)
                    expected += ("FusedBatchNormGradV3",) if training else ()
                kind = "train" if training else "inference"
                yield (
                    f"bn fused {kind} {dtype} [{mode}]",
                    mode,
                    lambda p=policy, t=training, m=mode: bn_placement_step(p, t, m),
                    expected,
                )
            for sparse in (True, False):
                kind = "sparse" if sparse else "dense"
                # Eagerly, the sparse loss runs on TensorFlow's kernel.
                expected = ()
                if sparse and mode == "eager":
                    expected = ("SparseSoftmaxCrossEntropyWithLogits",)
                yield (
                    f"ce {kind} {dtype} [{mode}]",
                    mode,
                    lambda s=sparse, d=dtype, m=mode: ce_placement_step(s, d, m),
                    expected,
                )
            for path in LINEAR_PATHS:
                yield (
                    f"ce {path} {dtype} [{mode}]",
                    mode,
                    lambda p=path, d=dtype, m=mode: linear_placement_step(p, d, m),
                    (),
                )


# Read from TensorFlow's placement log: eager ops, and XLA launches (which
# leave no function graph in the run metadata).
LOGGED_MODES = ("eager", "xla")


def probe_placement(device, quick):
    """Child process: runs the logged placement cases, marking each on stderr,
    where TensorFlow logs every eager op and function call it executes."""
    tf.debugging.set_log_device_placement(True)
    with tf.device(device):
        for name, _, make_step, _ in placement_cases(LOGGED_MODES, quick):
            step = make_step()
            step()  # warm-up: tracing, compilation and setup ops
            os.write(2, f"\n@@begin {name}\n".encode())
            step()
            os.write(2, f"\n@@end {name}\n".encode())


def logged_placement_nodes(device, quick, timeout):
    """{case: [(op, device, None)]} of the logged cases, from a child process
    (the placement log takes effect only when set at start-up)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0")
    command = [sys.executable, __file__, "--probe-placement", "--device", device]
    completed = subprocess.run(
        command + (["--quick"] if quick else []),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"placement probe failed:\n{completed.stderr[-3000:]}")
    cases, current = {}, None
    for line in completed.stderr.splitlines():
        if line.startswith("@@begin "):
            current = cases.setdefault(line[len("@@begin ") :], [])
        elif line.startswith("@@end "):
            current = None
        elif current is not None:
            match = re.search(r"Executing op (\S+) in device (\S+)", line)
            if match:
                current.append((match.group(1), match.group(2), None))
    return cases


def host_read_problems(reads):
    """Reads into host memory of floating tensors that live on another
    device: each is a device-to-host copy and a wait inside the math. Reads
    of host tensors and of integers (label checks, shapes) are notes."""
    problems, notes = [], []
    for read in reads:
        if read is None:
            notes.append("host reads not observable in this TensorFlow")
            continue
        dtype, shape, device = read
        text = f"host read of {dtype} {list(shape)}"
        floating = tf.as_dtype(dtype).is_floating
        (problems if floating and not on_host(device) else notes).append(text)
    return problems, notes


def check_placement(device, quick, timeout):
    target = full_name(device)
    logged = logged_placement_nodes(device, quick, timeout)
    checks = []
    modes = ("eager", "tf.function", "xla")
    for name, mode, make_step, expected in placement_cases(modes, quick):
        with tf.device(device):
            if mode in LOGGED_MODES:
                nodes = logged.get(name, [])
                step = make_step()
                step()
            else:
                nodes = executed_graph_nodes(make_step)
                step = make_step()
                step()
            with host_reads() as reads:
                step()
        problems = placement_problems(nodes, target, expected)
        if not nodes:
            problems.append("no executed op was recorded")
        read_problems, notes = host_read_problems(reads)
        problems += read_problems
        fused = sorted({op for op, _, _ in nodes if "FusedBatchNorm" in op})
        detail = f"{len(nodes)} ops on the device" + "".join(f", {op}" for op in fused)
        if notes:
            detail += "; " + "; ".join(sorted(set(notes)))
        checks.append(
            Check("placement", name, not problems, "; ".join(problems) or detail)
        )
    return checks


# --- Numerics -----------------------------------------------------------------


def compile_step(fn, mode):
    if mode == "eager":
        return fn
    return tf.function(fn, jit_compile=mode == "xla")


def bn_inputs(path):
    """float32 inputs, upstream gradients, weights and mask of a path."""
    config, shape, masked = BN_PATHS[path]
    rng = np.random.default_rng(7)
    x = rng.normal(2.0, 3.0, size=shape).astype("float32")
    dy = rng.normal(size=shape).astype("float32")
    axis = config.get("axis", -1) % len(shape)
    features = shape[axis]
    weights = {
        "gamma": rng.uniform(0.5, 1.5, features),
        "beta": rng.normal(size=features),
        "moving_mean": rng.normal(2.0, 1.0, features),
        "moving_variance": rng.uniform(4.0, 12.0, features),
    }
    mask = None
    if masked:
        mask = rng.random(shape[:-1]) < 0.7
    return x, dy, weights, mask, axis


def make_bn_layer(path, policy, shape, weights):
    config = BN_PATHS[path][0]
    layer = keras_bn.BatchNormalization(**{"momentum": 0.9, **config}, dtype=policy)
    layer.build(shape)
    for variable in layer.weights:
        name = variable.name.split("/")[-1]
        if name in weights:
            variable.assign(weights[name].astype(variable.dtype))
        elif name in ("moving_stddev", "renorm_stddev"):
            variable.assign(np.sqrt(weights["moving_variance"]).astype("float32"))
        elif name == "renorm_mean":
            variable.assign(weights["moving_mean"].astype("float32"))
    return layer


def bn_step(layer, training):
    def step(x, dy, mask):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training, mask=mask)
        grads = tape.gradient(y, [x, *layer.trainable_weights], output_gradients=dy)
        return [y, *grads]

    return step


def run_bn(path, policy, training, device, mode):
    """{name: array} of one batch-norm case on `device` in `mode`."""
    dtype = policy.replace("mixed_", "")
    x, dy, weights, mask, _ = bn_inputs(path)
    if path == "synchronized" and mode != "eager":
        return run_bn_synchronized(x, dy, weights, policy, training, device, mode)
    with tf.device(device):
        layer = make_bn_layer(path, policy, x.shape, weights)
        step = compile_step(bn_step(layer, training), mode)
        args = [tf.constant(x, dtype), tf.constant(dy, dtype)]
        args.append(None if mask is None else tf.constant(mask))
        results = step(*args)
        return bn_results(results, layer)


def bn_results(results, layer):
    out = dict(zip(["y", "dx", "dgamma", "dbeta"], [np.asarray(r) for r in results]))
    for variable in layer.non_trainable_weights:
        out[variable.name.split("/")[-1]] = np.asarray(variable.value)
    return out


_STRATEGIES = {}


def mirrored(devices):
    # One strategy per device set: a second one over the same devices breaks
    # the first's collectives.
    key = tuple(devices)
    if key not in _STRATEGIES:
        _STRATEGIES[key] = tf.distribute.MirroredStrategy(list(devices))
    return _STRATEGIES[key]


def run_bn_synchronized(x, dy, weights, policy, training, device, mode):
    """The synchronized layer under a MirroredStrategy over two devices of
    the device's kind, the batch split between them; results joined."""
    devices = replica_devices(device)
    dtype = policy.replace("mixed_", "")
    strategy = mirrored(devices)
    halves = np.array_split(np.arange(len(x)), len(devices))

    def per_replica(array):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(array[halves[ctx.replica_id_in_sync_group]], dtype)
        )

    with strategy.scope():
        layer = make_bn_layer("synchronized", policy, x.shape, weights)
    step = bn_step(layer, training)
    if mode == "xla":  # XLA compiles each replica's step; the strategy joins them
        step = tf.function(step, jit_compile=True)
    run = tf.function(lambda a, b: strategy.run(step, args=(a, b, None)))
    results = [
        strategy.experimental_local_results(t)
        for t in run(per_replica(x), per_replica(dy))
    ]
    y, dx = (np.concatenate([np.asarray(t) for t in ts]) for ts in results[:2])
    dgamma, dbeta = (sum(np.asarray(t) for t in ts) for ts in results[2:])
    out = {"y": y, "dx": dx, "dgamma": dgamma, "dbeta": dbeta}
    for variable in layer.non_trainable_weights:
        out[variable.name.split("/")[-1]] = np.asarray(variable.value.values[0])
    return out


def ce_inputs(path):
    """Labels and float32 logits of a path."""
    sparse, shape = CE_PATHS[path]
    rng = np.random.default_rng(11)
    logits = rng.normal(0.0, 3.0, size=shape).astype("float32")
    ids = rng.integers(0, shape[-1], size=shape[:-1])
    labels = ids.astype("int32") if sparse else np.eye(shape[-1])[ids].astype("float32")
    if not sparse:
        labels = 0.8 * labels + 0.2 * rng.dirichlet(np.ones(shape[-1]), shape[:-1])
    return labels, logits


def linear_step(reduction):
    """The large-vocabulary op's loss (a mean) and gradients to its inputs."""

    def step(labels, hidden, kernel, bias):
        with tf.GradientTape() as tape:
            tape.watch([hidden, kernel, bias])
            value = keras_bn.ops.linear_softmax_cross_entropy(
                labels, hidden, kernel, bias, chunk_size=4, reduction=reduction
            )
            if reduction is None:
                value = tf.reduce_mean(value)
        return (value, *tape.gradient(value, [hidden, kernel, bias]))

    return step


def linear_inputs(path, dtype):
    tokens, features, classes = LINEAR_PATHS[path][1]
    rng = np.random.default_rng(12)
    floats = (
        rng.normal(size=(tokens, features)),
        rng.normal(size=(features, classes)) / np.sqrt(features),
        rng.normal(0.0, 0.1, size=classes),
    )
    labels = tf.constant(rng.integers(0, classes, size=tokens).astype("int32"))
    return (labels, *(tf.constant(a.astype("float32"), dtype) for a in floats))


def run_ce(path, policy, device, mode):
    dtype = policy.replace("mixed_", "")
    if path in LINEAR_PATHS:
        step = compile_step(linear_step(LINEAR_PATHS[path][0]), mode)
        with tf.device(device):
            out = step(*linear_inputs(path, dtype))
        names = ("loss", "dhidden", "dkernel", "dbias")
        return {name: np.asarray(t) for name, t in zip(names, out)}
    labels, logits = ce_inputs(path)
    loss = keras_bn.losses.SoftmaxCrossEntropy(sparse=CE_PATHS[path][0])

    def step(labels, logits):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            value = loss(labels, logits)
        return value, tape.gradient(value, logits)

    with tf.device(device):
        value, grad = compile_step(step, mode)(
            tf.constant(labels), tf.constant(logits, dtype)
        )
    return {"loss": np.asarray(value), "dlogits": np.asarray(grad)}


def reduction_terms(case_kind, shape, path):
    """Terms per reduction: positions per feature (BN), classes (CE)."""
    if case_kind == "ce":
        return shape[-1]
    axis = BN_PATHS[path][0].get("axis", -1) % len(shape)
    return int(np.prod(shape)) // shape[axis]


def error_fraction(got, want, terms):
    """The largest |got - want| as a fraction of the bound of the module
    docstring, for the dtype of `want`."""
    dtype = str(want.dtype) if want.dtype != np.dtype("O") else "float32"
    if not np.issubdtype(want.dtype, np.floating) and dtype != "bfloat16":
        return 0.0 if np.array_equal(got, want) else np.inf
    got64, want64 = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if not (np.isfinite(got64).all() and np.isfinite(want64).all()):
        return 0.0 if np.array_equal(got64, want64, equal_nan=True) else np.inf
    scale = max(np.max(np.abs(want64), initial=0.0), np.finfo(np.float32).tiny)
    bound = scale * (
        2 * ROUNDOFF.get(dtype, ROUNDOFF["float32"])
        + FLOAT32_REDUCTION_SAFETY * np.sqrt(terms) * ROUNDOFF["float32"]
    )
    return float(np.max(np.abs(got64 - want64), initial=0.0) / bound)


def compare(got, want, terms, perturb):
    """{name: error fraction}; `perturb` scales the device's floating
    results by (1 + perturb) first (a self-test of the comparison)."""
    fractions = {}
    for name, w in want.items():
        g = got.get(name)
        if g is None or np.shape(g) != np.shape(w):
            fractions[name] = np.inf
            continue
        if perturb and (
            np.issubdtype(g.dtype, np.floating) or str(g.dtype) == "bfloat16"
        ):
            g = (np.asarray(g, np.float64) * (1 + perturb)).astype(g.dtype)
        fractions[name] = error_fraction(g, w, terms)
    return fractions


def numeric_cases(quick):
    bn_paths = QUICK_BN_PATHS if quick else tuple(BN_PATHS)
    ce_paths = QUICK_CE_PATHS if quick else (*CE_PATHS, *LINEAR_PATHS)
    policies = ("float32", "mixed_float16") if quick else POLICIES
    for policy in policies:
        for path in bn_paths:
            for training in (True, False):
                yield "bn", path, policy, training
        for path in ce_paths:
            yield "ce", path, policy, None


def run_case(kind, path, policy, training, device, mode):
    if kind == "bn":
        return run_bn(path, policy, training, device, mode)
    return run_ce(path, policy, device, mode)


def case_name(kind, path, policy, training):
    dtype = policy.replace("mixed_", "")
    if kind == "ce":
        return f"ce {path} {dtype}"
    return f"bn {path} {'train' if training else 'inference'} {dtype}"


def check_numerics(device, reference, modes, quick, perturb):
    checks = []
    for kind, path, policy, training in numeric_cases(quick):
        name = case_name(kind, path, policy, training)
        want = run_case(kind, path, policy, training, reference, "eager")
        shapes = {**CE_PATHS, **LINEAR_PATHS}
        shape = bn_inputs(path)[0].shape if kind == "bn" else shapes[path][1]
        terms = reduction_terms(kind, shape, path)
        for mode in modes:
            section = "xla" if mode == "xla" else "numerics"
            if path == "synchronized" and mode == "xla" and on_host(device):
                reason = (
                    "not checked: on logical CPU devices, an XLA step inside "
                    "MirroredStrategy.run cannot reach the second replica's "
                    "variables (Keras's Dense fails alike)"
                )
                checks.append(Check(section, f"{name} [{mode}]", None, reason))
                continue
            try:
                got = run_case(kind, path, policy, training, device, mode)
            except Exception as error:  # a failure to compile or run is a result
                first = str(error).strip().splitlines()[0][:200]
                checks.append(Check(section, f"{name} [{mode}]", False, first))
                continue
            fractions = compare(got, want, terms, perturb)
            worst = max(fractions, key=fractions.get)
            failed = sorted(k for k, v in fractions.items() if not v <= 1.0)
            detail = f"worst {worst}: {fractions[worst]:.2g} of the bound"
            if path == "synchronized" and len(replica_devices(device)) < 2:
                detail += "; one replica only (one device of this kind)"
            if failed:
                detail += "; over the bound: " + ", ".join(failed)
            checks.append(Check(section, f"{name} [{mode}]", not failed, detail))
    return checks


# --- Speed --------------------------------------------------------------------


SPEED = {
    "full": {
        "bn": [
            ("train", (32, 56, 56, 128), "float32"),
            ("train", (32, 56, 56, 128), "float16"),
            ("inference", (32, 56, 56, 128), "float32"),
            ("train", (256, 1024), "float32"),
        ],
        "ce": [((256, 1000), "float32"), ((32, 32000), "float32")],
        "modes": ("eager", "tf.function", "xla"),
        "repetitions": 7,
        "target_seconds": 0.1,
    },
    "quick": {
        "bn": [("train", (8, 4, 4, 8), "float32")],
        "ce": [((16, 10), "float32")],
        "modes": ("tf.function",),
        "repetitions": 3,
        "target_seconds": 0.01,
    },
}


def synchronized(fn):
    """`fn` then a read of a few bytes of its result. GPU ops run
    asynchronously: without the read, a loop would time only the launches.
    Every implementation pays the same small copy."""

    def call():
        result = tf.nest.flatten(fn())
        smallest = min(result, key=lambda t: t.shape.num_elements() or 0)
        np.asarray(tf.reshape(smallest, [-1])[:1])

    return call


def check_speed(device, quick):
    sys.path.insert(0, str(HERE))
    import run  # benchmarks/run.py: the steps and ratios of the benchmark
    from _timing import time_interleaved

    config = SPEED["quick" if quick else "full"]
    checks = []
    cases = [("bn", kind, shape, dtype) for kind, shape, dtype in config["bn"]]
    cases += [
        ("ce", sparse, shape, dtype)
        for shape, dtype in config["ce"]
        for sparse in ("sparse", "dense")
    ]
    for section, kind, shape, dtype in cases:
        for mode in config["modes"]:
            with tf.device(device):
                if section == "bn":
                    steps = run.bn_steps(kind, shape, dtype, mode)
                else:
                    steps = run.ce_steps(kind == "sparse", shape, dtype, mode)
                steps = {impl: synchronized(step) for impl, step in steps.items()}
                timings = time_interleaved(
                    steps, config["repetitions"], config["target_seconds"]
                )
            medians = {impl: t.median * 1e3 for impl, t in timings.items()}
            ratios = ", ".join(
                f"{a}/{b} {medians[a] / medians[b]:.2f}" for a, b in run.RATIOS[section]
            )
            label = f"{section} {kind} {'x'.join(map(str, shape))} {dtype} [{mode}]"
            times = ", ".join(f"{k} {v:.3f} ms" for k, v in medians.items())
            checks.append(Check("speed", label, True, f"{ratios}; {times}"))
    return checks


# --- Main -----------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="GPU:0", help="device under test")
    parser.add_argument(
        "--reference", default="CPU:0", help="device of the reference results"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer paths and dtypes, tiny speed cases (a smoke test)",
    )
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these")
    parser.add_argument(
        "--skip", nargs="+", choices=SECTIONS, default=(), help="leave out these"
    )
    parser.add_argument(
        "--perturb",
        type=float,
        default=0.0,
        help="self-test: scale the device's results by (1 + PERTURB) before "
        "comparing them; the numerics and xla checks must then fail",
    )
    parser.add_argument(
        "--out", type=pathlib.Path, help="also write the checks as JSON"
    )
    parser.add_argument(
        "--timeout", type=float, default=600, help="child process timeout (s)"
    )
    parser.add_argument(
        "--probe-placement", action="store_true", help=argparse.SUPPRESS
    )
    return parser.parse_args(argv)


def report(checks, out):
    for section in SECTIONS:
        rows = [c for c in checks if c.section == section]
        if not rows:
            continue
        print(f"\n{section}:")
        for c in rows:
            verdict = {True: "ok  ", False: "FAIL", None: "skip"}[c.passed]
            print(f"  {verdict} {c.name}: {c.detail}")
    failed = [c for c in checks if c.passed is False]
    skipped = sum(c.passed is None for c in checks)
    print(
        f"\n{len(checks) - len(failed) - skipped} of {len(checks)} checks passed, "
        f"{len(failed)} failed, {skipped} not checked."
    )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps([dataclasses.asdict(c) for c in checks], indent=1) + "\n"
        )
    return failed


def main(argv=None):
    args = parse_args(argv)
    split_cpu()
    if args.probe_placement:
        probe_placement(args.device, args.quick)
        return 0
    for option in ("device", "reference"):
        if full_name(getattr(args, option)) is None:
            no_gpu = not tf.config.list_physical_devices("GPU")
            if option == "device" and args.device.upper().startswith("GPU") and no_gpu:
                print(
                    f"No GPU: TensorFlow {tf.__version__} sees no GPU device on this "
                    "machine (built with CUDA: "
                    f"{tf.test.is_built_with_cuda()}). Nothing was checked. "
                    "`--device CPU:1` runs the same checks between two CPU devices."
                )
                return 0
            raise SystemExit(
                f"gpu_check.py: no device {getattr(args, option)!r} (--{option})."
            )
    sections = [
        s
        for s in SECTIONS
        if (args.only is None or s in args.only) and s not in args.skip
    ]
    tf.get_logger().setLevel("ERROR")
    print(
        f"Checking {full_name(args.device)} against {full_name(args.reference)}: "
        f"TF {tf.__version__}, keras_bn {keras_bn.__version__}"
        + (", QUICK" if args.quick else "")
        + (f", PERTURBED by {args.perturb}" if args.perturb else "")
    )
    started = time.perf_counter()
    checks = []
    if "placement" in sections:
        checks += check_placement(args.device, args.quick, args.timeout)
    modes = [
        m
        for m, s in (("eager", "numerics"), ("tf.function", "numerics"), ("xla", "xla"))
        if s in sections
    ]
    if modes:
        checks += check_numerics(
            args.device, args.reference, modes, args.quick, args.perturb
        )
    if "speed" in sections:
        checks += check_speed(args.device, args.quick)
    failed = report(checks, args.out)
    print(f"wall time {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
