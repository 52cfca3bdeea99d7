"""Shared pieces of the examples: data, command line, output files, tables.

Every example imports this module from its own directory, so the scripts run
from any working directory (`python path/to/examples/covariate_shift.py`).

This module does not import TensorFlow or Keras at the top: each example
parses its command line first, so `--help` and a bad argument answer at once,
and imports TensorFlow after.
"""

import argparse
import contextlib
import csv
import math
import os
import pathlib
import sys
import tempfile
import time
import zipfile

# Each example imports this module first, so the wall time it prints counts
# from here, TensorFlow's import included. Left out: Python's own start-up
# (0.05 to 0.3 s here) and the process's exit after the closing line (1 to
# 2 s with TensorFlow loaded).
STARTED = time.perf_counter()

# Hide TensorFlow's C++ INFO lines; warnings and errors still show. A few
# start-up lines print before TensorFlow reads this setting (see README.md).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import numpy as np  # noqa: E402

MNIST_KEYS = ("x_train", "y_train", "x_test", "y_test")
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0


class Dataset:
    """A train/test split of grayscale digit images scaled to [0, 1].

    Attributes:
        x_train, x_test: float32 arrays of shape `(n, height, width)`.
        y_train, y_test: int32 arrays of class labels 0..9, shape `(n,)`.
        name: where the images came from, for printed summaries.
    """

    def __init__(self, x_train, y_train, x_test, y_test, name):
        self.x_train, self.y_train = x_train, y_train
        self.x_test, self.y_test = x_test, y_test
        self.name = name

    @property
    def image_shape(self):
        return self.x_train.shape[1:]

    def flat(self):
        """Images flattened to vectors: `(x_train, y_train, x_test, y_test)`."""
        return (
            self.x_train.reshape(len(self.x_train), -1),
            self.y_train,
            self.x_test.reshape(len(self.x_test), -1),
            self.y_test,
        )

    def shrink(self, n_train, n_test):
        """The first `n_train` training and `n_test` test examples."""
        return Dataset(
            self.x_train[:n_train],
            self.y_train[:n_train],
            self.x_test[:n_test],
            self.y_test[:n_test],
            self.name,
        )


def load_data(path=None):
    """Loads digit images: scikit-learn's bundled set, or an `mnist.npz` file.

    Without `path`, uses `sklearn.datasets.load_digits` (1,797 8x8 images that
    ship inside the scikit-learn wheel) with a fixed, stratified split: 25% of
    the images, chosen with seed 0, form the test set. With `path`, reads an
    `mnist.npz` in Keras's format and keeps its own train/test split.

    Args:
        path: optional path to an `.npz` file with the arrays `x_train`,
            `y_train`, `x_test`, `y_test` (images `(n, height, width)`, labels
            `(n,)` with values 0..9), as `keras.datasets.mnist` stores them.

    Returns:
        A `Dataset` with images scaled to [0, 1].

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: if the file is not an `.npz` archive with those arrays.

    Example:

    ```python
    data = load_data()  # bundled 8x8 digits
    x_train, y_train, x_test, y_test = data.flat()
    ```
    """
    if path is None:
        return _load_bundled_digits()
    return _load_mnist_npz(pathlib.Path(path))


def _load_bundled_digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")
    labels = digits.target.astype("int32")
    x_train, x_test, y_train, y_test = train_test_split(
        images,
        labels,
        test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SPLIT_SEED,
        stratify=labels,
    )
    return Dataset(x_train, y_train, x_test, y_test, "scikit-learn digits (8x8)")


EXPECTED_NPZ = (
    "an .npz archive with arrays x_train (n, height, width), y_train (n,), "
    "x_test (m, height, width), y_test (m,) and labels 0..9, as Keras's "
    "mnist.npz"
)


