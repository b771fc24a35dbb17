"""tests/curves.py: the margin assertion accepts a falling but non-monotone curve and rejects a flat one."""
import pytest

from tests.curves import assert_falls


def test_falling_curve_with_a_bump_passes_flat_and_nan_curves_fail():
    # Stage-0 L1 as measured on another 2-core CPU: step 4 rises and step 8 is above the minimum of steps 1-4.
    assert_falls([0.451, 0.383, 0.356, 0.363, 0.337, 0.350, 0.341, 0.3596], factor=0.95, window=3)
    with pytest.raises(AssertionError):
        assert_falls([0.40, 0.41, 0.39, 0.40, 0.40, 0.41], factor=0.95)
    with pytest.raises(AssertionError):
        assert_falls([0.4, 0.3, 0.2, float("nan"), 0.1, 0.1], factor=0.95)
