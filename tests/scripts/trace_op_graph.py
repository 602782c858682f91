"""Traces a call of a pyunlearn op the way torch.compile's AOTAutograd does (functionalization over
fake tensors) and prints the graph. ``python trace_op_graph.py masked_cross_entropy|per_sample_sq_norms``.

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


def per_sample_norms(a, g):
    return ops.per_sample_sq_norms(a, g, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1)).sum()


def main() -> None:
    with FakeTensorMode():
        if sys.argv[1] == "masked_cross_entropy":
            fn, inputs = loss_and_grad, (torch.empty(2, 3, 37, device="cuda"),
                                         torch.zeros(2, 37, dtype=torch.long, device="cuda"),
                                         torch.ones(2, 37, dtype=torch.bool, device="cuda"))
        else:
            fn, inputs = per_sample_norms, (torch.empty(2, 4, 9, 9, device="cuda"),
                                            torch.empty(2, 5, 9, 9, device="cuda"))
    graph = make_fx(dispatch_functionalize(fn), tracing_mode="fake")(*inputs)
    print(graph.code)


if __name__ == "__main__":
    main()