def check_npz_archive(path):
    """Checks that `path` is an `.npz` archive holding the four MNIST arrays.

    Reads only the archive's list of arrays, so it is cheap enough to run
    while parsing the command line; `load_data` checks the arrays themselves.

    Args:
        path: the file to check.

    Returns:
        `path` as a `pathlib.Path`.

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: if it is not an `.npz` archive, or lacks an array.

    Example:

    ```python
    check_npz_archive("mnist.npz")
    ```
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data: no file at {path}; expected {EXPECTED_NPZ}.")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"--data: {path} is not an .npz archive (an .npz is a zip file of "
            f".npy arrays); expected {EXPECTED_NPZ}."
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = set(archive.files)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--data: cannot read {path} as {EXPECTED_NPZ} ({error})."
        ) from error
    missing = [key for key in MNIST_KEYS if key not in names]
    if missing:
        raise ValueError(
            f"--data: {path} lacks {', '.join(missing)}; found "
            f"{sorted(names) or 'no arrays'}; expected {EXPECTED_NPZ}."
        )
    return path


def _load_mnist_npz(path):
    check_npz_archive(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in MNIST_KEYS}
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--data: cannot read {path} as {EXPECTED_NPZ} ({error})."
        ) from error
    for split in ("train", "test"):
        _check_split(path, arrays[f"x_{split}"], arrays[f"y_{split}"], split)
    return Dataset(
        _scale_images(arrays["x_train"]),
        arrays["y_train"].astype("int32"),
        _scale_images(arrays["x_test"]),
        arrays["y_test"].astype("int32"),
        f"{path.name} ({arrays['x_train'].shape[1]}x{arrays['x_train'].shape[2]})",
    )


def _check_split(path, images, labels, split):
    problem = None
    if images.ndim != 3 or len(images) == 0:
        problem = f"x_{split} has shape {images.shape}"
    elif labels.shape != (len(images),):
        problem = f"y_{split} has shape {labels.shape} for {len(images)} images"
    elif not np.issubdtype(images.dtype, np.number):
        problem = f"x_{split} has dtype {images.dtype}"
    elif not np.issubdtype(labels.dtype, np.integer):
        problem = f"y_{split} has dtype {labels.dtype}"
    elif labels.min() < 0 or labels.max() > 9:
        problem = f"y_{split} has labels outside 0..9"
    if problem:
        raise ValueError(f"--data: in {path}, {problem}; expected {EXPECTED_NPZ}.")


def _scale_images(images):
    images = images.astype("float32")
    peak = images.max()
    return images / peak if peak > 0 else images


def positive_int(text):
    """argparse type: a whole number >= 1, or a clear error.

    Example:

    ```python
    parser.add_argument("--epochs", type=positive_int)
    ```
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number >= 1, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def positive_float(text):
    """argparse type: a finite number > 0, or a clear error.

    Example:

    ```python
    parser.add_argument("--learning-rate", type=positive_float)
    ```
    """
    value = _finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value:g}")
    return value


def unit_fraction(text):
    """argparse type: a number in (0, 1], or a clear error.

    Example:

    ```python
    parser.add_argument("--threshold", type=unit_fraction)
    ```
    """
    value = _finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value:g}")
    return value


def _finite_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


