"""What the kernels' autograd Functions share: their backward is first-order only, and says so when differentiated;
the previous states and the gradients that are plain matmuls over all steps.

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


def previous_states(y: Tensor, h0: Tensor, lengths: Tensor | None, reverse: bool) -> Tensor:
    """``h_{t-1}`` for every step ``t`` in processing order, ``[T, B, H]``, rebuilt from the outputs ``y``.

    Steps past a row's length get any value: their gate gradients are zero.
    """
    h0 = h0.to(y.dtype)[None]
    if not reverse:
        return torch.cat([h0, y[:-1]])
    hp = torch.cat([y[1:], h0])
    if lengths is not None:
        first = torch.arange(y.shape[0], device=y.device)[:, None] == (lengths - 1)[None, :]  # [T, B]
        hp = torch.where(first[..., None], h0, hp)
    return hp


def projection_grads(ctx, dg_in: Tensor, dg_hh: Tensor, x: Tensor, hp: Tensor | None, w_ih: Tensor, k: int):
    """The gradients that are plain matmuls over all steps at once, given the gate gradients.

    ``dg_in [T, B, G*H]`` reaches ``x``, ``W_ih``, ``b_ih``; ``dg_hh`` reaches ``W_hh`` (through ``hp``, the
    previous states ``[T, B, H]``) and ``b_hh``. ``k`` is the index of ``w_ih`` among the Function's inputs.
    Returns ``dx, dw_ih, dw_hh, db_ih, db_hh`` (``None`` where no gradient is needed).
    """
    need = ctx.needs_input_grad
    T, B = x.shape[0], x.shape[1]
    g_in = dg_in.reshape(T * B, -1)
    g_hh = dg_hh.reshape(T * B, -1)
    dx = (g_in @ w_ih).view(T, B, -1) if need[0] else None
    dw_ih = g_in.t() @ x.reshape(T * B, -1) if need[k] else None
    dw_hh = g_hh.t() @ hp.reshape(T * B, -1) if need[k + 1] else None
    db_ih = g_in.sum(0) if ctx.has_bias and need[k + 2] else None
    db_hh = g_hh.sum(0) if ctx.has_bias and need[k + 3] else None
    return dx, dw_ih, dw_hh, db_ih, db_hh
