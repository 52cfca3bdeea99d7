r"""Peak memory and step time of a language-model head with a large vocabulary.

The step: `N` tokens of `D` features `h`, an output projection `W` [D, V]
and `b` [V], int labels, and the loss reduced to a scalar, either the mean
over tokens or, with `--weighted`, `sum(w * loss) / N` for random
per-token weights `w`; then the gradients to `h`, `W` and `b`, all in one
`tf.function` (graph mode, as `fit` runs it). Three heads:

- `keras`: `h @ W + b`, then Keras's
  `SparseCategoricalCrossentropy(from_logits=True)` (with `sample_weight`);
  TensorFlow's autodiff for the backward pass.
- `keras_bn_dense`: the same logits, then `keras_bn.ops.
  sparse_softmax_cross_entropy` (hand-written backward pass, full logits).
- `fused`: `keras_bn.ops.linear_softmax_cross_entropy`, which never builds
  the logits (per-token loss, reduced outside the op).
- `fused_reduced`: the same op with `reduction="mean"` (and
  `sample_weight`), which forms the gradients in its forward pass.

Memory. Each configuration runs in its own process: it creates the inputs
(in TensorFlow), runs `gc` and `malloc_trim`, and measures one step. Where
TensorFlow's CPU allocator keeps statistics (oneDNN on, TensorFlow's default
on CPUs with AVX-512), `peak_above_inputs_bytes` is its peak during the step
minus the bytes in use before it: every tensor the step needed beyond its
inputs (the gradients it returns included). Elsewhere (oneDNN off) it is the
growth of the resident set: the high-water mark reset (`/proc/self/
clear_refs`) and read after the step (`VmHWM`), or where the reset is
refused `ru_maxrss` (a lower bound if the process peaked higher before).
The resident set undercounts: memory the process freed before the step
(making the inputs) but kept can serve the step without growing it, so at
131,072 classes the fast gradient read 741 MiB by `VmHWM` and 1,088 MiB by
the allocator. The JSON says which (`peak_method`). A configuration that
fails (out of memory, or over `--max-gib` by the dense logits' estimate) is
reported as not run.

Time. After that first step (tracing included, not timed), `--repeats`
more steps are timed one by one; the median is reported, with the
1-minute load average before and after. The machine is shared, so times
vary from run to run: the ratios of heads measured in one sweep are the
comparison. `--rounds R` runs the sweep R times, one after the other (so
that each round's heads see about the same load), and reports each head's
ratio to `keras_bn_dense` per round and the median over rounds
(`ratios_to_keras_bn_dense`).

Usage:

    python benchmarks/linear_cross_entropy.py --tokens 8192 --features 1024 \
        --vocab 8192 16384 32768 65536 131072 --repeats 3

writes `docs/benchmarks/linear-cross-entropy-<date>.json` and
`docs/linear_cross_entropy.png`. The step-time comparison of the fast path:

    python benchmarks/linear_cross_entropy.py --vocab 32768 --rounds 3 \
        --heads keras_bn_dense fused fused_reduced
"""

import argparse
import ctypes
import datetime
import gc
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

HEADS = ("keras", "keras_bn_dense", "fused", "fused_reduced")
ROOT = pathlib.Path(__file__).resolve().parent.parent


def _status_bytes(field):
    """A `VmRSS`/`VmHWM` line of /proc/self/status in bytes (None if absent)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak():
    """Resets the resident-set high-water mark (Linux); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass


