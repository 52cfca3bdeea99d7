"""Plumbing shared by the examples: command line, data, output files.

A script imports this module first, parses its command line, then imports
TensorFlow: `--help` and a bad argument answer at once."""

import argparse
import collections
import contextlib
import csv
import io
import os
import pathlib
import time
import zipfile

STARTED = time.perf_counter()  # the wall time counts from here, imports included

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # hide TensorFlow's INFO lines

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import numpy as np  # noqa: E402

MNIST_KEYS = ("x_train", "y_train", "x_test", "y_test")
EXPECTED_NPZ = "an .npz with x_train, x_test (n, height, width), y_train, y_test (n,)"
QUICK_NOT_A_RESULT = "its numbers and verdicts are not results"
QUICK_LABEL = "quick run, not a result: "  # starts each line of its verdicts
# Okabe & Ito's colour-blind-safe set without green and vermilion ("good", "bad").
COLORS = ("#0072B2", "#E69F00", "#CC79A7", "#56B4E9", "#000000")
THRESHOLD_STYLE = dict(color="gray", linestyle=":", linewidth=1)


def _number_type(convert, rule, holds):
    """An argparse type: a finite number `rule`, for which `holds(value)`."""

    def parse(text):
        error = argparse.ArgumentTypeError
        noun = rule if convert is int else "a number"
        try:
            value = convert(text)
        except ValueError:
            raise error(f"expected {noun}, got {text!r}") from None
        if not np.isfinite(value):
            raise error(f"expected a finite number, got {text!r}")
        if not holds(value):
            raise error(f"expected {rule}, got {value:g}")
        return value

    return parse


positive_int = _number_type(int, "a whole number >= 1", lambda v: v >= 1)
positive_float = _number_type(float, "a number > 0", lambda v: v > 0)
unit_fraction = _number_type(float, "a number in (0, 1]", lambda v: 0 < v <= 1)


class Dataset(collections.namedtuple("Dataset", MNIST_KEYS + ("name",))):
    """Digit images `(n, height, width)` in [0, 1], labels 0..9, the source's name."""

    def flat(self):  # (x_train, y_train, x_test, y_test), images as vectors
        return tuple(a.reshape(len(a), -1) if a.ndim > 1 else a for a in self[:4])

    def shrink(self, n_train, n_test):  # the first examples of each split
        sizes = (n_train, n_train, n_test, n_test)
        return Dataset(*(a[:n] for a, n in zip(self, sizes)), self.name)


def load_data(path=None):
    """An `.npz` in Keras's `mnist.npz` format, or scikit-learn's bundled 8x8
    digits (1,797 images, no download), 25% of them, stratified, to test."""
    if path is None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x, y = (digits.images / 16.0).astype("float32"), digits.target.astype("int32")
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=0.25, random_state=0, stratify=y
        )
        return Dataset(x_train, y_train, x_test, y_test, "scikit-learn digits (8x8)")
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data: no file at {path}; expected {EXPECTED_NPZ}.")
    try:
        if not zipfile.is_zipfile(path):
            raise ValueError("an .npz is a zip file of .npy arrays")
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
        problem = _npz_problem(arrays)
    except (OSError, ValueError) as error:
        problem = f"is not an .npz archive ({error})"
    if problem:
        raise ValueError(f"--data: {path} {problem}; expected {EXPECTED_NPZ}.")
    images = [arrays[key].astype("float32") for key in ("x_train", "x_test")]
    x_train, x_test = (x / (max(x.max(), 0) or 1) for x in images)
    y_train, y_test = (arrays[key].astype("int32") for key in ("y_train", "y_test"))
    name = f"{path.name} ({x_train.shape[1]}x{x_train.shape[2]})"
    return Dataset(x_train, y_train, x_test, y_test, name)


def _npz_problem(arrays):
    missing = [key for key in MNIST_KEYS if key not in arrays]
    if missing:
        return f"lacks {', '.join(missing)}; found {sorted(arrays) or 'no arrays'}"
    for split in ("train", "test"):
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if images.ndim != 3 or labels.shape != images.shape[:1] or not len(labels):
            return f"has x_{split} of shape {images.shape}, y_{split} of {labels.shape}"
        if not np.isin(labels, np.arange(10)).all():
            return f"has y_{split} labels outside 0..9"
    return None


def _data_argument(text):
    try:
        return load_data(text)
    except (FileNotFoundError, ValueError) as error:  # argparse names --data itself
        raise argparse.ArgumentTypeError(str(error).removeprefix("--data: ")) from None


