"""Validation: the loss on the validation split, the metric a person reads, and the ``eval`` record."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from rnndeploy.data import Dataset
from rnndeploy.models import SequenceModel
from rnndeploy.training.step import autocast


def metric_of(data: Dataset) -> str:
    """The metric a run on ``data`` reports: bits per character on text, mean squared error on a series."""
    return "bpc" if data.kind == "text" else "mse"


def metric_value(metric: str, loss: float) -> float:
    """``loss`` (nats per token, or mean squared error) in ``metric``'s unit."""
    return loss / math.log(2) if metric == "bpc" else loss


@torch.no_grad()
def evaluate(
    model: SequenceModel, data: Tensor, seq_len: int, num_streams: int, amp: str | None = None
) -> float:
    """Mean per-step loss of ``model`` on a split (``[N]`` ids or ``[N, F]`` features).

    The split is cut into at most ``num_streams`` contiguous streams read in ``seq_len`` chunks with the state
    carried, as in training. Returns nats per token (language model) or the mean squared error.
    """
    device = model.head.weight.device
    streams = max(1, min(num_streams, (len(data) - 1) // (seq_len + 1)))
    length = len(data) // streams
    split = data[: streams * length].reshape(streams, length, *data.shape[1:]).to(device)
    was_training = model.training
    model.eval()
    total, count, state = 0.0, 0, None
    for start in range(0, length - 1, seq_len):
        end = min(start + seq_len, length - 1)
        with autocast(amp, device):
            y, state = model(split[:, start:end], state)
        n = streams * (end - start)
        total += model.loss(y.float(), split[:, start + 1 : end + 1]).item() * n
        count += n
    model.train(was_training)
    return total / count


def eval_record(
    step: int, metric: str, valid_loss: float, train_loss: float | None, tokens_per_s: float | None
) -> dict[str, Any]:
    """The eval record of ``step``: the validation loss, and the training loss since the last one."""
    record: dict[str, Any] = {"event": "eval", "step": step, "valid_loss": valid_loss}
    record[f"valid_{metric}"] = metric_value(metric, valid_loss)
    if train_loss is not None:
        record.update(train_loss=train_loss, tokens_per_s=tokens_per_s)
        record[f"train_{metric}"] = metric_value(metric, train_loss)
    return record
