"""keras_bn's argument checks, one function per kind of argument, and the
checks of shapes known only when a graph runs (docs/guarantees.md). A wrong
type raises a TypeError and a wrong value a ValueError, both naming the
argument. Strings are never read as numbers or booleans (`bool("False")` is True).
"""

import math
import operator

import numpy as np
import tensorflow as tf


def check_float(value, arg_name, expected="a float"):
    """`value` as a Python float; numbers pass, strings and booleans do not."""
    refused = isinstance(value, (bool, np.bool_, str, bytes))
    try:
        if refused or not hasattr(value, "__float__"):
            raise TypeError
        return float(value)
    except (TypeError, ValueError):  # also an array of several numbers
        raise TypeError(
            f"Argument `{arg_name}` must be {expected}. "
            f"Received: {arg_name}={value!r} of type {type(value).__name__}"
        ) from None


def check_in_range(value, arg_name, low, high, low_open=False, high_open=False):
    """`value` as a finite float from `low` to `high` (`math.inf`: unbounded)."""
    if high == math.inf:
        expected = f"{'>' if low_open else '>='} {low} and finite"
    else:
        brackets = ("(" if low_open else "[", ")" if high_open else "]")
        expected = f"in {brackets[0]}{low}, {high}{brackets[1]}"
    value_ = check_float(value, arg_name, f"a float {expected}")
    above = value_ > low if low_open else value_ >= low
    below = value_ < high if high_open else value_ <= high
    if not (math.isfinite(value_) and above and below):
        raise ValueError(
            f"Argument `{arg_name}` must be {expected}. Received: {arg_name}={value}"
        )
    return value_


