"""Explicit fast-path dispatch (issue 27 step 3): a FavorCall dataclass, each backend's
not_supported_reasons, the first with none runs; LINATTN_LOG_DISPATCH=1 logs the path."""

import inspect
import logging

import pytest
import torch

import linattn
from conftest import projection, randn
from linattn import _dispatch, _favor_checks, functional
from linattn.ops.favor import triton as ftriton

Q = randn(1, 2, 8, 4)
W = projection(8, 4)


def _path(caplog, monkeypatch, fn):
    monkeypatch.setenv("LINATTN_LOG_DISPATCH", "1")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="linattn.dispatch"):
        fn()
    lines = [r.getMessage() for r in caplog.records if r.name == "linattn.dispatch"]
    assert lines, "nothing logged"
    return lines


@pytest.mark.parametrize(
    "kw,path",
    [
        ({}, "eager-bidirectional"),
        ({"causal": True}, "eager-causal"),
        ({"causal": True, "window": 2}, "eager-hybrid"),
        ({"sinks": 1}, "eager-hybrid"),
        ({"causal": True, "output_final_state": True}, "stateful"),
        ({"cu_seqlens": torch.tensor([0, 3, 8], dtype=torch.int32)}, "packed"),
    ],
    ids=["bidir", "causal", "window", "sinks", "stateful", "packed"],
)
def test_log_names_the_path_and_why_not_the_others(caplog, monkeypatch, kw, path):
    lines = _path(caplog, monkeypatch, lambda: linattn.favor_attention(Q, Q, Q, W, **kw))
    assert lines[0].startswith(f"favor_attention ran {path}")
    if path.startswith("eager"):
        # The Triton backend was asked first, and says why not (CPU tensors, float64).
        assert "triton: " in lines[0] and "dtype torch.float64" in lines[0]
    if path == "packed":
        # Each sequence then runs through the dispatch on its own.
        assert len(lines) == 3 and all("ran eager-bidirectional" in x for x in lines[1:])


def test_no_log_without_the_variable(caplog, monkeypatch):
    monkeypatch.delenv("LINATTN_LOG_DISPATCH", raising=False)
    with caplog.at_level(logging.INFO, logger="linattn.dispatch"):
        linattn.favor_attention(Q, Q, Q, W)
    assert not [r for r in caplog.records if r.name == "linattn.dispatch"]


@pytest.mark.skipif(not ftriton.available(), reason="needs triton")
def test_interpreter_triton_path_is_logged(caplog, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the interpreter check is for CPU machines")
    q, w = Q.float(), W.float()
    with ftriton.interpret_on_cpu():
        lines = _path(caplog, monkeypatch, lambda: linattn.favor_attention(q, q, q, w))
        assert (
            lines[0] == "favor_attention ran triton (skipped packed: no cu_seqlens; "
            "stateful: no initial_state or output_final_state)"
        )
        lines = _path(caplog, monkeypatch, lambda: linattn.favor_attention(q, q, q, w, window=2))
        assert lines[0].startswith("favor_attention ran eager-hybrid")
        assert "triton: window is set" in lines[0]


def test_call_fields_are_the_signature():
    # The call is described by name: every argument of favor_attention is a field (and
    # nothing else is), so no local variable of the function can reach a backend.
    params = list(inspect.signature(linattn.favor_attention).parameters)
    fields = [f.name for f in _dispatch.fields(_dispatch.FavorCall)]
    assert params == fields
    assert "locals()" not in inspect.getsource(functional)


def test_unrelated_locals_do_not_change_the_path(caplog, monkeypatch):
    # favor_attention recompiled with unrelated local variables at the top of its body
    # (names a backend might read: the old maybe_favor_triton(**locals()) passed every
    # local on) runs the same path as the real one.
    import ast
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(functional.favor_attention)))
    fn = tree.body[0]
    extra = ast.parse(
        "backend = 'triton'\nreasons = ['x']\nuse_triton = True\nstate = object()\n"
        "chunk = 1\ngrouped = False"
    ).body
    fn.body[1:1] = extra  # after the docstring
    fn.decorator_list = []
    scope = dict(vars(functional))
    exec(compile(ast.fix_missing_locations(tree), functional.__file__, "exec"), scope)
    patched = scope["favor_attention"]
    for kw in ({}, {"causal": True}, {"causal": True, "window": 2}, {"window": 2, "sinks": 1}):
        plain = _path(caplog, monkeypatch, lambda kw=kw: linattn.favor_attention(Q, Q, Q, W, **kw))
        moved = _path(caplog, monkeypatch, lambda kw=kw: patched(Q, Q, Q, W, **kw))
        assert moved == plain, kw
        torch.testing.assert_close(
            patched(Q, Q, Q, W, **kw), linattn.favor_attention(Q, Q, Q, W, **kw)
        )


