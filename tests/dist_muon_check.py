"""Run under torchrun (2 processes, gloo): distributed Muon must equal the single-process update."""

import torch
import torch.distributed as dist

from blueberry.optimizers import Muon
from blueberry.training.distributed import exit_process, init_distributed, teardown

ctx = init_distributed("cpu")
torch.manual_seed(0)  # same parameters and gradients on every rank, as after DDP's all-reduce
shapes = [(16, 8), (16, 8), (8, 24), (3, 12, 8), (16, 8)]
params_a = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
params_b = [torch.nn.Parameter(p.detach().clone()) for p in params_a]
local = Muon(params_a, lr=0.05, weight_decay=0.1)
shared = Muon(params_b, lr=0.05, weight_decay=0.1, distributed=True)
for _ in range(3):
    grads = [torch.randn(*s) for s in shapes]
    for p, q, g in zip(params_a, params_b, grads):
        p.grad, q.grad = g.clone(), g.clone()
    local.step()
    shared.step()
for p, q in zip(params_a, params_b):
    assert torch.equal(p, q), (p - q).abs().max()
if dist.get_rank() == 0:
    print("DIST_MUON_OK")
teardown(ctx)
exit_process(0)
