r"""Peak memory of a batch-norm training step: keras_bn, Keras, the fused op.

The step. A stack of `L` batch-norm layers of one implementation (L = 1, 4
and 16 by default) runs one training step on an input `x` of shape
[32, 56, 56, 128]: the forward pass through the stack under
`tf.GradientTape`, the moving-average updates, and the backward pass to `x`
and to every gamma and beta from an upstream gradient `dy`
(`tape.gradient(y, ..., output_gradients=dy)`). Eager mode runs it on the
tape without `tf.function`; graph mode runs the same step in `tf.function`.
The implementations are those of the timing section (`_implementations.py`):
keras_bn's layer (default `fused=None`, and `fused=False`, the closed form),
Keras's layer, and `tf.compat.v1.nn.fused_batch_norm` on variables, the
reference. float16 runs the layers under the `mixed_float16` policy.

Each case runs in a fresh process (`--quick`: all cases in one, whose peaks
have differed between the oneDNN settings by whole input-sized tensors where
fresh processes agree: a check of the machinery, not a measurement). The
process reserves a large allocator pool (`grow_allocator_pool`), builds the stack,
then runs two steps, each after `gc.collect()`:

- the second step gives the metric, `allocator_peak_bytes`: the most bytes
  TensorFlow's CPU allocator had handed out to tensors at once during the
  step (`tf.config.experimental.get_memory_info("CPU:0")["peak"]` after
  `reset_memory_stats`), minus the bytes in use just before it (x, dy, the
  variables). It counts the tensor buffers of the step, eager or graph,
  exactly and repeatably (the same bytes on every run, whatever the
  machine's load), and nothing else. Each buffer counts its size rounded up
  to 256 bytes (the per-channel statistics too, a few hundred bytes each).
  The worker processes run TensorFlow's best-fit (BFC) CPU allocator
  (`ALLOCATOR_ENV`), the one that keeps these statistics, whatever the
  oneDNN setting: TensorFlow's default CPU allocator keeps none with
  oneDNN off (`TF_ENABLE_ONEDNN_OPTS=0`, the default on CPUs without
  AVX-512), and with it on is oneDNN's, which leaves buffers under 256 KiB
  to malloc, uncounted. One allocator for both settings: the same bytes.
- the first step gives a process-level cross-check, `first_step_rss_peak_bytes`:
  the resident-set high-water mark (`VmHWM` in /proc/self/status, reset by
  writing 5 to /proc/self/clear_refs) minus the resident set before the step,
  after `malloc_trim(0)`. It also sees memory outside the allocator. Only the
  first step touches new pages: the allocator keeps its pages afterwards, so
  later steps leave the resident set flat. Pages the building touched serve
  part of the step, so it reads lower than the allocator's peak by about
  that much; its slope over `L` (`rss_kept_per_layer`) is the comparison.
  None with one process for all cases, or where /proc refuses.

The unit is one input-sized tensor, `prod(shape) * itemsize` bytes with the
itemsize of the input's dtype (4 for float32, 2 for float16). keras_bn and
Keras compute float16 inputs in float32, so a float32 tensor kept for a
float16 input counts 2.

Per layer. Each layer holds tensors from its forward pass until the backward
pass reaches it. `kept_per_layer` is the slope of the peak between the two
deepest stacks (4 and 16 layers), in input-sized tensors; at 1 layer the
peak can fall in the backward pass, among its temporaries, rather than at
the end of the forward pass, so the shallow end is left out (the
least-squares slope over all depths is in the JSON too). One input-sized
tensor per layer is the floor: a layer's backward pass needs its input or
something as large (the centred input, say), and the fused op keeps exactly
that, its input (the previous layer's output), beside per-channel
statistics; it is the reference. `kept_for_backward = kept_per_layer - 1` is
what an implementation keeps beyond that one tensor per layer; keras_bn's
design target is at most 1 in both modes. (The stack's last output, and the
gradient to `x`, are part of the intercept, not the slope.)

Run by `run.py` (section `memory`); `python benchmarks/memory.py --worker ...`
is the per-process entry point it starts.
"""

import argparse
import ctypes
import gc
import json
import os
import pathlib
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf
from _implementations import BN_IMPLS
from _implementations import BN_NAMES
from _implementations import bn_layer
from _implementations import random_normal

