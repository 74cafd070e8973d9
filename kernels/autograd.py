"""What the kernels' autograd Functions share: their backward is first-order only, and says so when differentiated.

The reverse-time kernels compute gradients with no graph of their own, as cuDNN does. Like cuDNN, a second
derivative through them (``create_graph=True``, then differentiating a gradient: gradient penalties,
Hessian-vector products) must fail loudly instead of silently dropping the kernels' share of it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _refusal(cell: str) -> str:
    return (
        f"double backward through backend='triton' ({cell}) is not supported: the kernels compute first-order "
        "gradients only, as cuDNN's do. For second derivatives (gradient penalties, Hessian-vector products) "
        "use backend='reference', or backend='torch' with cuDNN off (torch.backends.cudnn.flags(enabled=False))"
    )


class _FirstOrderGradients(torch.autograd.Function):
    """A node whose outputs are a kernel backward's gradients and whose own backward refuses."""

    @staticmethod
    def forward(ctx, cell: str, backward: Callable[[], tuple], *anchors: Tensor):
        ctx.cell = cell
        return tuple(backward())

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(_refusal(ctx.cell))


def first_order_only(cell: str, backward: Callable[[], tuple], inputs: tuple[Tensor | None, ...]) -> tuple:
    """Runs ``backward()`` (a Function's gradient computation) without recording it.

    Where the gradients are themselves being recorded (``create_graph=True``), they come out of a node that
    depends on ``inputs`` (the Function's differentiable inputs) and raises when differentiated, as
    ``torch.autograd.function.once_differentiable`` does, except that it also fires when the incoming
    gradients do not require grad (``loss = y.sum()``) and says what to use instead.
    """
    if not torch.is_grad_enabled():
        return backward()
    anchors = [t for t in inputs if t is not None and t.requires_grad]
    if not anchors:
        with torch.no_grad():
            return backward()
    return _FirstOrderGradients.apply(cell, backward, *anchors)
