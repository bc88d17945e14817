"""PerformerAttention: matches the functional op, MHA call patterns, redraws, state_dict."""

import pytest
import torch
from torch import nn

import linattn
from linattn.nn import default_num_features


def _pair(**kw):
    torch.manual_seed(0)
    m = linattn.PerformerAttention(16, 4, dtype=torch.float64, batch_first=True, **kw)
    return m


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kernel", ["softmax", "softmax_hyp", "relu"])
def test_module_matches_functional(causal, kernel):
    m = _pair(causal=causal, kernel=kernel)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 6:] = True
    out, w = m(x, key_padding_mask=mask)
    assert w is None
    heads = [t.view(2, 9, 4, 4).transpose(1, 2) for t in (m.q_proj(x), m.k_proj(x), m.v_proj(x))]
    ref = linattn.favor_attention(
        *heads, m.projection, kernel=kernel, causal=causal, key_padding_mask=mask
    )
    ref = m.out_proj(ref.transpose(1, 2).reshape(2, 9, 16))
    torch.testing.assert_close(out, ref)


def test_mha_call_patterns():
    m = linattn.PerformerAttention(16, 4, kdim=6, vdim=5, batch_first=True)
    q, k, v = torch.randn(3, 7, 16), torch.randn(3, 11, 6), torch.randn(3, 11, 5)
    mask = torch.zeros(3, 11, dtype=torch.bool)
    mask[0, 8:] = True
    out, weights = m(q, k, v, key_padding_mask=mask, need_weights=False)
    assert out.shape == (3, 7, 16) and weights is None
    mtf = linattn.PerformerAttention(16, 4, kdim=6, vdim=5, batch_first=False)
    mtf.load_state_dict(m.state_dict())
    out2, _ = mtf(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), key_padding_mask=mask)
    torch.testing.assert_close(out2.transpose(0, 1), out)
    # Same parameter names and shapes as nn.MultiheadAttention's separate projections.
    assert {n for n, _ in m.named_parameters()} >= {"q_proj.weight", "out_proj.weight"}


def test_default_num_features_is_d_log_d():
    assert default_num_features(64) == 272  # 64 ln 64 = 266.2 -> 272
    assert default_num_features(32) == 112
    assert linattn.PerformerAttention(128, 2).num_features == 272


def test_redraw_deterministic_and_in_training_only():
    a = linattn.PerformerAttention(16, 4, redraw_interval=2, seed=5, layer_index=3)
    b = linattn.PerformerAttention(16, 4, redraw_interval=2, seed=5, layer_index=3)
    c = linattn.PerformerAttention(16, 4, redraw_interval=2, seed=5, layer_index=4)
    assert torch.equal(a.projection, b.projection)
    assert not torch.equal(a.projection, c.projection)
    x = torch.randn(1, 4, 16)
    first = a.projection.clone()
    a(x)
    assert torch.equal(a.projection, first)
    a(x)  # second training call: redraw
    assert not torch.equal(a.projection, first) and int(a.draws) == 1
    b.redraw_projection()
    assert torch.equal(a.projection, b.projection)
    a.eval()
    p = a.projection.clone()
    for _ in range(4):
        a(x)
    assert torch.equal(a.projection, p)
    a.train()
    a.freeze_projection()
    for _ in range(4):
        a(x)
    assert torch.equal(a.projection, p)


def test_state_dict_round_trip_after_redraw():
    a = linattn.PerformerAttention(16, 4, causal=True, rotary=True)
    a.redraw_projection()
    a.redraw_projection()
    b = linattn.PerformerAttention(16, 4, causal=True, rotary=True, seed=99)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 10, 16)
    assert torch.equal(a(x)[0], b(x)[0])
    assert int(b.draws) == 2
    b.redraw_projection()
    a.redraw_projection()
    assert torch.equal(a.projection, b.projection)


def test_to_dtype_moves_projection():
    m = linattn.PerformerAttention(16, 4, batch_first=True).to(torch.float64)
    assert m.projection.dtype == torch.float64 and m.draws.dtype == torch.long
    assert m(torch.randn(1, 3, 16, dtype=torch.float64))[0].dtype == torch.float64


def test_rotary_recurrent_equals_parallel():
    m = linattn.PerformerAttention(
        16, 4, causal=True, rotary=True, dtype=torch.float64, batch_first=True
    )
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    full = m(x)[0]
    outs, state = [], None
    for t in range(0, 13, 3):
        o, state = m.step(x[:, t : t + 3], state, t)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), full)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"embed_dim": 10, "num_heads": 4}, r"embed_dim \(10\) must be divisible by num_heads"),
        ({"kernel": "gauss"}, "kernel must be one of"),
        ({"kernel": "softmax_opt", "causal": True}, "bidirectional only"),
        ({"redraw_interval": 0}, "redraw_interval must be >= 1"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\)"),
        ({"embed_dim": 12, "num_heads": 4, "rotary": True}, "even head_dim"),
    ],
    ids=["divisible", "kernel", "opt-causal", "interval", "dropout", "rotary-odd"],
)
def test_bad_configuration(kw, match):
    args = {"embed_dim": 16, "num_heads": 4, **kw}
    with pytest.raises(ValueError, match=match):
        linattn.PerformerAttention(args.pop("embed_dim"), args.pop("num_heads"), **args)


def test_forward_errors():
    m = linattn.PerformerAttention(16, 4, batch_first=True)
    x = torch.randn(1, 3, 16)
    with pytest.raises(ValueError, match="need_weights=True is not available"):
        m(x, need_weights=True)
    with pytest.raises(ValueError, match="attn_mask is not supported"):
        m(x, attn_mask=torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"query must have shape \(batch, seq, 16\)"):
        m(torch.randn(1, 3, 8))


def test_drop_in_for_mha_in_a_model():
    # The same surrounding code works with either module.
    for attn in (
        nn.MultiheadAttention(16, 4, batch_first=True),
        linattn.PerformerAttention(16, 4, batch_first=True),
    ):
        x = torch.randn(2, 5, 16)
        out, _ = attn(
            x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool), need_weights=False
        )
        assert out.shape == (2, 5, 16)


def test_favor_options_are_the_module_and_model_defaults():
    # One place for the FAVOR+ defaults: the module's signature and ModelConfig read them.
    import dataclasses
    import inspect

    from linattn import FavorOptions, PerformerAttention
    from linattn.models import ModelConfig

    opts = FavorOptions()
    sig = inspect.signature(PerformerAttention).parameters
    model = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    for f in dataclasses.fields(FavorOptions):
        assert sig[f.name].default == getattr(opts, f.name), f.name
        if f.name in model:
            assert model[f.name] == getattr(opts, f.name), f.name
    # A module built from options reports them back.
    custom = FavorOptions(
        num_features=32,
        kernel="relu",
        window=3,
        redraw_interval=5,
        orthogonal=False,
        scaling="sqrt_d",
    )
    m = PerformerAttention(16, 2, **vars(custom))
    assert m.options() == custom


def test_favor_options_of_reads_the_named_attributes():
    from types import SimpleNamespace

    from linattn import FavorOptions

    src = SimpleNamespace(kernel="relu", window=4, sinks=2, scaling="sqrt_d", other=1)
    assert FavorOptions.of(src, "kernel", "window") == FavorOptions(kernel="relu", window=4)
    full = FavorOptions(num_features=8, kernel="relu", window=1, sinks=1, redraw_interval=3)
    assert FavorOptions.of(full) == full and FavorOptions.of(full) is not full
    with pytest.raises(AttributeError):
        FavorOptions.of(src)  # no num_features there