def _step_function(head, weighted, chunk_size):
    import keras
    import tensorflow as tf

    import keras_bn

    keras_loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="sum"
    )

    def per_token_loss(labels, h, w, b, weights):
        if head == "fused_reduced":
            return keras_bn.ops.linear_softmax_cross_entropy(
                labels,
                h,
                w,
                b,
                chunk_size=chunk_size,
                sample_weight=weights if weighted else None,
                reduction="mean",
            )
        if head == "fused":
            return keras_bn.ops.linear_softmax_cross_entropy(
                labels, h, w, b, chunk_size=chunk_size
            )
        logits = tf.matmul(h, w) + b
        if head == "keras_bn_dense":
            return keras_bn.ops.sparse_softmax_cross_entropy(labels, logits)
        return None, logits

    @tf.function
    def step(labels, h, w, b, weights):
        with tf.GradientTape() as tape:
            tape.watch([h, w, b])
            count = tf.cast(tf.size(labels), h.dtype)
            result = per_token_loss(labels, h, w, b, weights)
            if head == "keras":
                loss = keras_loss(labels, result[1], sample_weight=weights) / count
            elif head == "fused_reduced":
                loss = result
            elif weighted:
                loss = tf.reduce_sum(result * weights) / count
            else:
                loss = tf.reduce_mean(result)
        return [loss] + tape.gradient(loss, [h, w, b])

    return step


def _allocator_bytes(tf, reset=False):
    """TensorFlow's CPU allocator: the bytes in use (after resetting the peak)
    or the peak; None where it keeps no statistics (oneDNN off)."""
    try:
        if reset:
            tf.config.experimental.reset_memory_stats("CPU:0")
        info = tf.config.experimental.get_memory_info("CPU:0")
    except (ValueError, tf.errors.OpError):
        return None
    return info["current"] if reset else info["peak"]


def worker(args):
    """One configuration in this process; prints one JSON line."""
    import tensorflow as tf

    n, d, v = args.tokens, args.features, args.vocab
    # Made by TensorFlow in place: no host copy raises the peak before the
    # baseline is read.
    h = tf.random.stateless_normal([n, d], seed=[0, 1])
    w = tf.random.stateless_normal([d, v], seed=[0, 2], stddev=d**-0.5)
    b = tf.zeros([v])
    labels = tf.random.stateless_uniform([n], [0, 3], maxval=v, dtype=tf.int32)
    weights = tf.random.stateless_uniform([n], seed=[0, 4])
    step = _step_function(args.head, args.weighted, args.chunk_size)
    load_before = os.getloadavg()[0]
    gc.collect()
    _malloc_trim()
    allocator = _allocator_bytes(tf, reset=True)
    if allocator is not None:
        method, baseline = "allocator", allocator
    else:
        # The high-water mark reset to the resident set now, where Linux
        # allows; else the peak so far (a lower bound if it peaked before).
        method = "VmHWM" if _reset_peak() and _status_bytes("VmHWM") else "ru_maxrss"
        baseline = _status_bytes("VmRSS") if method == "VmHWM" else _peak_rss_bytes()
    start = time.perf_counter()
    outputs = step(labels, h, w, b, weights)
    float(outputs[0])
    first = time.perf_counter() - start
    if method == "allocator":
        after = _allocator_bytes(tf)
    else:
        after = _status_bytes("VmHWM") if method == "VmHWM" else _peak_rss_bytes()
    peak = after - baseline
    del outputs
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        float(step(labels, h, w, b, weights)[0])
        times.append(time.perf_counter() - start)
    print(
        json.dumps(
            {
                "peak_above_inputs_bytes": peak,
                "peak_method": method,
                "first_step_seconds": first,
                "step_seconds": times,
                "median_step_seconds": statistics.median(times) if times else None,
                # The 1-minute load average of the shared machine around it.
                "load_average": [load_before, os.getloadavg()[0]],
                "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
            }
        )
    )


def _dense_logits_gib(tokens, vocab):
    return tokens * vocab * 4 / 2**30


