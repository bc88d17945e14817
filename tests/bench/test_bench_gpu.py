"""``linattn bench --suite gpu``: argument handling, the refusal without a GPU, the FLOP
model and the ratio table. The timed measurements need CUDA and run through
``linattn bench --suite gpu``, not here."""

import pytest
import torch

from linattn.bench import gpu
from linattn.cli import main

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on CPU")


@no_cuda
def test_cli_refuses_without_cuda(tmp_path, capsys):
    out = tmp_path / "gpu"
    assert main(["bench", "--suite", "gpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err
    assert not out.exists()


@no_cuda
def test_run_refuses_without_cuda(tmp_path):
    with pytest.raises(gpu.GpuBenchError, match="CUDA"):
        gpu.run(tmp_path)


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset"):
        gpu.run("unused", preset="huge")


def test_cli_rejects_bad_suite_arguments(capsys):
    assert main(["bench", "--suite", "gpu", "--passes", "bwd"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_full_grid_is_the_issues():
    rows = gpu.cases("full")
    assert {r["batch"] for r in rows} == {1, 8}
    assert {r["head_dim"] for r in rows} == {64, 128}
    assert {r["num_features"] for r in rows if r["method"] == "triton"} == {128, 256}
    assert {r["length"] for r in rows} == {4096 * 2**i for i in range(6)}
    assert {r["heads"] for r in rows} == {16} and {r["dtype"] for r in rows} == {"bfloat16"}
    # fla's chunk_linear_attn is causal only; exact attention does not depend on m.
    assert all(r["causal"] for r in rows if r["method"] == "fla")
    flash = [r for r in rows if r["method"] == "flash"]
    assert len(flash) == len(
        {(r["batch"], r["head_dim"], r["length"], r["causal"], r["pass"]) for r in flash}
    )


def test_overrides():
    rows = gpu.cases(
        "quick", lengths=[1024], passes=("fwd",), repeats=2, methods=("flash", "triton")
    )
    assert {r["length"] for r in rows} == {1024}
    assert {r["pass"] for r in rows} == {"fwd"}
    assert {r["repeats"] for r in rows} == {2}
    assert {r["method"] for r in rows} == {"flash", "triton"}


def test_flop_model():
    args = dict(b=1, h=16, length=4096, d=128, m=256)
    full = gpu.flops("flash", False, "fwd", **args)
    assert gpu.flops("flash", True, "fwd", **args) == full / 2
    assert gpu.flops("flash", False, "fwd+bwd", **args) == 3.5 * full
    favor = gpu.flops("triton", False, "fwd", **args)
    assert favor == 8.0 * 4096 * 256 * 128 * 16
    assert gpu.flops("fla", True, "fwd", **args) < gpu.flops("triton", True, "fwd", **args)


def _row(method, ms, causal=True, m=256):
    return {
        "method": method,
        "causal": causal,
        "pass": "fwd+bwd",
        "batch": 1,
        "heads": 16,
        "length": 4096,
        "head_dim": 128,
        "num_features": m,
        "median_ms": ms,
        "peak_bytes": 2**20,
        "tflops": 1.0,
        "pct_peak": 1.0,
    }


def test_ratios_table_and_plot(tmp_path):
    rows = [
        _row("flash", 10.0),
        _row("triton", 2.0),
        _row("eager", 8.0),
        _row("fla", 3.0),
        {**_row("triton", 1.0), "median_ms": None, "error": "out of memory"},
    ]
    del rows[-1]["median_ms"]
    gpu._add_ratios(rows)
    assert rows[1]["speedup_vs_flash"] == 5.0
    assert rows[1]["speedup_vs_fla"] == 1.5
    assert rows[1]["speedup_vs_eager"] == 4.0
    result = {
        "machine": {"gpu": "test", "sms": 1, "torch": "x", "triton": "y", "fla": None},
        "matmul_bf16_tflops": 100.0,
        "results": rows,
    }
    table = gpu.format_table(result)
    assert "5.0x" in table and "failed: out of memory" in table
    gpu.plot(result, tmp_path / "gpu.png")
    assert (tmp_path / "gpu.png").stat().st_size > 0
