"""Interleaved timing of competing implementations of one benchmark case.

Every implementation is warmed up (tracing, XLA compilation, allocator growth),
then timed round-robin: each repetition runs every implementation once, with
the starting implementation rotated, so slow drift of the machine's load hits
all of them alike. One repetition of an implementation is a loop of `k` calls,
`k` chosen so that the loop lasts about `target_seconds`; the reported time is
the per-call median over the repetitions.

TensorFlow runs eager ops and `tf.function` calls synchronously on the CPU, so
a call has finished its work when it returns: nothing is fetched to the host
inside the timed loops.
"""

import dataclasses
import math
import statistics
import time

MAX_CALLS_PER_REPETITION = 10_000


@dataclasses.dataclass
class Timing:
    """Per-call times (seconds) of one implementation, one per repetition."""

    seconds: list
    calls_per_repetition: int

    @property
    def median(self):
        return statistics.median(self.seconds)

    def as_dict(self):
        return {
            "median_ms": self.median * 1e3,
            "min_ms": min(self.seconds) * 1e3,
            "times_ms": [t * 1e3 for t in self.seconds],
            "calls_per_repetition": self.calls_per_repetition,
        }


def calls_per_repetition(fn, target_seconds):
    """How many calls of `fn` make a repetition of about `target_seconds`."""
    calls, elapsed = 0, 0.0
    start = time.perf_counter()
    # A quarter of the target is enough for an estimate; cheap functions are
    # called several times because one call is too short to time.
    while elapsed < target_seconds / 4 and calls < MAX_CALLS_PER_REPETITION:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
    per_call = elapsed / calls
    return max(1, min(MAX_CALLS_PER_REPETITION, round(target_seconds / per_call)))


def time_interleaved(fns, repetitions, target_seconds=None, warmup_calls=1):
    """Times the callables of the dict `fns` round-robin.

    Args:
        fns: Mapping from implementation name to a callable without arguments.
        repetitions: Number of timed repetitions per implementation.
        target_seconds: Duration of one repetition, which sets the number of
            calls per repetition. None: one call per repetition.
        warmup_calls: Untimed calls of each implementation before anything is
            timed (tracing, compilation). The calls that choose the loop size
            are untimed too.

    Returns:
        A dict from implementation name to `Timing`.
    """
    if repetitions < 1:
        raise ValueError(f"`repetitions` must be >= 1. Received: {repetitions}")
    names = list(fns)
    for name in names:
        for _ in range(warmup_calls):
            fns[name]()
    calls = {
        name: 1
        if target_seconds is None
        else calls_per_repetition(fns[name], target_seconds)
        for name in names
    }
    seconds = {name: [] for name in names}
    for repetition in range(repetitions):
        shift = repetition % len(names)
        for name in names[shift:] + names[:shift]:
            fn, k = fns[name], calls[name]
            start = time.perf_counter()
            for _ in range(k):
                fn()
            seconds[name].append((time.perf_counter() - start) / k)
    for name, values in seconds.items():
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise RuntimeError(f"Non-positive time measured for {name}: {values}")
    return {name: Timing(seconds[name], calls[name]) for name in names}