MODES = ("eager", "tf.function")
DTYPES = ("float32", "float16")
ITEMSIZE = {"float32": 4, "float16": 2}
TITLE = (
    "Memory: peak of one BN training step (forward, backward to x, gamma, beta, "
    "moving averages) of a stack of L layers on {shape}, above what was in use "
    "before it (TensorFlow's BFC allocator), in input-sized tensors ({units})\n"
    "per layer = slope of the peak between the two deepest stacks; beyond 1 = "
    "per layer - 1, beyond the one tensor per layer the fused op keeps (its "
    "input); rss/layer = per layer from the resident set of the first step"
)
METRIC = (
    "allocator_peak_bytes: peak of tf.config.experimental.get_memory_info('CPU:0') "
    "(TensorFlow's BFC CPU allocator, TF_CPU_ALLOCATOR_USE_BFC=true) during the "
    "second step, minus its value before; kept_per_layer: its slope "
    "between the two deepest stacks, in input-sized tensors"
)
SCRIPT = pathlib.Path(__file__).resolve()
# Read once, when TensorFlow makes its CPU allocator: set in the environment a
# worker process starts with (see the module docstring).
ALLOCATOR_ENV = {"TF_CPU_ALLOCATOR_USE_BFC": "true"}


def _env_text():
    return " ".join(f"{k}={v}" for k, v in ALLOCATOR_ENV.items())


def worker_environment():
    """The environment of a worker process: this one's, with `ALLOCATOR_ENV`."""
    return {**os.environ, **ALLOCATOR_ENV}


# --- Worker: one process, one or more cases -----------------------------------


def _proc_status(field):
    """A `kB` field of /proc/self/status in bytes, or None."""
    return _kb_field("/proc/self/status", field)


