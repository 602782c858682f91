"""Traces a call of pyunlearn::masked_cross_entropy the way torch.compile's
AOTAutograd does (functionalization over fake tensors) and prints the graph.

Runs without a GPU: the tensors are fake CUDA tensors and ``torch.cuda.is_available`` is patched so that
the automatic backend choice for CUDA is Triton (no kernel is launched). TRITON_INTERPRET must be unset,
since interpreted kernels are not traceable.
"""
import sys

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx

import pyunlearn.ops as ops

torch.cuda.is_available = lambda: True


def loss_and_grad(logits, target, mask):
    # Forward only: a CPU build of torch cannot attach autograd metadata to (fake) CUDA tensors.
    loss, grad = ops.masked_cross_entropy_fwd_bwd(logits, target, mask)
    return loss.sum(), grad


def main() -> None:
    k = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    with FakeTensorMode():
        logits = torch.empty(2, k, 37, device="cuda")
        target = torch.zeros(2, 37, dtype=torch.long, device="cuda")
        mask = torch.ones(2, 37, dtype=torch.bool, device="cuda")
    graph = make_fx(dispatch_functionalize(loss_and_grad), tracing_mode="fake")(logits, target, mask)
    print(graph.code)


if __name__ == "__main__":
    main()
