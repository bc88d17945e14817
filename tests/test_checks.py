"""linattn._checks: the messages name the argument, the range and the value received."""

import math

import pytest

from linattn._checks import check_real


@pytest.mark.parametrize(
    "value,low,high,low_in,high_in,ok",
    [
        (0.5, 0.0, 1.0, False, False, True),
        (0, 0.0, 1.0, False, False, False),
        (0, 0.0, 1.0, True, False, True),
        (1.0, 0.0, 1.0, True, False, False),
        (1.0, 0.0, 1.0, True, True, True),
        (math.inf, 0.0, math.inf, False, False, False),
        (3, 0.0, math.inf, False, False, True),
    ],
    ids=["inside", "open-low", "closed-low", "open-high", "closed-high", "inf", "int"],
)
def test_check_real_interval(value, low, high, low_in, high_in, ok):
    if ok:
        assert (
            check_real("x", value, low, high, low_inclusive=low_in, high_inclusive=high_in) == value
        )
    else:
        with pytest.raises(ValueError, match=r"x must be in [\[(]"):
            check_real("x", value, low, high, low_inclusive=low_in, high_inclusive=high_in)


def test_check_real_messages():
    with pytest.raises(ValueError, match=r"^lr must be in \(0, inf\), got 0$"):
        check_real("lr", 0, 0.0, math.inf)
    with pytest.raises(ValueError, match=r"^p must be in \[0, 1\], got 1.5$"):
        check_real("p", 1.5, 0.0, 1.0, low_inclusive=True, high_inclusive=True)
    for bad in (True, "1e-3", None):
        with pytest.raises(TypeError, match="lr must be a number"):
            check_real("lr", bad, 0.0, math.inf)