def test_padding_is_zeroed_once(monkeypatch):
    calls = []
    real = _favor_checks._zero_padding

    def spy(x, mask):
        calls.append(mask is not None)
        return real(x, mask)

    # Patched where it runs: _checked_inputs calls it in linattn._favor_checks.
    monkeypatch.setattr(_favor_checks, "_zero_padding", spy)
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 6:] = True
    k = Q.clone()
    k[..., 6:, :] = float("nan")
    for kw in (
        {},
        {"causal": True},
        {"causal": True, "window": 2},
        {"causal": True, "output_final_state": True},
    ):
        calls.clear()
        out = linattn.favor_attention(Q, k, k, W, key_padding_mask=mask, **kw)
        out = out[0] if isinstance(out, tuple) else out
        assert calls == [True, True], kw  # k and v, once each
        assert torch.isfinite(out).all()
    # ... and nowhere else: not again in the eager preparation, not in the Triton path.
    assert "masked_fill" not in inspect.getsource(functional._prepare)
    assert "masked_fill" not in inspect.getsource(ftriton.run)


def test_explain_without_a_backend():
    call = _dispatch.FavorCall(Q, Q, Q, W)
    never = _dispatch.Backend("never", lambda c: ["no"], lambda c: None)
    with pytest.raises(
        RuntimeError, match=r"no backend supports this favor_attention call \(never: no\)"
    ):
        _dispatch.dispatch(call, [never])
    backend, skipped = _dispatch.explain(call, functional.BACKENDS)
    assert backend.name == "eager-bidirectional"
    assert [name for name, _ in skipped] == [
        "packed",
        "stateful",
        "triton",
        "eager-hybrid",
        "eager-causal",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_dispatch_compiles_in_one_graph(monkeypatch, causal):
    # The dispatch (its logging included) must not break torch.compile(fullgraph=True).
    monkeypatch.setenv("LINATTN_LOG_DISPATCH", "1")
    torch._dynamo.reset()
    q, w = Q.float(), W.float()
    fn = torch.compile(lambda x: linattn.favor_attention(x, x, x, w, causal=causal), fullgraph=True)
    torch.testing.assert_close(fn(q), linattn.favor_attention(q, q, q, w, causal=causal))


def test_triton_dispatch_sees_sinks_only_when_set(monkeypatch):
    # The fused kernels cover sinks=0 (no sinks) and nothing else: sinks > 0 is a reason
    # against them, so the call takes the eager path.
    from linattn import functional
    from linattn.ops.favor.triton import not_supported_reasons

    seen = []

    def spy(call, backends):
        seen.append((call.sinks, "sinks is set" in not_supported_reasons(call)))
        return dispatch(call, backends)

    dispatch = functional.dispatch
    monkeypatch.setattr(functional, "dispatch", spy)
    q = randn(1, 2, 8, 4)
    w = projection(8, 4)
    linattn.favor_attention(q, q, q, w)
    linattn.favor_attention(q, q, q, w, sinks=0)
    linattn.favor_attention(q, q, q, w, sinks=2)
    assert seen == [(0, False), (0, False), (2, True)]