class ExampleParser(argparse.ArgumentParser):
    """An `ArgumentParser` with options whose default depends on `--quick`.

    Its `parse_args` also moves a quick run's outputs into the `quick/`
    subfolder of `--out`, sets `smoke_test` (a quick run whose numbers are
    not results), and checks that the output folder can be written.
    """

    def __init__(self, quick_is_full_run=False, **kwargs):
        super().__init__(**kwargs)
        self._size_defaults = {}
        self._quick_is_full_run = quick_is_full_run

    def add_size(self, flag, what, full, quick, type=None):
        """Adds a positive option that defaults to `full`, or `quick` with --quick.

        Args:
            flag: the option, such as `"--epochs"`.
            what: what it counts, for `--help` (`"epochs per run"`).
            full: the default of a full run.
            quick: the default with `--quick`.
            type: the argparse type (default: `positive_int`).

        Example:

        ```python
        parser.add_size("--epochs", "epochs per run", full=30, quick=2)
        ```
        """
        action = self.add_argument(
            flag,
            type=type or positive_int,
            help=f"{what} (default: {full}, {quick} with --quick)",
        )
        self._size_defaults[action.dest] = (full, quick)

    def require_multiple(self, args, flag, of):
        """Stops with a message unless option `flag` is a multiple of `of`.

        Example:

        ```python
        parser.require_multiple(args, "--steps", "--eval-every")
        ```
        """
        value, unit = (
            getattr(args, f.lstrip("-").replace("-", "_")) for f in (flag, of)
        )
        if value % unit:
            self.error(f"{flag} ({value}) must be a multiple of {of} ({unit})")

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        for dest, (full, quick) in self._size_defaults.items():
            if getattr(parsed, dest) is None:
                setattr(parsed, dest, quick if parsed.quick else full)
        parsed.smoke_test = parsed.quick and not self._quick_is_full_run
        if parsed.quick:
            # Apart from a full run's, which it would otherwise overwrite.
            parsed.out = parsed.out / QUICK_FOLDER
        problem = unwritable_reason(parsed.out)
        if problem:
            self.error(f"argument --out: cannot write to {parsed.out}: {problem}")
        return parsed


# Where a quick run writes, inside --out.
QUICK_FOLDER = "quick"


def unwritable_reason(folder):
    """Why `folder` cannot be created and written to, or None if it can.

    Creates nothing: the check runs while parsing the command line, so that an
    unusable `--out` stops the script before TensorFlow loads. `start_run`
    makes sure by writing a file there.

    Example:

    ```python
    unwritable_reason(pathlib.Path("/proc/runs"))  # "/proc is not writable"
    ```
    """
    existing = pathlib.Path(folder)
    try:
        while not existing.exists():
            existing = existing.parent
    except OSError as error:
        return f"{error.filename}: {error.strerror}"
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def _npz_argument(text):
    try:
        return check_npz_archive(text)
    except (FileNotFoundError, ValueError) as error:
        # argparse adds "argument --data: " itself.
        raise argparse.ArgumentTypeError(str(error).removeprefix("--data: ")) from None


def make_parser(example_name, description, data=True, quick_is_full_run=False):
    """Command line shared by the examples: `--quick`, `--out`, `--seed`, `--data`.

    Args:
        example_name: the script's name without `.py`; the default output
            folder is `./keras_bn_runs/<example_name>`.
        description: the `--help` text.
        data: whether the example trains on the digit images and so takes
            `--data`; the examples that make their own data do not.
        quick_is_full_run: whether `--quick` runs the same computation as a
            full run (so its verdicts are results), only into `quick/`.

    Returns:
        An `ExampleParser` the example may extend.

    Example:

    ```python
    parser = make_parser("bn_vs_plain", __doc__)
    parser.add_size("--epochs", "epochs per run", full=30, quick=2)
    args = parser.parse_args()
    ```
    """
    parser = ExampleParser(
        quick_is_full_run=quick_is_full_run,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=(
            "the same run, into the quick/ subfolder of --out"
            if quick_is_full_run
            else "a smoke test: a little training on a little data, to check "
            "that everything runs (its verdicts are not results); writes into "
            "the quick/ subfolder of --out, apart from a full run"
        ),
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("keras_bn_runs") / example_name,
        help="folder for the figure and CSV files (default: %(default)s)",
    )
    if data:
        parser.add_argument(
            "--data",
            type=_npz_argument,
            default=None,
            help="an mnist.npz in Keras's format (default: scikit-learn's "
            "bundled 8x8 digits, no download)",
        )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed (default: %(default)s)",
    )
    return parser


