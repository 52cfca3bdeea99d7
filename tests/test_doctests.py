"""The `Example:` sections of keras_bn's docstrings, and the README's examples, run.

Every docstring with `>>>` lines in a keras_bn module runs as a doctest, with
NORMALIZE_WHITESPACE and ELLIPSIS (tensor reprs wrap where NumPy decides) and
with `tf`, `np`, `keras`, `keras_bn` and the module's own names in scope.
"""

import doctest
import importlib
import pathlib
import pkgutil
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_bn

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPTIONS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


def keras_bn_modules():
    names = ["keras_bn"] + [
        info.name
        for info in pkgutil.walk_packages(keras_bn.__path__, prefix="keras_bn.")
    ]
    return [importlib.import_module(name) for name in sorted(names)]


def docstring_examples():
    finder = doctest.DocTestFinder(exclude_empty=True)
    extra = {"tf": tf, "np": np, "keras": keras, "keras_bn": keras_bn}
    tests = {}
    for module in keras_bn_modules():
        for test in finder.find(module, extraglobs=extra):
            if test.examples:
                tests[test.name] = test
    return [tests[name] for name in sorted(tests)]


EXAMPLES = docstring_examples()


def test_the_docstrings_hold_examples():
    # A broken collection must not pass as "no doctests": 37 statements in 17
    # docstrings when this test was written.
    assert sum(len(t.examples) for t in EXAMPLES) >= 30, [t.name for t in EXAMPLES]


@pytest.fixture
def fresh_keras_state():
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")
    keras.backend.clear_session()


@pytest.mark.parametrize("example", EXAMPLES, ids=[t.name for t in EXAMPLES])
@pytest.mark.usefixtures("fresh_keras_state")
def test_docstring_example(example):
    report = []
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    result = runner.run(example, out=report.append, clear_globs=True)
    assert result.failed == 0, f"{example.name} ({example.filename}):\n" + "".join(
        report
    )


def readme_python_blocks():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)


def run_readme_block(index, tmp_path, monkeypatch, capsys):
    """Runs README block `index` in `tmp_path`; returns its last printed line."""
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_python_blocks()[index], f"README.md block {index}", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines, "the README example printed nothing"
    return lines[-1]


def test_readme_has_the_two_examples():
    blocks = readme_python_blocks()
    assert len(blocks) == 2
    assert "SoftmaxCrossEntropy" in blocks[0] and ".fit(" in blocks[0]
    assert "convert_batch_normalization" in blocks[1]


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_keras_state")
def test_readme_first_model_trains_saves_and_reloads(tmp_path, monkeypatch, capsys):
    # The example prints the largest difference between the reloaded model's
    # predictions and the trained model's; the README says 0.0.
    assert float(run_readme_block(0, tmp_path, monkeypatch, capsys)) == 0.0
    assert (tmp_path / "digits.keras").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_keras_state")
def test_readme_conversion_keeps_inference(tmp_path, monkeypatch, capsys):
    difference = float(run_readme_block(1, tmp_path, monkeypatch, capsys))
    assert difference <= 1e-5
