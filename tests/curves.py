"""Assertions on short loss curves that hold on any CPU.

Floating-point results differ between machines (vector widths, reduction orders), so a few-step trajectory is not
monotone everywhere. Tests compare window means with a margin instead of single values or exact shapes.
"""
from __future__ import annotations

import math


def assert_falls(values: list[float], factor: float, window: int = 3) -> None:
    """Every value is finite and the mean of the last ``window`` values is below ``factor`` x the mean of the
    first ``window`` (the windows do not overlap)."""
    assert len(values) >= 2 * window, f"need at least {2 * window} values, got {len(values)}"
    assert all(math.isfinite(v) for v in values), values
    first = sum(values[:window]) / window
    last = sum(values[-window:]) / window
    assert last < factor * first, (f"mean of the last {window} = {last:.4g} is not below {factor} x the mean of the "
                                   f"first {window} = {first:.4g}: {[round(v, 4) for v in values]}")
