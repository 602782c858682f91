"""DPSGD under torchrun (2 CPU ranks, gloo) or alone: each rank clips its shard of one global batch."""
import os
import sys

import torch
import torch.distributed as dist

from pyunlearn.optim.dpsgd import DPSGD
from pyunlearn.per_sample import PerSampleGradients

out, noise = sys.argv[1], float(sys.argv[2])
distributed = "RANK" in os.environ
if distributed:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1)).double()
gen = torch.Generator().manual_seed(1)
x = torch.randn(8, 3, 6, 6, generator=gen, dtype=torch.float64)
y = torch.randint(0, 2, (8, 6, 6), generator=gen)
shard = slice(rank * 8 // world, (rank + 1) * 8 // world)
opt = DPSGD(model.parameters(), lr=0.5, max_grad_norm=0.3, expected_batch_size=8, noise_multiplier=noise, seed=11)
with PerSampleGradients(model, loss_reduction="sum") as psg:
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x[shard]), y[shard], reduction="none").mean((1, 2)).sum()
        loss.backward()
        psg.clipped_sum_(0.3)
        opt.step()
        psg.clear()
torch.save({k: v.detach().clone() for k, v in model.state_dict().items()},
           out if rank == 0 else f"{out}.rank{rank}")
if distributed:
    dist.barrier()  # every rank done before any leaves (an early exit can abort the others)
    dist.destroy_process_group()
