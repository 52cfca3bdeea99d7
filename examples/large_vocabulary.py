"""A word-level language model whose output layer never holds its logits.

A language model ends in a projection to its vocabulary: with `N` tokens
per batch and `V` words, the logits are `N x V` numbers, and Keras's
`Dense` + `SparseCategoricalCrossentropy` keeps them (and works on
tensors of that size) for every training step. `keras_bn.
LinearCrossEntropyHead` computes the same loss and gradients a chunk of
the vocabulary at a time, so the step needs the kernel's gradient and one
chunk, whatever `V` is.

The text: the docstrings of Python's standard library (its modules,
classes and functions), which ship with every Python; nothing is
downloaded. Words are lower-cased; the vocabulary is the most frequent
words, the rest map to one "unknown" id; id 0 is padding.

1. Training. A small model (embedding, one LSTM layer, the fused head tied
   to the embedding) learns to predict the next word with plain `fit`:
   the model takes the targets as an input and returns the per-word loss,
   which the pass-through loss `keras_bn.layers.per_token_loss` averages
   (padding masked out). Printed: the loss per epoch, the perplexity on
   held-out text, and the words the model continues a prompt with (the
   same head, called without targets, gives logits).
2. Memory. One training step of the head alone (batch of `--tokens`
   words, `--features` features) at growing vocabulary sizes, each in its
   own process: the peak resident memory above the inputs (from
   `resource.getrusage`) for the dense head and the fused head.

Verdict rule: the fused head's memory claim holds if, at the largest
vocabulary, its peak is below half the dense head's. The figure (a PNG)
and a CSV go to --out.
"""

import argparse
import json
import os
import resource
import subprocess
import sys

import _common


def parse_args(argv=None):
    parser = _common.ExampleParser("large_vocabulary", __doc__, data=False)
    parser.add_size("--epochs", "training epochs", full=8, quick=1)
    parser.add_size("--vocabulary", "words in the trained model", full=4000, quick=500)
    parser.add_size(
        "--tokens", "tokens per step in the memory part", full=4096, quick=256
    )
    parser.add_size("--features", "features in the memory part", full=512, quick=128)
    # Internal: one memory measurement, in a fresh process.
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# Parse before importing TensorFlow: --help and bad arguments answer at once.
ARGS = parse_args() if __name__ == "__main__" else None

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_bn  # noqa: E402

SEQUENCE = 32
MEMORY_VOCABULARIES = (2048, 8192, 32768, 131072)
QUICK_VOCABULARIES = (1024, 65536)


def stdlib_text():
    """Every docstring of a set of standard-library modules, as one string."""
    import importlib
    import inspect

    names = (
        "argparse collections configparser csv datetime decimal email.message "
        "fractions functools http.client inspect itertools json logging "
        "pathlib pickle random re shutil socket statistics string subprocess "
        "tarfile textwrap threading typing unittest urllib.parse zipfile"
    ).split()
    docs = []
    for name in names:
        module = importlib.import_module(name)
        docs.append(inspect.getdoc(module) or "")
        for _, member in inspect.getmembers(module):
            if getattr(member, "__module__", None) == module.__name__:
                docs.append(inspect.getdoc(member) or "")
    return "\n".join(docs)


def tokenize(text, vocabulary):
    """Word ids: 0 padding, 1 unknown, then the most frequent words."""
    import collections
    import re

    words = re.findall(r"[a-z]+|[.,:()]", text.lower())
    common = collections.Counter(words).most_common(vocabulary - 2)
    index = {w: i + 2 for i, (w, _) in enumerate(common)}
    ids = np.array([index.get(w, 1) for w in words], dtype="int32")
    return ids, ["<pad>", "<unk>"] + [w for w, _ in common]


def windows(ids):
    """Inputs and next-word targets, `SEQUENCE` words each."""
    n = (len(ids) - 1) // SEQUENCE
    x = ids[: n * SEQUENCE].reshape(n, SEQUENCE)
    y = ids[1 : n * SEQUENCE + 1].reshape(n, SEQUENCE)
    return x, y


@keras.saving.register_keras_serializable(package="examples")
class WordModel(keras.Model):
    """Embedding, LSTM, and the fused head tied to the embedding."""

    def __init__(self, vocabulary, features=128, **kwargs):
        super().__init__(**kwargs)
        self.vocabulary, self.features = vocabulary, features
        self.embed = keras.layers.Embedding(vocabulary, features)
        self.lstm = keras.layers.LSTM(features, return_sequences=True)
        self.head = keras_bn.LinearCrossEntropyHead(
            vocabulary, tied_embedding=self.embed, ignore_class=0
        )

    def call(self, inputs):
        if isinstance(inputs, (list, tuple)):  # training: [words, targets]
            words, targets = inputs
            return self.head([self.lstm(self.embed(words)), targets])
        return self.head(self.lstm(self.embed(inputs)))  # logits

    def get_config(self):
        return {
            **super().get_config(),
            "vocabulary": self.vocabulary,
            "features": self.features,
        }