class ExampleParser(argparse.ArgumentParser):
    """`--quick`, `--out`, `--data` (if `data`), `--seed`, sizes by `--quick`. A quick
    run writes into `quick/` in `--out`, a `smoke_test` unless `quick_is_full_run`."""

    def __init__(self, name, description, data=True, quick_is_full_run=False):
        style = argparse.RawDescriptionHelpFormatter
        super().__init__(description=description, formatter_class=style)
        self._sizes, self._quick_is_full_run = {}, quick_is_full_run
        smoke = "a smoke test, a little training on a little data (not results)"
        quick = "the same run" if quick_is_full_run else smoke
        help = f"{quick}, into the quick/ subfolder of --out, apart from a full run"
        self.add_argument("--quick", action="store_true", help=help)
        out = pathlib.Path("keras_bn_runs") / name
        help = "folder for the figure and CSV files (default: %(default)s)"
        self.add_argument("--out", type=pathlib.Path, default=out, help=help)
        if data:
            help = "an mnist.npz (default: scikit-learn's 8x8 digits, no download)"
            self.add_argument("--data", type=_data_argument, help=help)
        help = "random seed (default: %(default)s)"
        self.add_argument("--seed", type=int, default=0, help=help)

    def add_size(self, flag, what, full, quick, type=None):
        """An option that defaults to `full`, or to `quick` with `--quick`."""
        help = f"{what} (default: {full}, {quick} with --quick)"
        action = self.add_argument(flag, type=type or positive_int, help=help)
        self._sizes[action.dest] = (full, quick)

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        for dest, full_and_quick in self._sizes.items():
            given = getattr(parsed, dest)
            setattr(parsed, dest, given or full_and_quick[parsed.quick])
        parsed.smoke_test = parsed.quick and not self._quick_is_full_run
        parsed.out = parsed.out / "quick" if parsed.quick else parsed.out
        # Stop before TensorFlow loads if --out cannot be made; make nothing yet.
        existing = parsed.out.absolute()
        while not os.path.exists(existing):
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            why = "is not writable" if existing.is_dir() else "is a file, not a folder"
            self.error(
                f"argument --out: cannot write to {parsed.out}: {existing} {why}"
            )
        return parsed


def start_run(args):
    """Creates `--out`, seeds, and returns the `Dataset` (None without `--data`)."""
    args.out.mkdir(parents=True, exist_ok=True)
    if args.smoke_test:
        where = f"outputs go to {args.out}, apart from a full run's"
        print(f"quick run: a smoke test of the set-up, {QUICK_NOT_A_RESULT}; {where}.")
    import keras

    keras.utils.set_random_seed(args.seed)
    if "data" in args:
        data = load_data() if args.data is None else args.data
        size = f"{len(data.x_train)} train / {len(data.x_test)} test images"
        print(f"data: {data.name}, {size}; output: {args.out}")
        return data


def announce(index, total, text):
    """Prints one progress line at once: `[ 3/12] text`."""
    print(f"[{index:>{len(str(total))}}/{total}] {text}", flush=True)


def save_figure(figure, path, legend=(), ncols=None):
    """Writes `figure` as a 120-dpi PNG, with one legend below the panels from
    the labelled artists of the axes `legend` (`ncols` a row); returns `path`."""
    entries = {}
    for ax in legend:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        where = dict(loc="outside lower center", ncols=ncols or len(entries))
        figure.legend(list(entries.values()), list(entries), **where, frameon=False)
    figure.savefig(path, dpi=120)
    matplotlib.pyplot.close(figure)
    return path


def write_csv(path, rows):
    """Writes dicts with the same keys as a CSV (columns: the first row's keys)."""
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def print_table(rows, columns=None):
    """Prints dicts as an aligned table; floats with 4 significant digits."""
    columns = columns or list(rows[0])

    def cell(value):
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float | np.floating) else str(value)

    cells = [[cell(row[column]) for column in columns] for row in rows]
    widths = [max(map(len, column)) for column in zip(columns, *cells)]
    for line in [columns, *cells]:
        print("  ".join(c.rjust(width) for c, width in zip(line, widths)))


@contextlib.contextmanager
def verdicts(args):
    """In a quick run, starts each non-blank line printed inside with `QUICK_LABEL`."""
    printed, label = io.StringIO(), QUICK_LABEL if args.smoke_test else ""
    with contextlib.redirect_stdout(printed):
        yield
    for line in printed.getvalue().splitlines(keepends=True):
        print(label + line if line.strip() else line, end="")


def print_wall_time(args, outputs="figure and CSV"):
    """The closing line: wall time since `STARTED`, and where the outputs are."""
    seconds = time.perf_counter() - STARTED
    print(
        f"wall time: {seconds:.0f} s since the script started (TensorFlow's "
        f"start-up included); {outputs} in {args.out}"
    )
    if args.smoke_test:
        print(
            f"quick run: {QUICK_NOT_A_RESULT}, only a check that the set-up "
            "runs; run without --quick for the results."
        )
