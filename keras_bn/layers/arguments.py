"""Argument checks for keras_bn's layers and losses.

Constructor arguments are checked where they are given, so that a wrong type
raises at once with the argument's name instead of late, in `build` or in the
first call, with a bare conversion error. Strings are never read as numbers
or booleans: `bool("False")` is True and `int("1")` would hide a typo.
"""

import math
import operator

import numpy as np
import tensorflow as tf

from keras_bn.ops.checks import check_float

RENORM_CLIPPING_KEYS = ("rmax", "rmin", "dmax")
VARIANCE_ESTIMATORS = ("biased", "unbiased")


def check_bool(value, arg_name):
    """`value` as a Python bool; only True and False (Python or NumPy) pass."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(
        f"Argument `{arg_name}` must be True or False. "
        f"Received: {arg_name}={value!r} of type {type(value).__name__}"
    )


def check_unit_interval(value, arg_name):
    value_ = check_float(value, arg_name, "a float in [0, 1]")
    if not 0.0 <= value_ <= 1.0:
        raise ValueError(
            f"Argument `{arg_name}` must be in [0, 1]. Received: {arg_name}={value}"
        )
    return value_


def _integer(value):
    if isinstance(value, (bool, np.bool_)):
        raise TypeError
    return operator.index(value)  # ints and NumPy integers; never 1.5 or "1"


def check_axis(axis, arg_name="axis"):
    """An int, or a non-empty list of distinct ints (a tuple becomes a list).

    Raises:
        TypeError: If `axis` or one of its entries is not an integer (a float
            such as 1.5, a string such as "1", a bool).
        ValueError: If a list repeats an entry. Entries that name the same
            axis only for a given rank, such as `[1, -1]` for rank 2, are
            caught when the rank is known (in `build`).
    """
    expected = "an int or a non-empty list/tuple of ints"
    try:
        if isinstance(axis, (list, tuple)):
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
            f"Argument `{arg_name}` repeats an axis: each feature axis must be "
            f"given once. Received: {arg_name}={axis!r}"
        )
    return axes


def check_not_ragged(value, arg_name, owner, hint):
    """Refuses ragged and sparse tensors (tf or Keras symbolic) with a clear error.

    Args:
        value: What was passed.
        arg_name: Its name in the call, e.g. "inputs".
        owner: Who refuses it, e.g. "BatchNormalization".
        hint: What to do instead.
    """
    for kind, tf_type in (("ragged", tf.RaggedTensor), ("sparse", tf.SparseTensor)):
        if isinstance(value, tf_type) or getattr(value, kind, False) is True:
            raise ValueError(
                f"{owner} does not support {kind} inputs: `{arg_name}` is a "
                f"{kind} tensor. {hint} Received: {arg_name}={value!r}"
            )


def check_renorm_clipping(renorm_clipping):
    """The clipping dict with float (or None) values, keys and bounds checked."""
    if not isinstance(renorm_clipping, dict):
        raise TypeError(
            "Argument `renorm_clipping` must be a dict with optional keys "
            f"{list(RENORM_CLIPPING_KEYS)}. Received: "
            f"renorm_clipping={renorm_clipping!r}"
        )
    unknown = set(renorm_clipping) - set(RENORM_CLIPPING_KEYS)
    if unknown:
        raise ValueError(
            f"Argument `renorm_clipping` has unsupported keys {sorted(unknown)}. "
            f"Supported keys: {list(RENORM_CLIPPING_KEYS)}. Received: "
            f"renorm_clipping={renorm_clipping}"
        )
    clip = {}
    for key, value in renorm_clipping.items():
        if value is None:
            clip[key] = None
            continue
        try:
            clip[key] = check_float(value, "renorm_clipping")
        except TypeError:
            raise TypeError(
                f"Argument `renorm_clipping` must map {key!r} to a float or None. "
                f"Received: renorm_clipping={renorm_clipping!r}"
            ) from None
        if math.isnan(clip[key]):
            raise ValueError(
                f"Argument `renorm_clipping` maps {key!r} to NaN. "
                f"Received: renorm_clipping={renorm_clipping}"
            )
    rmin, rmax, dmax = (clip.get(k) for k in ("rmin", "rmax", "dmax"))
    if rmin is not None and rmin < 0:
        raise ValueError(
            "Argument `renorm_clipping` needs rmin >= 0. "
            f"Received: renorm_clipping={renorm_clipping}"
        )
    if rmin is not None and rmax is not None and rmax < rmin:
        raise ValueError(
            "Argument `renorm_clipping` needs rmax >= rmin. "
            f"Received: renorm_clipping={renorm_clipping}"
        )
    if dmax is not None and dmax < 0:
        raise ValueError(
            "Argument `renorm_clipping` needs dmax >= 0. "
            f"Received: renorm_clipping={renorm_clipping}"
        )
    return clip


def check_virtual_batch_size(virtual_batch_size, synchronized, fused):
    if virtual_batch_size is None:
        return None
    if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int):
        raise TypeError(
            "Argument `virtual_batch_size` must be None or a positive int. "
            f"Received: virtual_batch_size={virtual_batch_size!r}"
        )
    if virtual_batch_size < 1:
        raise ValueError(
            "Argument `virtual_batch_size` must be a positive int. "
            f"Received: virtual_batch_size={virtual_batch_size}"
        )
    if synchronized:
        raise ValueError(
            "Argument `virtual_batch_size` cannot be combined with "
            "synchronized=True: virtual batches split a replica's batch, "
            "synchronization joins the replicas' batches."
        )
    if fused:
        raise ValueError(
            "Argument `virtual_batch_size` cannot be combined with fused=True: "
            "the fused kernels compute one set of statistics per batch."
        )
    return virtual_batch_size
