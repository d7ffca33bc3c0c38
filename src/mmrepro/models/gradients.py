"""Autograd helpers that change a gradient without changing the forward value."""

from __future__ import annotations

import torch


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; the gradient passing back through it is multiplied by ``scale``.

    AGM scales each modality's contribution this way; MMA uses it to train its adapters as if
    their output scale were 1.
    """
    return _ScaleGrad.apply(x, float(scale))