def run_one(head, tokens, features, vocab, weighted, repeats, chunk_size):
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--head",
        head,
        "--tokens",
        str(tokens),
        "--features",
        str(features),
        "--vocab",
        str(vocab),
        "--repeats",
        str(repeats),
    ]
    if weighted:
        command.append("--weighted")
    if chunk_size:
        command += ["--chunk-size", str(chunk_size)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def sweep(args):
    results = []
    for round_index in range(args.rounds):
        results += _one_round(args, round_index)
    return results


def ratios(results, head, baseline="keras_bn_dense"):
    """Per (vocab, weighted): the median over rounds of `head`'s median step
    time over `baseline`'s in the same round, and the single ratios."""
    table = {}
    for r in results:
        if r["head"] != head or "error" in r:
            continue
        for b in results:
            if (
                b["head"] == baseline
                and "error" not in b
                and (b["vocab"], b["weighted"], b["round"])
                == (r["vocab"], r["weighted"], r["round"])
            ):
                ratio = r["median_step_seconds"] / b["median_step_seconds"]
                table.setdefault((r["vocab"], r["weighted"]), []).append(ratio)
    return {
        f"V={v} {'weighted' if w else 'mean'}": {
            "median": statistics.median(rs),
            "rounds": rs,
        }
        for (v, w), rs in table.items()
    }


def _one_round(args, round_index):
    results = []
    for vocab in args.vocab:
        for weighted in args.weightings:
            for head in args.heads:
                config = {
                    "head": head,
                    "tokens": args.tokens,
                    "features": args.features,
                    "vocab": vocab,
                    "weighted": weighted,
                    "round": round_index,
                }
                # The dense heads hold about three logits-sized tensors.
                if (
                    not head.startswith("fused")
                    and 3 * _dense_logits_gib(args.tokens, vocab) > args.max_gib
                ):
                    config["error"] = f"not run: estimated over {args.max_gib} GiB"
                else:
                    config.update(
                        run_one(
                            head,
                            args.tokens,
                            args.features,
                            vocab,
                            weighted,
                            args.repeats,
                            args.chunk_size,
                        )
                    )
                print(json.dumps(config), flush=True)
                results.append(config)
    return results


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for head, style in zip(HEADS, ("o-", "s--", "^-", "v-")):
        points = [
            (r["vocab"], r["peak_above_inputs_bytes"] / 2**30)
            for r in results
            if r["head"] == head and not r["weighted"] and "error" not in r
        ]
        if points:
            ax.plot(*zip(*points), style, label=head)
    kernel = [(r["vocab"], r["features"] * r["vocab"] * 4 / 2**30) for r in results]
    ax.plot(*zip(*sorted(set(kernel))), ":", color="gray", label="kernel gradient")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("vocabulary size V")
    ax.set_ylabel("peak memory above inputs (GiB)")
    first = results[0]
    ax.set_title(f"{first['tokens']} tokens x {first['features']} features, float32")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--head", choices=HEADS, default="fused")
    parser.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS))
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--vocab", type=int, nargs="+", default=[8192])
    parser.add_argument("--weighted", action="store_true")
    parser.add_argument(
        "--weightings", default="mean,weighted", help="mean, weighted or both"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="sweeps, one after the other (heads interleaved against load)",
    )
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--max-gib", type=float, default=18.0)
    parser.add_argument("--output", default=None)
    parser.add_argument("--figure", default=str(ROOT / "docs/linear_cross_entropy.png"))
    args = parser.parse_args()
    if args.worker:
        args.vocab = args.vocab[0]
        worker(args)
        return
    args.weightings = [w == "weighted" for w in args.weightings.split(",")]
    results = sweep(args)
    date = datetime.date.today().isoformat()
    output = args.output or ROOT / f"docs/benchmarks/linear-cross-entropy-{date}.json"
    meta = {"date": date, "cpus": os.cpu_count(), "argv": sys.argv[1:]}
    summary = {
        head: ratios(results, head) for head in args.heads if head != "keras_bn_dense"
    }
    print(json.dumps({"ratios_to_keras_bn_dense": summary}, indent=1))
    pathlib.Path(output).write_text(
        json.dumps(
            {"meta": meta, "ratios_to_keras_bn_dense": summary, "results": results},
            indent=1,
        )
        + "\n"
    )
    plot(results, args.figure)


if __name__ == "__main__":
    main()
