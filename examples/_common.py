"""Shared pieces of the examples: data, command line, output files, tables.

Every example imports this module from its own directory, so the scripts run
from any working directory (`python path/to/examples/covariate_shift.py`).
"""

import argparse
import csv
import os
import pathlib
import time

# Hide TensorFlow's C++ start-up INFO lines; warnings and errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import keras  # noqa: E402
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


def _load_mnist_npz(path):
    expected = (
        "an .npz archive with arrays x_train (n, height, width), y_train (n,), "
        "x_test (m, height, width), y_test (m,) and labels 0..9, as Keras's "
        "mnist.npz"
    )
    if not path.is_file():
        raise FileNotFoundError(f"--data: no file at {path}; expected {expected}.")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--data: cannot read {path} as {expected} ({error})."
        ) from error
    missing = [key for key in MNIST_KEYS if key not in arrays]
    if missing:
        raise ValueError(
            f"--data: {path} lacks {', '.join(missing)}; found "
            f"{sorted(arrays) or 'no arrays'}; expected {expected}."
        )
    for split in ("train", "test"):
        _check_split(path, arrays[f"x_{split}"], arrays[f"y_{split}"], split, expected)
    return Dataset(
        _scale_images(arrays["x_train"]),
        arrays["y_train"].astype("int32"),
        _scale_images(arrays["x_test"]),
        arrays["y_test"].astype("int32"),
        f"{path.name} ({arrays['x_train'].shape[1]}x{arrays['x_train'].shape[2]})",
    )


def _check_split(path, images, labels, split, expected):
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
        raise ValueError(f"--data: in {path}, {problem}; expected {expected}.")


def _scale_images(images):
    images = images.astype("float32")
    peak = images.max()
    return images / peak if peak > 0 else images


def make_parser(example_name, description):
    """Command line shared by the examples: `--quick`, `--out`, `--data`, `--seed`.

    Args:
        example_name: the script's name without `.py`; the default output
            folder is `./keras_bn_runs/<example_name>`.
        description: the `--help` text.

    Returns:
        An `argparse.ArgumentParser` the example may extend.

    Example:

    ```python
    args = make_parser("bn_vs_plain", __doc__).parse_args()
    ```
    """
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few seconds of training, to check that everything runs",
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("keras_bn_runs") / example_name,
        help="folder for the figures and CSV files (default: %(default)s)",
    )
    parser.add_argument(
        "--data",
        type=pathlib.Path,
        default=None,
        help="an mnist.npz in Keras's format (default: scikit-learn's bundled "
        "8x8 digits, no download)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed (default: %(default)s)"
    )
    return parser


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
    keras.utils.set_random_seed(args.seed)
    try:
        data = load_data(args.data)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    args.out.mkdir(parents=True, exist_ok=True)
    print(
        f"data: {data.name}, {len(data.x_train)} train / {len(data.x_test)} "
        f"test images; output: {args.out}"
    )
    return data


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


class Stopwatch:
    """Wall time since creation, for the closing line of each example."""

    def __init__(self):
        self.start = time.perf_counter()

    def seconds(self):
        return time.perf_counter() - self.start
