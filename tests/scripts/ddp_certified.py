"""Run under torchrun (2 CPU ranks, gloo) or alone: certified optimizers on a DDP-wrapped decoder.

Each rank takes its shard of the same global batch; DDP averages the gradients, so every rank clips
the global-batch gradient and adds the same seeded noise. Writes the final parameters to argv[1]
(rank 0; rank r > 0 writes argv[1] + f".rank{r}").
"""
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from pyunlearn.losses import masked_cross_entropy
from pyunlearn.models import Decoder
from pyunlearn.optim import GradientClipping, ModelClipping

out, operator, sigma, steps = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
distributed = "RANK" in os.environ
if distributed:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
torch.set_num_threads(1)
torch.manual_seed(0)
decoder = Decoder((4, 8), width=4, num_classes=1).double()
model = DDP(decoder) if distributed else decoder
gen = torch.Generator().manual_seed(1)
features = (torch.randn(8, 4, 8, 8, generator=gen, dtype=torch.float64),
            torch.randn(8, 8, 4, 4, generator=gen, dtype=torch.float64))
target = torch.randint(0, 2, (8, 8, 8), generator=gen)
mask = torch.rand(8, 8, 8, generator=gen) < 0.7
shard = slice(rank * 8 // world, (rank + 1) * 8 // world)
if operator == "gradient_clipping":
    opt = GradientClipping(decoder.named_parameters(), lr=0.1, c0=5.0, c1=0.5, weight_decay=0.5, sigma=sigma,
                           delta=1e-5, steps=steps, seed=None if sigma and os.environ.get("SECURE") else 7)
else:
    opt = ModelClipping(decoder.named_parameters(), lr=0.1, c2=5.0, sigma=sigma, delta=1e-5, steps=steps,
                        seed=None if sigma and os.environ.get("SECURE") else 7)
for _ in range(steps):
    logits = model(tuple(f[shard] for f in features))
    loss = masked_cross_entropy(logits, target[shard], mask[shard])  # mean over this rank's samples
    opt.zero_grad()
    loss.backward()
    opt.step()
torch.save({k: v.detach().clone() for k, v in decoder.state_dict().items()},
           out if rank == 0 else f"{out}.rank{rank}")
if distributed:
    dist.barrier()  # every rank done before any leaves (an early exit can abort the others)
    dist.destroy_process_group()
