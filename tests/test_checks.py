"""linattn._checks: the messages name the argument, the range and the value received."""

import json
import math

import pytest

import linattn
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


def test_numpy_numbers_in_configs_are_stored_as_python_numbers():
    # Every config that is written to JSON keeps Python numbers, whatever it was given.
    np = pytest.importorskip("numpy")
    from linattn.integrations.hf.distill import DistillConfig
    from linattn.integrations.hf.transfer import TransferConfig
    from linattn.train import TrainConfig

    t = TrainConfig(
        attention="favor",
        window=np.int64(3),
        sinks=np.int64(1),
        steps=np.int64(10),
        lr=np.float32(1e-3),
        redraw_interval=None,
    )
    json.dumps(t.to_dict())
    assert type(t.window) is int and type(t.steps) is int and type(t.lr) is float
    for cfg in (
        DistillConfig(steps=np.int64(10), lr=np.float32(1e-3)),
        TransferConfig(steps=np.int32(4)),
    ):
        json.dumps(vars(cfg))
        assert type(cfg.steps) is int and type(cfg.lr) is float
    mod = linattn.PerformerAttention(16, 2, redraw_interval=np.int64(5))
    assert type(mod.redraw_interval) is int
    from linattn.integrations.hf.convert import _split_options

    algorithm, extra = _split_options(
        "favor", {"redraw_interval": np.int64(5), "seed": np.int32(3)}
    )
    json.dumps({**vars(algorithm), **extra})
    assert type(algorithm.redraw_interval) is int and type(extra.get("seed", 3)) is int
