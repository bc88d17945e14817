"""Property tests (hypothesis) of the window/sinks hybrid at large score magnitudes
(issue 26 item 1): for every kernel, path (bidirectional, causal, recurrent), window and
sink count,

* a row whose visible keys all lie in its window or among the sinks equals exact softmax
  attention over them, at score magnitudes up to 1e4, in float32;
* every row equals a log-domain float64 oracle (the hybrid's weights built as logits:
  ``s_ij`` near, ``ln(lambda phi_i.phi_j)`` far, from the maps' stabilized features) at
  such magnitudes.

Every (kernel, path) pair is a parametrized case of its own, each at magnitude 1e4 and
at a drawn one, so none is left to the draw; hypothesis draws the rest (lengths,
window, sinks, padding, factor). Examples are derandomized and few per case, so the
file stays fast.
"""

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import linattn  # noqa: E402
from linattn.features import KERNELS, get_feature_map  # noqa: E402
from linattn.ops.favor.naive import sink_mask, window_mask  # noqa: E402

SETTINGS = settings(
    max_examples=3,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
PATHS = ["bidirectional", "causal", "recurrent"]
#: Every kernel on every path it has (the causal paths need a causal form).
PAIRS = [
    pytest.param(kernel, path, id=f"{kernel}-{path}")
    for path in PATHS
    for kernel in KERNELS
    if path == "bidirectional" or get_feature_map(kernel).causal_ok
]
#: 1e4: the largest magnitude, in every pair; None: drawn.
MAGNITUDES = [pytest.param(1e4, id="1e4"), pytest.param(None, id="drawn")]


@st.composite
def cases(draw, *, dtype, kernel, path, magnitude):
    length = draw(st.integers(1, 10))
    window = draw(st.one_of(st.none(), st.integers(0, length + 1)))
    sinks = draw(st.integers(1 if window is None else 0, 3))
    if magnitude is None:
        magnitude = draw(st.sampled_from([1.0, 1e2, 1e3, 1e4]))
    return {
        "path": path,
        "kernel": kernel,
        "b": draw(st.integers(1, 2)),
        "h": draw(st.integers(1, 2)),
        "length": length,
        "d": draw(st.integers(1, 6)),
        "dv": draw(st.integers(1, 3)),
        "window": window,
        "sinks": sinks,
        "magnitude": magnitude,
        "shift": draw(st.sampled_from([0.0, -1.0])),
        "padded": draw(st.booleans()),
        "factor": draw(st.sampled_from([None, 0.5])),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "dtype": dtype,
    }


def _inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    b, h, n, d = c["b"], c["h"], c["length"], c["d"]
    # Scores q.k / sqrt(d) of size about `magnitude`.
    amp = math.sqrt(c["magnitude"])
    q, k = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) * amp for _ in range(2))
    v = torch.randn(b, h, n, c["dv"], generator=g, dtype=torch.float64)
    # shift = -1: every score lowered by about `magnitude` (rows whose exact scores all
    # lie far below exp's underflow).
    k[..., 0] = k[..., 0].abs() + amp
    q[..., 0] = q[..., 0] + c["shift"] * amp * math.sqrt(d)
    mask = torch.zeros(b, n, dtype=torch.bool)
    if c["padded"]:
        mask = torch.rand(b, n, generator=g) < 0.4
        mask[torch.arange(b), torch.randint(0, n, (b,), generator=g)] = False
        k, v = (
            k.masked_fill(mask[:, None, :, None], 0.0),
            v.masked_fill(mask[:, None, :, None], 0.0),
        )
    fm = get_feature_map(c["kernel"])
    w = None
    if fm.needs_projection or c["kernel"].startswith("hedgehog"):
        w = linattn.draw_projection(4, fm.weight_cols(d), generator=g, dtype=torch.float64)
    lf = None if c["factor"] is None else torch.tensor(c["factor"], dtype=torch.float64)
    q, k, v = (t.to(c["dtype"]) for t in (q, k, v))
    w = None if w is None else w.to(c["dtype"])
    lf = None if lf is None else lf.to(c["dtype"])
    return q, k, v, w, mask, lf


def _run(c, q, k, v, w, mask, lf):
    kw = {"kernel": c["kernel"], "window": c["window"], "sinks": c["sinks"], "linear_factor": lf}
    if c["path"] != "recurrent":
        causal = c["path"] == "causal"
        return linattn.favor_attention(q, k, v, w, causal=causal, key_padding_mask=mask, **kw)
    outs, state, start = [], None, 0
    g = torch.Generator().manual_seed(c["seed"] + 1)
    while start < q.shape[-2]:
        n = int(torch.randint(1, 4, (), generator=g))
        sl = slice(start, start + n)
        o, state = linattn.favor_recurrent(
            q[..., sl, :], k[..., sl, :], v[..., sl, :], w,
            state=state, key_padding_mask=mask[:, sl], **kw,
        )  # fmt: skip
        outs.append(o)
        start += n
    return torch.cat(outs, dim=-2)