def _kb_field(path, field):
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_rss_high_water_mark():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def grow_allocator_pool(nbytes):
    """Makes TensorFlow's CPU allocator reserve `nbytes` in one region.

    TensorFlow's best-fit (BFC) CPU allocator, which the workers run, grows
    by regions and hands a free chunk of up to
    twice the request to one tensor whole, counted whole in its statistics
    (a 49 MiB tensor in a fresh 64 MiB region counts 64 MiB). One large buffer
    allocated first and freed leaves a single free region that later tensors
    are split from at their own size (rounded up to 256 bytes), so the
    statistics count tensor bytes. Its pages are never touched, so the
    resident set does not grow.
    """
    mebibytes = max(1, nbytes // 2**20)  # Empty takes an int32 shape
    pool = tf.raw_ops.Empty(shape=[mebibytes, 2**18], dtype=tf.float32, init=False)
    del pool
    return mebibytes * 2**20


def pool_bytes(cases):
    """A pool well above what any of `cases` needs, within available memory."""
    need = max(_elements(c["shape"]) * 4 * (8 * c["depth"] + 16) for c in cases)
    available = _kb_field("/proc/meminfo", "MemAvailable")
    if available is not None:
        need = min(need, int(0.6 * available))
    return max(need, 2**28)


def _elements(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def measure_peak(fn, pool, rss):
    """Runs `fn()` once; returns its peak memory above what was in use before.

    Returns a dict: `allocator_peak_bytes` (TensorFlow's CPU allocator),
    `rss_peak_bytes` (resident set; None if `rss` is False or /proc refuses)
    and `allocator_retained_bytes` (still allocated once `fn`'s result is
    dropped: 0 unless the step leaks).

    Raises:
        RuntimeError: if the allocator keeps no statistics (a process started
            without `ALLOCATOR_ENV`), or its use went past the `pool` bytes
            reserved by `grow_allocator_pool`, where its statistics stop
            counting tensor bytes.
    """
    gc.collect()
    _malloc_trim()
    reset_allocator_stats()
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    rss_before = _proc_status("VmRSS") if rss else None
    rss = rss_before is not None and _reset_rss_high_water_mark()
    result = fn()
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    rss_peak = _proc_status("VmHWM") if rss else None
    del result
    gc.collect()
    if peak > pool:
        raise RuntimeError(
            f"The step used {peak} bytes, more than the {pool} bytes reserved "
            "for it: raise the estimate in memory.pool_bytes."
        )
    current = tf.config.experimental.get_memory_info("CPU:0")["current"]
    return {
        "allocator_peak_bytes": peak - before,
        "rss_peak_bytes": None if rss_peak is None else rss_peak - rss_before,
        "allocator_retained_bytes": current - before,
    }


def reset_allocator_stats():
    """Resets the CPU allocator's peak; RuntimeError if it keeps no statistics."""
    try:
        tf.config.experimental.reset_memory_stats("CPU:0")
    except ValueError as error:
        raise RuntimeError(
            "TensorFlow's CPU allocator keeps no statistics in this process "
            f"({error}). Start it with {_env_text()} in its environment "
            "(memory.worker_environment()): TensorFlow reads it once, when it "
            "makes the allocator."
        ) from error


def stack_step(impl, depth, shape, dtype, mode):
    """One training step of `depth` stacked layers of `impl`, ready to call."""

    x = random_normal(shape, 1, dtype)
    dy = random_normal(shape, 2, dtype)
    layers = [bn_layer(impl, dtype, shape[-1]) for _ in range(depth)]
    for layer in layers:
        layer(x, training=False)  # builds the weights outside any tf.function
    weights = [w for layer in layers for w in layer.trainable_weights]

    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = x
            for layer in layers:
                y = layer(y, training=True)
        return tape.gradient(y, [x, *weights], output_gradients=dy)

    return step if mode == "eager" else tf.function(step)


def run_case(case, pool, rss):
    """Measures the first step and a second one of `case`.

    The first step traces, builds and touches the allocator's pages: the only
    one in which the resident set grows, so the resident-set peak is read
    there. The second is what every later step costs: the allocator's peak is
    read there.
    """
    step = stack_step(
        case["impl"], case["depth"], case["shape"], case["dtype"], case["mode"]
    )
    # Later collections skip what exists now: a full one takes a quarter second
    # in a process with TensorFlow loaded.
    gc.collect()
    gc.freeze()
    first = measure_peak(step, pool, rss)
    second = measure_peak(step, pool, rss=False)
    return dict(
        case,
        allocator_peak_bytes=second["allocator_peak_bytes"],
        allocator_retained_bytes=second["allocator_retained_bytes"],
        first_step_allocator_peak_bytes=first["allocator_peak_bytes"],
        first_step_rss_peak_bytes=first["rss_peak_bytes"],
    )


def worker_main(argv):
    parser = argparse.ArgumentParser(description="Measures memory cases.")
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--cases", required=True, help="JSON list of cases")
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)
    tf.get_logger().setLevel("ERROR")
    cases = json.loads(args.cases)
    pool = grow_allocator_pool(pool_bytes(cases))
    # A resident-set peak means something for the first case of a process only.
    rss = len(cases) == 1
    results = [dict(run_case(c, pool, rss), pool_bytes=pool) for c in cases]
    args.out.write_text(json.dumps(results))


# --- Runner: cases, processes, analysis ---------------------------------------


def memory_cases(shape, depths):
    return [
        {"impl": impl, "mode": mode, "dtype": dtype, "depth": depth, "shape": shape}
        for dtype in DTYPES
        for mode in MODES
        for impl in BN_IMPLS
        for depth in depths
    ]


def run_in_process(cases, timeout):
    """Runs `cases` in one fresh worker process: (results, None) or (None, error)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "memory.json"
        command = [sys.executable, str(SCRIPT), "--worker"]
        command += ["--cases", json.dumps(cases), "--out", str(out)]
        try:
            completed = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=worker_environment(),
            )
        except subprocess.TimeoutExpired:
            return None, f"timed out after {timeout} s"
        if completed.returncode != 0 or not out.exists():
            tail = completed.stderr.strip().splitlines()[-3:]
            return None, f"exit status {completed.returncode}: " + " | ".join(tail)
        return json.loads(out.read_text()), None


def fit_line(xs, ys):
    """Least-squares intercept and slope of `ys` over `xs`."""
    n = len(xs)
    if len(set(xs)) < 2:
        raise ValueError(f"A slope needs two or more distinct depths. Got: {xs}")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - slope * mx, slope


def deepest_slope(depths, values):
    """Slope of `values` between the two largest of the (sorted) `depths`."""
    if len(depths) < 2:
        raise ValueError(f"A slope needs two or more depths. Got: {depths}")
    return (values[-1] - values[-2]) / (depths[-1] - depths[-2])


def summary_row(cases, unit):
    """Peaks by depth and the per-layer slopes, for one impl, mode and dtype."""
    first = cases[0]
    row = {k: first[k] for k in ("impl", "mode", "dtype")}
    row["input_bytes"] = unit
    failed = [c for c in cases if c.get("error")]
    if failed:
        row["error"] = failed[0]["error"]
        return row
    cases = sorted(cases, key=lambda c: c["depth"])
    depths = [c["depth"] for c in cases]
    peaks = [c["allocator_peak_bytes"] for c in cases]
    row["depths"] = depths
    row["allocator_peak_bytes"] = peaks
    row["allocator_peak_inputs"] = [b / unit for b in peaks]
    row["allocator_retained_bytes"] = [c["allocator_retained_bytes"] for c in cases]
    row["bytes_per_layer"] = deepest_slope(depths, peaks)
    row["kept_per_layer"] = row["bytes_per_layer"] / unit
    row["kept_for_backward"] = row["kept_per_layer"] - 1.0
    intercept, slope = fit_line(depths, peaks)
    row["least_squares_kept_per_layer"] = slope / unit
    row["least_squares_intercept_inputs"] = intercept / unit
    rss = [c["first_step_rss_peak_bytes"] for c in cases]
    row["first_step_rss_peak_bytes"] = rss
    row["rss_kept_per_layer"] = (
        None if None in rss else deepest_slope(depths, rss) / unit
    )
    return row


def summarize(results, input_bytes):
    rows = []
    for dtype in DTYPES:
        for mode in MODES:
            for impl in BN_IMPLS:
                key = (dtype, mode, impl)
                cases = [
                    r for r in results if (r["dtype"], r["mode"], r["impl"]) == key
                ]
                if cases:
                    rows.append(summary_row(cases, input_bytes[dtype]))
    return rows


def run_memory_section(shape, depths, process_per_case, timeout, log=None):
    """Measures every case; returns the section's JSON-ready dict.

    Args:
        shape: Input shape, channels last.
        depths: Stack depths, two or more distinct.
        process_per_case: One fresh process per case (True), or one process
            for all cases (False: faster, no resident-set peaks).
        timeout: Seconds a worker process may take.
        log: Callable taking a progress line, or None.
    """
    shape = [int(d) for d in shape]
    depths = sorted({int(d) for d in depths})
    if len(depths) < 2 or depths[0] < 1:
        raise ValueError(f"Memory depths must be two or more values >= 1: {depths}")
    cases = memory_cases(shape, depths)
    batches = [[c] for c in cases] if process_per_case else [cases]
    results = []
    for batch in batches:
        measured, error = run_in_process(batch, timeout)
        if error is not None:
            measured = [dict(c, error=error) for c in batch]
        results.extend(measured)
        if log is not None:
            for c in measured:
                status = "FAILED: " + c["error"] if c.get("error") else "done"
                name = f"{c['impl']} {c['mode']} {c['dtype']} L={c['depth']}"
                log(f"  memory {name}: {status}")
    input_bytes = {dtype: _elements(shape) * ITEMSIZE[dtype] for dtype in DTYPES}
    return {
        "shape": shape,
        "depths": depths,
        "process_per_case": process_per_case,
        "input_bytes": input_bytes,
        "metric": METRIC,
        "cases": results,
        "rows": summarize(results, input_bytes),
    }


def failed_rows(section):
    return [r for r in section["rows"] if r.get("error")]


def format_memory_table(section):
    depths = section["depths"]
    units = ", ".join(
        f"{dtype}: {n / 2**20:.1f} MiB" for dtype, n in section["input_bytes"].items()
    )
    shape = "x".join(str(d) for d in section["shape"])
    columns = [f"L={d}" for d in depths] + ["per layer", "beyond 1", "rss/layer"]
    widths = [max(7, len(c)) for c in columns]
    head = f"{'impl':<15}  {'mode':<11}  {'dtype':<7}  "
    header = head + "  ".join(f"{c:>{w}}" for c, w in zip(columns, widths))
    lines = [TITLE.format(shape=shape, units=units), header, "-" * len(header)]
    for row in section["rows"]:
        start = f"{BN_NAMES[row['impl']]:<15}  {row['mode']:<11}  {row['dtype']:<7}  "
        if row.get("error"):
            lines.append(start + "FAILED: " + row["error"])
            continue
        rss = row["rss_kept_per_layer"]
        values = [f"{v:.2f}" for v in row["allocator_peak_inputs"]]
        values += [f"{row['kept_per_layer']:.2f}", f"{row['kept_for_backward']:.2f}"]
        values.append("n/a" if rss is None else f"{rss:.2f}")
        lines.append(start + "  ".join(f"{v:>{w}}" for v, w in zip(values, widths)))
    return "\n".join(lines)


if __name__ == "__main__":
    worker_main(sys.argv[1:])
