"""One optimizer step, shared by `rnndeploy.train` and the long-lag benchmark (`rnndeploy.longlag`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


def autocast(amp: str | None, device: torch.device) -> contextlib.AbstractContextManager[object]:
    """The forward pass's autocast context for ``amp`` (``"bf16"`` or ``None``: none)."""
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class StepStats:
    """What one optimizer step reports (values all-reduced over the processes of a distributed run).

    Attributes:
        loss: the loss, mean over processes; grad_norm: the global gradient norm before clipping;
        stop_asked: some process asked to stop (a signal arrived there).
    """

    loss: float
    grad_norm: float
    stop_asked: bool = False


def optimizer_step(
    loss: Tensor,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    clip: float,
    *,
    world_size: int = 1,
    stop_asked: bool = False,
    on_non_finite: Callable[[float, float], None] | None = None,
) -> StepStats:
    """Backpropagates ``loss`` (a scalar), clips the global gradient norm to ``clip`` (0: no clipping) and
    updates ``model`` with ``optimizer``.

    With ``world_size`` > 1 (under ``torch.distributed``) the loss, the gradient norm and ``stop_asked`` are
    all-reduced first, so every process takes the same decisions. ``on_non_finite(loss, grad_norm)`` is called
    instead of the update when either is NaN or infinite, and is expected to raise; without it the update is
    applied regardless.
    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip or math.inf)
    # NOTE: the decisions to stop (divergence, a signal) must be the same on every rank, so they are
    # taken on all-reduced values.
    stats = torch.stack(
        [loss.detach().float(), grad_norm.detach().float(), loss.new_tensor(float(stop_asked)).float()]
    )
    if world_size > 1:
        dist.all_reduce(stats)
        stats[0] /= world_size
    loss_value, norm_value, stop_votes = stats.tolist()
    if on_non_finite is not None and not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        on_non_finite(loss_value, norm_value)
    optimizer.step()
    return StepStats(loss_value, norm_value, stop_votes > 0)