def _structure(c, mask):
    """``visible, exact: (B, 1, L, L)`` bool: the keys each row sees (unpadded, causal
    ones when causal) and those of them scored exactly (window or sink)."""
    n = c["length"]
    causal = c["path"] != "bidirectional"
    visible = (~mask)[:, None, None, :].expand(-1, 1, n, n)
    if causal:
        visible = visible & torch.ones(n, n, dtype=torch.bool).tril()
    near = torch.zeros(n, n, dtype=torch.bool)
    if c["window"] is not None:
        near = window_mask(n, n, c["window"], causal)
    near = near | sink_mask(mask, n, c["sinks"])[:, None, None, :]
    return visible, visible & near


def _oracle(c, q, k, v, w, mask, lf):
    """The hybrid's output in float64 from logits: ``scale q.k`` near, ``ln lf + ln
    phi_q.phi_k`` far (from the stabilized features: ``phi = c F exp(r)``), so no weight
    overflows or underflows before the row's maximum is taken out. Signed far weights
    (trigonometric features) keep their sign."""
    q, k, v = (t.double() for t in (q, k, v))
    w = None if w is None else w.double()
    fm = get_feature_map(c["kernel"])
    scale = q.shape[-1] ** -0.5
    params = fm.prepare(w, q, k, mask, scale)
    fq, rq = fm.stabilized_query(q, params)
    fk, rk = fm.stabilized(k, params, is_query=False)
    lc = fm.log_const(params)
    lc = lc[..., None, None] if isinstance(lc, torch.Tensor) else lc
    kern = fq @ fk.transpose(-2, -1)
    far_log = rq[..., :, None] + rk[..., None, :] + 2 * lc + torch.log(kern.abs())
    if lf is not None:
        far_log = far_log + math.log(float(lf))
    visible, exact = _structure(c, mask)
    logit = torch.where(exact, scale * (q @ k.transpose(-2, -1)), far_log)
    sign = torch.where(exact, 1.0, torch.sign(kern))
    logit = logit.masked_fill(~visible | (sign == 0), -math.inf)
    top = logit.amax(-1, keepdim=True)
    weight = sign * torch.exp(logit - torch.where(torch.isfinite(top), top, 0.0))
    den = weight.sum(-1, keepdim=True)
    return torch.where(den != 0, (weight @ v) / torch.where(den != 0, den, 1.0), 0.0)


@pytest.mark.parametrize("magnitude", MAGNITUDES)
@pytest.mark.parametrize("kernel,path", PAIRS)
def test_rows_with_only_exact_keys_are_softmax_at_any_magnitude(kernel, path, magnitude):
    kw = dict(kernel=kernel, path=path, magnitude=magnitude)

    @SETTINGS
    @given(cases(dtype=torch.float32, **kw))
    def check(c):
        _check_only_exact_rows(c)

    check()


def _check_only_exact_rows(c):
    q, k, v, w, mask, lf = _inputs(c)
    out = _run(c, q, k, v, w, mask, lf)
    visible, exact = _structure(c, mask)
    only_exact = (visible == exact).all(-1) & visible.any(-1)  # [B, 1, L]
    scores = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(c["d"])
    ref = torch.softmax(scores.masked_fill(~exact, -math.inf), dim=-1).nan_to_num() @ v.double()
    rows = only_exact.expand(-1, c["h"], -1)
    assert torch.isfinite(out).all()
    # float32 scores of size 1e4 carry absolute errors of about 1e4 * 6e-8 each.
    tol = 1e-5 + 2e-6 * c["magnitude"]
    torch.testing.assert_close(out[rows].double(), ref[rows], rtol=tol, atol=tol)


@pytest.mark.parametrize("magnitude", MAGNITUDES)
@pytest.mark.parametrize("kernel,path", PAIRS)
def test_every_row_equals_the_log_domain_oracle(kernel, path, magnitude):
    kw = dict(kernel=kernel, path=path, magnitude=magnitude)

    @SETTINGS
    @given(cases(dtype=torch.float64, **kw))
    def check(c):
        _check_oracle(c)

    check()


def _check_oracle(c):
    q, k, v, w, mask, lf = _inputs(c)
    out = _run(c, q, k, v, w, mask, lf)
    ref = _oracle(c, q, k, v, w, mask, lf)
    torch.testing.assert_close(out, ref, rtol=1e-7, atol=1e-7)