def start_run(args):
    """Creates `args.out`, says what a quick run is, and seeds every generator.

    Imports Keras, so call it after the command line is parsed.

    Args:
        args: parsed arguments from `make_parser`.

    Raises:
        SystemExit: with code 2 (as for a bad argument) and a message naming
            `--out`, if the folder cannot be created or written to.

    Example:

    ```python
    start_run(args)
    ```
    """
    make_output_folder(args.out)
    if args.smoke_test:
        print(
            f"quick run: a smoke test of the set-up, {QUICK_NOT_A_RESULT}; "
            f"outputs go to {args.out}, apart from a full run's."
        )
    elif args.quick:
        print(f"quick run: the same run as a full one; outputs go to {args.out}.")
    import keras

    keras.utils.set_random_seed(args.seed)


QUICK_NOT_A_RESULT = "its numbers and verdicts are not results"


def make_output_folder(folder):
    """Creates `folder` and writes a file there, or exits naming `--out`.

    Example:

    ```python
    make_output_folder(args.out)
    ```
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        print(f"error: --out: cannot write to {folder}: {reason}", file=sys.stderr)
        raise SystemExit(2) from None


def prepare_run(args):
    """Seeds every generator, creates `args.out` and loads the data.

    Args:
        args: parsed arguments from `make_parser`.

    Returns:
        The `Dataset`; exits with a one-line message if `--data` is unusable.

    Example:

    ```python
    data = prepare_run(args)
    ```
    """
    try:
        data = load_data(args.data)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    start_run(args)
    print(
        f"data: {data.name}, {len(data.x_train)} train / {len(data.x_test)} "
        f"test images; output: {args.out}"
    )
    return data


def announce(index, total, text):
    """Prints one progress line, `[index/total] text`, at once.

    Example:

    ```python
    announce(3, 12, "BN, learning rate 0.01")  # [ 3/12] BN, learning rate 0.01
    ```
    """
    width = len(str(total))
    print(f"[{index:>{width}}/{total}] {text}", flush=True)


# Colours for the compared variants (Okabe & Ito's colour-blind-safe set,
# without its green and vermilion, which read as "good" and "bad").
COLORS = ("#0072B2", "#E69F00", "#CC79A7", "#56B4E9", "#000000")
# The line a threshold is drawn with.
THRESHOLD_STYLE = dict(color="gray", linestyle=":", linewidth=1)


def legend_below(figure, *axes, ncols=None):
    """One legend for the whole figure, below the panels, off every curve.

    Args:
        figure: a figure made with `layout="constrained"`.
        *axes: the axes whose labelled artists become the entries; a label
            seen twice appears once.
        ncols: entries per row (default: all in one row).

    Example:

    ```python
    legend_below(figure, axes[0], axes[1])
    ```
    """
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    figure.legend(
        list(entries.values()),
        list(entries),
        loc="outside lower center",
        ncols=ncols or len(entries),
        frameon=False,
    )


def save_figure(figure, path):
    """Writes `figure` as a PNG at 120 dpi and closes it.

    Example:

    ```python
    save_figure(figure, args.out / "bn_vs_plain.png")
    ```
    """
    import matplotlib.pyplot as plt

    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_csv(path, rows):
    """Writes a list of dicts (same keys, in order) as a CSV file.

    Args:
        path: the file to write.
        rows: non-empty list of dicts; the first row's keys name the columns.

    Returns:
        `path`.

    Example:

    ```python
    write_csv(out / "runs.csv", [{"model": "bn", "accuracy": 0.97}])
    ```
    """
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def print_table(rows, columns=None):
    """Prints dicts as an aligned text table; floats with 4 significant digits.

    Args:
        rows: list of dicts.
        columns: keys to show, in order (default: the first row's keys).

    Example:

    ```python
    print_table([{"model": "bn", "accuracy": 0.97}])
    ```
    """
    columns = columns or list(rows[0])
    cells = [[_format_cell(row[column]) for column in columns] for row in rows]
    widths = [
        max(len(column), *(len(line[i]) for line in cells))
        for i, column in enumerate(columns)
    ]
    print("  ".join(column.rjust(w) for column, w in zip(columns, widths)))
    for line in cells:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))


def _format_cell(value):
    if value is None:
        return "-"
    if isinstance(value, float | np.floating):
        return f"{value:.4g}"
    return str(value)


def mean_and_spread(values):
    """Mean and standard deviation (over seeds) of a list of numbers.

    Example:

    ```python
    mean, std = mean_and_spread([0.97, 0.98, 0.96])
    ```
    """
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std())


# A paired difference is "clear" when its mean exceeds this many standard errors.
CLEAR_DIFFERENCE = 2.0


def paired_difference(first, second, floor=0.0):
    """Compares two variants run with the same seeds, pair by pair.

    Args:
        first, second: equal-length sequences of one metric, `first[i]` and
            `second[i]` from runs with the same seed.
        floor: the smallest standard error to use: the uncertainty the seeds
            cannot see, such as that of a finite test set
            (`accuracy_difference_error`).

    Returns:
        `(mean, error, sign)`: the mean of `first - second`; its standard
        error, the larger of the spread over seeds and `floor`; and `sign`
        +1 (first clearly larger), -1 (clearly smaller) or 0 (no clear
        difference): clear means `|mean| > 2 * error`, with at least two
        finite pairs.

    Example:

    ```python
    mean, error, sign = paired_difference([0.97, 0.98, 0.96], [0.95, 0.97, 0.95])
    ```
    """
    differences = np.asarray(first, dtype=float) - np.asarray(second, dtype=float)
    if len(differences) < 2 or not np.all(np.isfinite(differences)):
        mean = float(differences.mean()) if len(differences) else float("nan")
        return mean, float("nan"), 0
    mean = float(differences.mean())
    spread = float(differences.std(ddof=1) / np.sqrt(len(differences)))
    error = max(spread, float(floor))
    if abs(mean) > CLEAR_DIFFERENCE * error:
        return mean, error, 1 if mean > 0 else -1
    return mean, error, 0


def accuracy_difference_error(accuracy, n):
    """Standard error of a difference of two accuracies near `accuracy` on `n` images.

    `sqrt(2 * accuracy * (1 - accuracy) / n)`: the test set is one sample of
    `n` images, whatever the number of seeds, so a difference smaller than
    about twice this is within the test set's sampling noise. It treats the
    two models' mistakes as independent; models that miss the same images
    have a smaller error, so this errs towards "no clear difference".

    Example:

    ```python
    accuracy_difference_error(0.98, 450)  # 0.0093
    ```
    """
    return float(np.sqrt(2.0 * accuracy * (1.0 - accuracy) / n))


# Starts each line of a quick run's verdicts.
QUICK_LABEL = "quick run, not a result: "


@contextlib.contextmanager
def verdicts(args):
    """Labels every line printed inside as not a result, in a quick run.

    A quick run trains for a few steps on a little data: its verdicts test
    only that the set-up runs, and may well read "did NOT hold".

    Example:

    ```python
    with verdicts(args):
        report(summary)
    ```
    """
    if not args.smoke_test:
        yield
        return
    with contextlib.redirect_stdout(_LabelledLines(sys.stdout, QUICK_LABEL)):
        yield


class _LabelledLines:
    """A text stream that starts each non-blank line with `label`."""

    def __init__(self, stream, label):
        self._stream, self._label = stream, label
        self._line_start = True

    def write(self, text):
        for piece in text.splitlines(keepends=True):
            if self._line_start and piece.strip():
                self._stream.write(self._label)
            self._stream.write(piece)
            self._line_start = piece.endswith("\n")
        return len(text)

    def flush(self):
        self._stream.flush()


def print_wall_time(args, outputs="figure and CSV"):
    """Prints the closing line: wall time since the script started, outputs.

    The time counts from the import of this module, the script's first, so
    TensorFlow's start-up is in it; the process's exit, after this line, is
    not. A quick run's line says again that it is not a result.

    Example:

    ```python
    print_wall_time(args)  # wall time: 63 s since the script started, ...
    ```
    """
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
