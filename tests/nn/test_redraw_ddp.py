"""FAVOR+ redraws under DDP (2 processes, gloo, CPU): after several redraws every rank
holds identical projections and parameters, with no communication for the draws."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from linattn.models import CausalLM, ModelConfig

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=30,
        dim=32,
        depth=2,
        heads=4,
        causal=True,
        attention="favor",
        redraw_interval=2,
        max_seq_len=64,
    )
    model = CausalLM(cfg)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(10 + rank)
    for _ in range(5):
        ids = torch.randint(0, 30, (4, 24), generator=g)
        logits = ddp(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 30), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    layers = model.encoder.performer_layers()
    torch.save(
        {
            "params": torch.cat([p.detach().flatten() for p in model.parameters()]),
            "projections": torch.stack([m.projection for m in layers]),
            "draws": [int(m.draws) for m in layers],
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


def test_redraws_identical_across_ranks(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["draws"] == r1["draws"] == [2, 2]
    assert torch.equal(r0["projections"], r1["projections"])
    assert torch.equal(r0["params"], r1["params"])
    # Layers draw different projections.
    assert not torch.equal(r0["projections"][0], r0["projections"][1])
