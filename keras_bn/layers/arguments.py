"""Argument checks for the normalization layers: raised in the constructor."""

RENORM_CLIPPING_KEYS = ("rmax", "rmin", "dmax")
VARIANCE_ESTIMATORS = ("biased", "unbiased")


def check_unit_interval(value, arg_name):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"Argument `{arg_name}` must be a float in [0, 1]. "
            f"Received: {arg_name}={value!r}"
        ) from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"Argument `{arg_name}` must be in [0, 1]. Received: {arg_name}={value}"
        )
    return value


def check_renorm_clipping(renorm_clipping):
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
        try:
            clip[key] = None if value is None else float(value)
        except (TypeError, ValueError):
            raise TypeError(
                f"Argument `renorm_clipping` must map {key!r} to a float. "
                f"Received: renorm_clipping={renorm_clipping}"
            ) from None
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
    return dict(renorm_clipping)


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
