"""The same ops on CUDA against the CPU float64 oracle (skipped without a GPU)."""

import pytest
import torch

import linattn
from conftest import naive, projection, randn

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

KERNELS = ["softmax", "softmax_hyp", "softmax_opt", "softmax_trig", "relu", "elu"]


# FAVOR++ is bidirectional only (its causal error is in test_errors).
@pytest.mark.parametrize(
    "kernel,causal",
    [(k, False) for k in KERNELS] + [(k, True) for k in KERNELS if k != "softmax_opt"],
    ids=lambda x: x if isinstance(x, str) else ("causal" if x else "bidir"),
)
def test_cuda_matches_oracle_with_grads(kernel, causal):
    q, k, v = (randn(2, 3, 130, 8, seed=s) for s in range(3))
    w = projection(16, 8)
    mask = torch.arange(130)[None].expand(2, -1) >= torch.tensor([[130], [77]])
    ins = [t.cuda().requires_grad_() for t in (q, k, v)]
    out = linattn.favor_attention(
        *ins,
        w.cuda(),
        kernel=kernel,
        causal=causal,
        key_padding_mask=mask.cuda(),
        chunk_size=32,
        block_size=40,
    )
    assert out.device.type == "cuda"
    ref_ins = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = naive(*ref_ins, w, kernel=kernel, causal=causal, mask=mask)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-9, atol=1e-9)
    g = randn(*out.shape, seed=7)
    grads = torch.autograd.grad(out, ins, g.cuda())
    ref_grads = torch.autograd.grad(ref, ref_ins, g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_cuda_low_precision(dtype, causal):
    q, k, v = (randn(2, 4, 1000, 64, seed=s, dtype=torch.float32) * 3 for s in range(3))
    w = projection(128, 64, dtype=torch.float32)
    out = linattn.favor_attention(
        *(t.cuda().to(dtype) for t in (q, k, v)), w.cuda().to(dtype), causal=causal
    )
    assert out.dtype == dtype and torch.isfinite(out).all()
    rounded = linattn.favor_attention(
        *(t.to(dtype).float() for t in (q, k, v)), w.to(dtype).float(), causal=causal
    )
    # float32 accumulation on the GPU (TF32 off by default for matmuls in torch)
    tol = max(torch.finfo(dtype).eps, 1e-4)
    torch.testing.assert_close(out.float().cpu(), rounded, rtol=tol, atol=tol)


def test_cuda_projection_and_recurrent():
    g = torch.Generator(device="cuda").manual_seed(0)
    w = linattn.draw_projection(32, 16, generator=g)
    assert w.device.type == "cuda"
    q, k, v = (randn(1, 2, 20, 16, seed=s, dtype=torch.float32).cuda() for s in range(3))
    par = linattn.favor_attention(q, k, v, w, causal=True)
    state, outs = None, []
    for t in range(20):
        o, state = linattn.favor_recurrent(
            q[..., t : t + 1, :], k[..., t : t + 1, :], v[..., t : t + 1, :], w, state=state
        )
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, -2), par, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["favor", "softmax", "linformer"])
def test_cuda_models_match_cpu(attention):
    from linattn.models import CausalLM, ModelConfig, SequenceClassifier

    torch.manual_seed(0)
    if attention == "linformer":
        cfg = ModelConfig(
            vocab_size=50,
            dim=32,
            depth=2,
            heads=4,
            attention=attention,
            num_classes=3,
            max_seq_len=64,
            proj_dim=16,
            position="learned",
            linformer_sharing="layerwise",
        )
        model = SequenceClassifier(cfg).double().eval()
    else:
        cfg = ModelConfig(
            vocab_size=50,
            dim=32,
            depth=2,
            heads=4,
            attention=attention,
            causal=True,
            max_seq_len=64,
        )
        model = CausalLM(cfg).double().eval()
    ids = torch.randint(0, 50, (2, 30))
    ref = model(ids)
    gpu = model.cuda()
    torch.testing.assert_close(gpu(ids.cuda()).cpu(), ref, rtol=1e-9, atol=1e-9)
    if attention != "linformer":
        out = gpu.generate(ids[:, :5].cuda(), 8, greedy=True)
        assert torch.equal(out.cpu(), model.cpu().generate(ids[:, :5], 8, greedy=True))


def test_cuda_performer_redraw_on_device():
    m = linattn.PerformerAttention(16, 4, redraw_interval=1, batch_first=True).cuda()
    ref = linattn.PerformerAttention(16, 4, redraw_interval=1, batch_first=True)
    x = torch.randn(1, 5, 16)
    m(x.cuda())
    ref(x)
    assert m.projection.device.type == "cuda"
    torch.testing.assert_close(m.projection.cpu(), ref.projection)
