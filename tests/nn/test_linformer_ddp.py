"""A model with layerwise-shared Linformer projections trains under DDP (2 processes,
gloo, CPU) without find_unused_parameters, and the ranks end with identical parameters."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import linattn

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


class TinyLinformer(nn.Module):
    def __init__(self, layers=3, embed=16, heads=4, n=32, kdim=8):
        super().__init__()
        # The model owns the one projection; each layer holds a reference.
        self.shared = linattn.LinformerProjection(
            n, kdim, heads, embed // heads, sharing="layerwise"
        )
        self.inp = nn.Linear(5, embed)
        self.layers = nn.ModuleList(
            linattn.LinformerAttention(
                embed,
                heads,
                max_seq_len=n,
                proj_dim=kdim,
                sharing="layerwise",
                shared_projection=self.shared,
                batch_first=True,
            )
            for _ in range(layers)
        )
        self.head = nn.Linear(embed, 3)

    def forward(self, x, mask):
        h = self.inp(x)
        for layer in self.layers:
            h = h + layer(h, key_padding_mask=mask)[0]
        keep = (~mask).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = TinyLinformer()
    ddp = nn.parallel.DistributedDataParallel(model)  # find_unused_parameters=False
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for _ in range(4):
        x = torch.randn(4, 32, 5, generator=g)
        mask = torch.arange(32)[None] >= torch.randint(8, 33, (4, 1), generator=g)
        y = torch.randint(0, 3, (4,), generator=g)
        loss = nn.functional.cross_entropy(ddp(x, mask), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.save(
        {"params": flat, "shared_grad": model.shared.e.grad is not None},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


def test_layerwise_sharing_trains_under_ddp(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["shared_grad"] and r1["shared_grad"]
    assert torch.equal(r0["params"], r1["params"])
    # The shared projection is one parameter, counted once.
    model = TinyLinformer()
    names = [n for n, _ in model.named_parameters() if "shared" in n or ".e" in n]
    assert names == ["shared.e"]