def check_bool(value, arg_name, expected="True or False"):
    """`value` as a Python bool; only True and False (Python or NumPy) pass."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(
        f"Argument `{arg_name}` must be {expected}. "
        f"Received: {arg_name}={value!r} of type {type(value).__name__}"
    )


def check_optional_bool(value, arg_name):
    """None, True or False (for arguments such as `fused`, None = automatic)."""
    return None if value is None else check_bool(value, arg_name, "None, True or False")


def _integer(value):
    if isinstance(value, (bool, np.bool_)):
        raise TypeError
    return operator.index(value)  # ints and NumPy integers; never 1.5 or "1"


def check_int(value, arg_name, positive=False, optional=False):
    """`value` as an int (not a bool), >= 1 if `positive`; None if `optional`."""
    if optional and value is None:
        return None
    expected = "a positive int" if positive else "an int"
    expected += " or None" if optional else ""
    try:
        value_ = _integer(value)
    except TypeError:
        raise TypeError(
            f"Argument `{arg_name}` must be {expected}. Received: {arg_name}={value!r}"
        ) from None
    if positive and value_ < 1:
        raise ValueError(
            f"Argument `{arg_name}` must be {expected}. Received: {arg_name}={value}"
        )
    return value_


def check_optional_int(value, arg_name):
    """None or an int (for `ignore_class`)."""
    return check_int(value, arg_name, optional=True)


def check_optional_positive_int(value, arg_name):
    """None or an int >= 1 (for `steps`, `batch_size`, `virtual_batch_size`)."""
    return check_int(value, arg_name, positive=True, optional=True)


def check_float_list(values, arg_name, low, high):
    """A non-empty iterable (not a string) of floats in [low, high], as a tuple."""
    message = (
        f"Argument `{arg_name}` must be a non-empty list of floats in "
        f"[{low}, {high}]. Received: {arg_name}={values!r}"
    )
    try:  # a string's characters are strings: refused too
        floats = tuple(check_float(value, arg_name) for value in values)
    except TypeError:
        raise TypeError(message) from None
    if not floats or not all(low <= value <= high for value in floats):
        raise ValueError(message)
    return floats


def check_list_of(values, arg_name, types, expected):
    """A non-empty list of `types` instances; one instance becomes a list of
    one. `expected` says what, as "a non-empty list of ..."."""
    if isinstance(values, types):
        return [values]
    try:
        values_ = [None] if isinstance(values, (str, bytes)) else list(values)
    except TypeError:  # not iterable
        values_ = [None]
    wrong_type = not all(isinstance(value, types) for value in values_)
    if wrong_type or not values_:
        raise (TypeError if wrong_type else ValueError)(
            f"Argument `{arg_name}` must be {expected}. Received: {arg_name}={values!r}"
        )
    return values_


def check_arrays(value, arg_name, expected="an array or a list/dict of arrays"):
    """An array, or a list/tuple/dict of arrays with non-empty batch axes, as
    NumPy arrays; `expected` says what it may be, for the TypeError."""
    try:
        arrays = tf.nest.map_structure(np.asarray, value)
        leaves = tf.nest.flatten(arrays)
        if not leaves or any(a.dtype == object or a.ndim == 0 for a in leaves):
            raise TypeError  # None, or scalars (a list of numbers is a structure)
    except (TypeError, ValueError):
        raise TypeError(
            f"Argument `{arg_name}` must be {expected}. Received: {arg_name}={value!r}"
        ) from None
    if any(len(leaf) == 0 for leaf in leaves):
        raise ValueError(
            f"Argument `{arg_name}` must hold at least one example (arrays with "
            f"a non-empty batch axis). Received shapes: {[a.shape for a in leaves]}"
        )
    return arrays


def check_choice(value, arg_name, choices):
    """`value` if one of `choices` (strings or ints), else a ValueError."""
    if isinstance(value, bool) or value not in choices:
        raise ValueError(
            f"Argument `{arg_name}` must be one of {list(choices)}. "
            f"Received: {arg_name}={value!r}"
        )
    return value


def check_axis(axis, arg_name="axis", single=False):
    """An int, or a non-empty list of distinct ints (only an int if `single`);
    whether they exist is checked with the input's rank (`keras_bn.ops.axes`)."""
    expected = "a single int" if single else "an int or a non-empty list/tuple of ints"
    try:
        if isinstance(axis, (list, tuple)) and not single:
            if not axis:
                raise TypeError
            axes = [_integer(a) for a in axis]
        else:
            return _integer(axis)
    except TypeError:
        raise TypeError(
            f"Argument `{arg_name}` must be {expected}. Received: {arg_name}={axis!r}"
        ) from None
    if len(set(axes)) != len(axes):
        raise ValueError(
            f"Argument `{arg_name}` repeats an axis: each axis must be "
            f"given once. Received: {arg_name}={axis!r}"
        )
    return axes


def check_epsilon(epsilon):
    """The normalization ops' and layers' `epsilon`: a float > 0, finite."""
    return check_in_range(epsilon, "epsilon", 0, math.inf, low_open=True)


def check_clipping_epsilon(epsilon):
    """The probability losses' clipping bound `epsilon`: a float in (0, 0.5)."""
    return check_in_range(epsilon, "epsilon", 0, 0.5, low_open=True, high_open=True)


def check_label_smoothing(label_smoothing):
    """A float in [0, 1]."""
    return check_in_range(label_smoothing, "label_smoothing", 0, 1)


def check_not_ragged(value, arg_name, owner, hint):
    """A ValueError for ragged and sparse tensors (tf or Keras), naming
    `arg_name`, `owner` (the refusing class) and `hint` (what to do instead)."""
    for kind, tf_type in (("ragged", tf.RaggedTensor), ("sparse", tf.SparseTensor)):
        if isinstance(value, tf_type) or getattr(value, kind, False) is True:
            raise ValueError(
                f"{owner} does not support {kind} inputs: `{arg_name}` is a "
                f"{kind} tensor. {hint} Received: {arg_name}={value!r}"
            )