def train(args):
    ids, words = tokenize(stdlib_text(), args.vocabulary)
    x, y = windows(ids)
    if args.quick:
        x, y = x[:256], y[:256]
    split = int(0.9 * len(x))
    print(f"text: {len(ids)} words of standard-library docstrings; {len(x)} windows")
    model = WordModel(len(words))  # the text may hold fewer distinct words
    model.compile(keras.optimizers.Adam(3e-3), keras_bn.layers.per_token_loss)
    history = model.fit(
        [x[:split], y[:split]],
        y[:split],
        validation_data=([x[split:], y[split:]], y[split:]),
        epochs=args.epochs,
        batch_size=64,
        verbose=2,
    )
    held_out = history.history["val_loss"][-1]
    print(f"held-out perplexity: {np.exp(held_out):.1f} (vocabulary {len(words)})")
    prompt = x[split][:8]
    logits = model(prompt[None])  # no targets: the head returns logits
    guess = np.argmax(logits[0, -1])
    print("prompt:", " ".join(words[i] for i in prompt), "->", words[guess])
    return history.history


def measure(head, vocabulary, tokens, features):
    """Peak memory of one head training step above its inputs, in bytes:
    the resident set's high-water mark (reset first, Linux) minus the
    resident set before the step; the peak so far where the reset is
    refused."""
    h = tf.random.stateless_normal([tokens, features], seed=[0, 1])
    w = tf.random.stateless_normal([features, vocabulary], [0, 2], features**-0.5)
    labels = tf.random.stateless_uniform(
        [tokens], [0, 3], maxval=vocabulary, dtype=tf.int32
    )
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(h, w):
        with tf.GradientTape() as tape:
            tape.watch([h, w])
            if head == "dense":
                loss = loss_fn(labels, tf.matmul(h, w))
            else:
                per_token = keras_bn.ops.linear_softmax_cross_entropy(labels, h, w)
                loss = tf.reduce_mean(per_token)
        return tape.gradient(loss, [h, w])

    step.get_concrete_function(h, w)  # trace first: only the step is measured
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        before, field = status_bytes("VmRSS"), "VmHWM"
    except OSError:
        before, field = peak_so_far(), None
    [g.numpy() for g in step(h, w)]
    return (status_bytes(field) if field else peak_so_far()) - before


def status_bytes(field):
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def peak_so_far():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_sweep(args):
    rows = []
    vocabularies = QUICK_VOCABULARIES if args.quick else MEMORY_VOCABULARIES
    # The child imports the keras_bn this process uses, installed or not.
    package_root = os.path.dirname(os.path.dirname(keras_bn.__file__))
    path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=path)
    for vocabulary in vocabularies:
        for head in ("dense", "fused"):
            command = [sys.executable, __file__, "--tokens", str(args.tokens)]
            command += ["--features", str(args.features)]
            command += ["--measure", head, str(vocabulary)]
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise SystemExit(f"memory measurement failed: {done.stderr[-2000:]}")
            peak = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(
                {
                    "head": head,
                    "vocabulary": vocabulary,
                    "peak_mib": peak / 2**20,
                    "kernel_gradient_mib": vocabulary * args.features * 4 / 2**20,
                }
            )
            print(f"{head:5s} head, V={vocabulary:6d}: {peak / 2**20:8.0f} MiB")
    return rows


def plot(rows, path):
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(6, 4))
    for head, color in zip(("dense", "fused"), _common.COLORS):
        points = [(r["vocabulary"], r["peak_mib"]) for r in rows if r["head"] == head]
        ax.plot(*zip(*points), "o-", color=color, label=f"{head} head")
    kernel = sorted({(r["vocabulary"], r["kernel_gradient_mib"]) for r in rows})
    ax.plot(*zip(*kernel), ":", color="gray", label="kernel gradient")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("vocabulary size")
    ax.set_ylabel("peak memory of a step above inputs (MiB)")
    ax.legend()
    _common.save_figure(figure, path)


def main(args):
    if args.measure:
        head, vocabulary = args.measure
        print(json.dumps(measure(head, int(vocabulary), args.tokens, args.features)))
        return
    _common.start_run(args)
    train(args)
    rows = memory_sweep(args)
    _common.write_csv(args.out / "large_vocabulary.csv", rows)
    plot(rows, args.out / "large_vocabulary.png")
    largest = max(r["vocabulary"] for r in rows)
    dense, fused = (
        next(r for r in rows if r["head"] == h and r["vocabulary"] == largest)
        for h in ("dense", "fused")
    )
    held = fused["peak_mib"] < dense["peak_mib"] / 2
    with _common.verdicts(args):
        print(
            f"verdict: at V={largest} the fused head peaks at "
            f"{fused['peak_mib']:.0f} MiB, the dense head at "
            f"{dense['peak_mib']:.0f} MiB: the claim "
            f"{'holds' if held else 'does not hold'}"
        )
    _common.print_wall_time(args)


if __name__ == "__main__":
    main(ARGS)
