"""Repeated timing and the median/min/max summary every bench figure is reported with."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def summarize(values: list[float]) -> dict:
    """Median, min and max of repeated measurements (the median is the headline figure)."""
    if not values:
        raise ValueError("summarize() needs at least one value")
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def scale(stat: dict, factor_over: float) -> dict:
    """Turn a summary of times into a summary of rates `factor_over / time` (min and max swap)."""
    return {
        "median": factor_over / stat["median"],
        "min": factor_over / stat["max"],
        "max": factor_over / stat["min"],
        "n": stat["n"],
    }


def time_call(fn: Callable[[], object], repeat: int, min_time: float = 0.05) -> dict:
    """Seconds per call of `fn`, as a summary over `repeat` samples.

    One untimed warm-up call, then a calibration picks how many calls make up one sample
    (at least `min_time` seconds) so that short kernels are not dominated by timer and
    Python call overhead.
    """
    fn()
    calls = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time or calls >= 1 << 20:
            break
        calls = max(calls * 2, int(calls * min_time / max(elapsed, 1e-9) * 1.2))
    samples = [elapsed / calls]
    for _ in range(repeat - 1):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls)
    return summarize(samples)