def check_renorm_clipping(renorm_clipping):
    """The clipping dict with float (or None) values, keys and bounds checked."""
    keys = ["rmax", "rmin", "dmax"]
    received = f"Received: renorm_clipping={renorm_clipping!r}"
    if not isinstance(renorm_clipping, dict):
        raise TypeError(
            f"Argument `renorm_clipping` must be a dict with optional keys {keys}. "
            f"{received}"
        )
    unknown = sorted(set(renorm_clipping) - set(keys))
    if unknown:
        raise ValueError(  # Keras's wording, which its own test suite pins
            f"Received invalid keys for `renorm_clipping` argument: {unknown}. "
            f"Supported keys: {keys}. {received}"
        )
    clip = {}
    for key, value in renorm_clipping.items():
        try:
            clip[key] = None if value is None else check_float(value, key)
        except TypeError:
            raise TypeError(
                f"Argument `renorm_clipping` must map {key!r} to a float or None. "
                f"{received}"
            ) from None
        if value is not None and math.isnan(clip[key]):
            raise ValueError(
                f"Argument `renorm_clipping` maps {key!r} to NaN. {received}"
            )
    rmin, rmax, dmax = (clip.get(k) for k in ("rmin", "rmax", "dmax"))
    for broken, needs in (
        (rmin is not None and rmin < 0, "rmin should be non-negative"),
        (None not in (rmin, rmax) and rmax < rmin, "rmax should be >= rmin"),
        (dmax is not None and dmax < 0, "dmax should be non-negative"),
    ):
        if broken:
            raise ValueError(f"Argument `renorm_clipping`: {needs}. {received}")
    return clip


def check_verbose(verbose):
    """Keras's `verbose`: "auto" (as 1), 0, 1 or 2."""
    verbose = check_choice(verbose, "verbose", ("auto", 0, 1, 2))
    return 1 if verbose == "auto" else int(verbose)


def checked_at_run_time(tensor, condition, message):
    """`tensor`, once the boolean scalar `condition` holds: else an
    InvalidArgumentError with `message` (not under XLA, which drops asserts)."""
    assertion = tf.debugging.assert_equal(condition, True, message=message)
    with tf.control_dependencies([assertion]):
        return tf.identity(tensor)


def check_shape(tensor, arg_name, like, whose, drop=(), received=""):
    """`tensor` if it can have the shape of `like` without the axes `drop`
    (non-negative), "the shape of {whose}": else a ValueError, or for sizes
    known only at run time `shape_at_run_time`'s error."""
    kept = [a for a in range(like.shape.rank) if a not in drop]
    expected = tf.TensorShape([like.shape[a] for a in kept])
    if not expected.is_compatible_with(tensor.shape):  # also for another rank
        raise ValueError(
            f"`{arg_name}` must have the shape of {whose}, {expected.as_list()}. "
            f"Received: {arg_name}.shape={tensor.shape.as_list()}{received}"
        )
    if tensor.shape.is_fully_defined() and expected.is_fully_defined():
        return tensor
    run_time = tf.shape(like, out_type=tf.int64)
    if drop:
        run_time = tf.gather(run_time, kept)
    message = f"`{arg_name}` must have the shape of {whose}"
    return shape_at_run_time(tensor, run_time, message)


def shape_at_run_time(tensor, expected, message):
    """`tensor` (some sizes known only at run time) checked to have the int64
    shape `expected`, as `checked_at_run_time` and under XLA too."""
    assertion = tf.debugging.assert_equal(
        tf.shape(tensor, out_type=tf.int64), expected, message=message
    )
    with tf.control_dependencies([assertion]):
        # broadcast_to fails unless each size is the expected one or 1, the
        # reshape unless the sizes multiply to the same count (a permutation
        # passes the one, not the other). Both are free; both feed the result.
        same = tf.broadcast_to(tensor, expected)
        counted = tf.reshape(tensor, expected)
    return tf.where(tf.equal(same, counted), same, counted)
