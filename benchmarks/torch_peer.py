"""PyTorch peer rows: what the same training steps cost in the other framework.

Optional, and never a dependency: `run.py` (section `torch`) starts this
script in a process of its own after the TensorFlow sections, so PyTorch's
OpenMP threads never compete with TensorFlow's inside a timed loop, and the
TensorFlow process never imports torch. Without an importable torch the
script writes the reason, and the section is reported as skipped.

Cases, float32, on the shapes of the TensorFlow rows:

- `train NxHxWxC`: `torch.nn.BatchNorm2d` in training mode on an NCHW tensor
  in `torch.channels_last` memory format (NHWC in memory, as TensorFlow's),
  the module converted to channels-last too: forward, running-statistics
  update, and `torch.autograd.grad` to the input, weight and bias from an
  upstream gradient. `train NxC` uses `torch.nn.BatchNorm1d`. `momentum` and
  `eps` match the TensorFlow rows (PyTorch's momentum is the weight of the
  new batch: 1 - 0.99).
- `sparse NxK` / `dense NxK`: `torch.nn.functional.cross_entropy` (mean over
  the batch) on class indices / one-hot class probabilities, and its
  gradient to the logits.

Timed like the TensorFlow rows (`_timing.py`: warm-up, loops of about
`target_seconds`, median per call), with `torch.set_num_threads(threads)`.

Usage (normally through run.py):
    python benchmarks/torch_peer.py --cases '<json list>' --threads 2 \
        --repetitions 7 --target-seconds 0.1 --out /tmp/torch.json
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

from _timing import time_interleaved

# As in _implementations.py, which this process does not import (TensorFlow).
MOMENTUM = 0.99
EPSILON = 1e-3
SCRIPT = pathlib.Path(__file__).resolve()


def bn_step(torch, shape):
    """A BatchNorm training step on an NHWC (channels-last) or [N, C] input."""
    channels = shape[-1]
    if len(shape) == 4:
        n, h, w, c = shape
        bn = torch.nn.BatchNorm2d(c, eps=EPSILON, momentum=1.0 - MOMENTUM)
        bn = bn.to(memory_format=torch.channels_last)

        def tensor():
            nchw = torch.randn(n, c, h, w)
            return nchw.contiguous(memory_format=torch.channels_last)

    elif len(shape) == 2:
        bn = torch.nn.BatchNorm1d(channels, eps=EPSILON, momentum=1.0 - MOMENTUM)

        def tensor():
            return torch.randn(*shape)

    else:
        raise ValueError(f"BatchNorm peer takes 2-D or 4-D shapes. Got: {shape}")
    bn.train()
    x = tensor().requires_grad_()
    dy = tensor()
    params = [x, bn.weight, bn.bias]

    def step():
        return torch.autograd.grad(bn(x), params, grad_outputs=dy)

    return step


def cross_entropy_step(torch, shape, sparse):
    """Mean cross-entropy and its gradient to the logits."""
    batch, classes = shape
    logits = torch.randn(batch, classes, requires_grad=True)
    labels = torch.randint(0, classes, (batch,))
    if not sparse:
        labels = torch.nn.functional.one_hot(labels, classes).float()

    def step():
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return loss, torch.autograd.grad(loss, [logits])

    return step


def make_step(torch, case):
    if case["kind"] == "train":
        return bn_step(torch, case["shape"])
    if case["kind"] in ("sparse", "dense"):
        return cross_entropy_step(torch, case["shape"], case["kind"] == "sparse")
    raise ValueError(f"Unknown peer case kind: {case['kind']!r}")


def import_torch():
    """torch, or the reason it cannot be imported."""
    try:
        import torch
    except (ImportError, OSError) as error:  # OSError: a broken native library
        return None, f"torch is not importable ({type(error).__name__}: {error})"
    return torch, None


def main(argv=None):
    parser = argparse.ArgumentParser(description="PyTorch peer rows.")
    parser.add_argument("--cases", required=True, help="JSON list of cases")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--repetitions", type=int, required=True)
    parser.add_argument("--target-seconds", type=float, required=True)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)
    torch, reason = import_torch()
    if torch is None:
        args.out.write_text(json.dumps({"skipped": reason}))
        return
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    entries = []
    for case in json.loads(args.cases):
        timing = time_interleaved(
            {"torch": make_step(torch, case)}, args.repetitions, args.target_seconds
        )["torch"]
        entries.append(dict(case, **timing.as_dict()))
        print(f"  torch {case['label']} done", file=sys.stderr, flush=True)
    args.out.write_text(
        json.dumps(
            {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "entries": entries,
            }
        )
    )


# --- Runner, in run.py's process -------------------------------------------------


def run_torch_section(cases, threads, repetitions, target_seconds, timeout):
    """Times `cases` in a fresh process; returns the section's JSON-ready dict.

    The dict has `skipped` (the reason) when torch is not importable, `error`
    when the process failed, else `torch` (its version), `threads` and
    `entries`, one per case with its timing (`median_ms`, ...).
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "torch.json"
        command = [sys.executable, str(SCRIPT), "--cases", json.dumps(cases)]
        command += ["--threads", str(threads), "--repetitions", str(repetitions)]
        command += ["--target-seconds", str(target_seconds), "--out", str(out)]
        try:
            completed = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout} s"}
        sys.stderr.write(completed.stderr)
        if completed.returncode != 0 or not out.exists():
            tail = " | ".join(completed.stderr.strip().splitlines()[-3:])
            return {"error": f"exit status {completed.returncode}: {tail}"}
        return json.loads(out.read_text())


def _tensorflow_median(tf_sections, label, mode, impl):
    section = "bn" if label.startswith("train") else "ce"
    for entry in tf_sections.get(section, []):
        if entry["label"] == label and entry["mode"] == mode:
            return entry["medians_ms"].get(impl)
    return None


def format_torch_table(section, tf_sections):
    """The peer rows beside keras_bn's eager and tf.function medians."""
    if "skipped" in section:
        return f"PyTorch peer: skipped, {section['skipped']}"
    if "error" in section:
        return f"PyTorch peer: FAILED, {section['error']}"
    title = (
        f"PyTorch {section['torch']} peer, median ms per call ({section['threads']} "
        "threads, own process after the TensorFlow sections, so not interleaved "
        "with them)\ntrain: BatchNorm2d channels-last (BatchNorm1d for 2-D) "
        "forward and backward to x, weight, bias; sparse/dense: "
        "F.cross_entropy and its gradient; kbn = keras_bn in this run"
    )
    columns = ["torch", "kbn eager", "kbn tf.function"]
    columns += ["kbn eager/torch", "kbn tf.function/torch"]
    widths = [max(9, len(c)) for c in columns]
    entries = section["entries"]
    width = max(len("case"), *(len(e["label"]) for e in entries))
    header = f"{'case':<{width}}  " + "  ".join(
        f"{c:>{w}}" for c, w in zip(columns, widths)
    )
    lines = [title, header, "-" * len(header)]
    for e in entries:
        torch_ms = e["median_ms"]
        eager = _tensorflow_median(tf_sections, e["label"], "eager", "keras_bn")
        graph = _tensorflow_median(tf_sections, e["label"], "tf.function", "keras_bn")
        cells = [f"{torch_ms:.3f}"]
        cells += ["-" if v is None else f"{v:.3f}" for v in (eager, graph)]
        cells += ["-" if v is None else f"{v / torch_ms:.2f}" for v in (eager, graph)]
        lines.append(
            f"{e['label']:<{width}}  "
            + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths))
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
