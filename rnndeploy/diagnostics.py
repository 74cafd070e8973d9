"""Gradient flow through time: how much of the gradient of a loss at the last step reaches each earlier state.

`gradient_flow` measures, for one batch, ``||dL/dh_t||`` for every time step ``t`` and every layer of a
`SequenceModel`, where ``L`` is the model's loss on its output at the last step only.
For ``t < T - 1`` that gradient arrives through the recurrence alone, so its fall with distance is the
vanishing gradient BPTT suffers in a plain RNN. For the Elman cell the largest singular value of ``W_hh`` is
reported too: with a tanh (slope <= 1) it bounds the factor by which the gradient can grow per step.

`write_report` draws ``log ||dL/dh_t||`` against ``t`` (one line per model and layer) and writes the
numbers as JSON; ``rnndeploy train --grad-report`` calls it after training (files next to the checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rnndeploy import kernels
from rnndeploy.models import SequenceModel


@dataclass
class GradientFlow:
    """What `gradient_flow` measured on one batch.

    Attributes:
        label: the model's name in plots.
        cell: ``"rnn"``, ``"lstm"`` or ``"gru"`` (``nonlinearity`` for ``"rnn"``).
        steps: ``T``, the length of the batch; the loss is on the output at step ``T - 1``.
        batch: sequences in the batch.
        loss: the mean loss at the last step.
        h_norm: ``[num_layers][T]``: mean over the batch of ``||dl_b/dh_t||_2``, ``l_b`` the loss of sequence b.
        c_norm: the same for the LSTM cell state ``c_t``; ``None`` for other cells.
        w_hh_sigma_max: per layer, the largest singular value of ``W_hh`` (Elman cell only, else ``None``).
    """

    label: str
    cell: str
    nonlinearity: str
    steps: int
    batch: int
    loss: float
    h_norm: list[list[float]]
    c_norm: list[list[float]] | None
    w_hh_sigma_max: list[float] | None

    def decay_per_step(self, layer: int = -1, first: int = 0, last: int | None = None) -> float:
        """Geometric-mean factor by which ``||dL/dh_t||`` changes per step back in time, over ``[first, last)``.

        Below 1: the gradient vanishes with distance; above 1: it grows. ``inf``/``0`` where a norm is zero.
        """
        norms = self.h_norm[layer][first:last]
        if len(norms) < 2:
            raise ValueError(f"decay_per_step needs at least 2 steps in [{first}, {last}), got {len(norms)}")
        if norms[0] <= 0 or norms[-1] <= 0:
            return 0.0 if norms[0] <= 0 else math.inf
        return (norms[0] / norms[-1]) ** (1 / (len(norms) - 1))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def gradient_flow(model: SequenceModel, x: Tensor, target: Tensor, label: str | None = None) -> GradientFlow:
    """Measures ``||dL/dh_t||`` for every step and layer of ``model`` on one batch.

    The recurrent stack is recomputed one step at a time with the plain-torch reference cells
    (``rnndeploy.kernels.reference_layer``) and the model's own weights, so every ``h_t`` is a tensor whose
    gradient can be read; dropout is not applied. The model's parameters and their ``.grad`` are unchanged.

    Args:
        model: a unidirectional `SequenceModel` (any task, cell, layer count and backend).
        x: ``[B, T]`` token ids or ``[B, T, F]`` features.
        target: the target of the output at the last step: ``[B]`` class ids (``"lm"``, ``"classification"``)
            or ``[B, output_size]`` values (``"regression"``).
        label: name for plots (default: the cell, e.g. ``"LSTM 32"``).

    Returns:
        A `GradientFlow`; ``h_norm[layer][t]`` is the mean over the batch of the norm of the gradient of
        each sequence's own loss with respect to its ``h_t``.
    """
    config = model.config
    if config.bidirectional:
        raise ValueError(
            "gradient_flow needs a unidirectional model: a bidirectional one has no single last step"
        )
    if x.dim() < 2 or x.shape[1] < 1:
        raise ValueError(
            f"x must be [B, T] token ids or [B, T, F] features with T >= 1, got {tuple(x.shape)}"
        )
    B, T = x.shape[0], x.shape[1]
    rnn = model.rnn
    inputs = model.encoder(x).transpose(0, 1)  # [T, B, E]
    hs: list[list[Tensor]] = []
    cs: list[list[Tensor]] = []
    for layer in range(config.num_layers):
        weights = rnn._layer_weights(layer, 0)
        state = tuple(
            torch.zeros(B, config.hidden_size, dtype=inputs.dtype, device=inputs.device)
            for _ in config.state_names
        )
        h_layer, c_layer = [], []
        for t in range(T):
            _, state = kernels.reference_layer(
                config.cell, inputs[t : t + 1], state, weights, nonlinearity=rnn.nonlinearity_name
            )
            h_layer.append(state[0])
            if config.cell == "lstm":
                c_layer.append(state[1])
        hs.append(h_layer)
        cs.append(c_layer)
        inputs = torch.stack(h_layer)  # [T, B, H]: the next layer's input
    y_last = model._activate(model.head(hs[-1][-1]))
    loss = model.loss(y_last.float(), target)
    watched = [h for layer in hs for h in layer] + [c for layer in cs for c in layer]
    # NOTE: the losses are summed over the batch so that each row's gradient is that of its own loss.
    grads = torch.autograd.grad(loss * B, watched, allow_unused=True)
    norms = [0.0 if g is None else g.float().norm(dim=-1).mean().item() for g in grads]
    h_norm = [norms[i * T : (i + 1) * T] for i in range(config.num_layers)]
    c_flat = norms[config.num_layers * T :]
    c_norm = [c_flat[i * T : (i + 1) * T] for i in range(config.num_layers)] if c_flat else None
    sigma = None
    if config.cell == "rnn":
        sigma = [
            torch.linalg.matrix_norm(rnn._layer_weights(layer, 0)[1].detach().float(), ord=2).item()
            for layer in range(config.num_layers)
        ]
    return GradientFlow(
        label=label or f"{config.cell.upper()} {config.hidden_size}",
        cell=config.cell,
        nonlinearity=config.nonlinearity if config.cell == "rnn" else "",
        steps=T,
        batch=B,
        loss=loss.item(),
        h_norm=h_norm,
        c_norm=c_norm,
        w_hh_sigma_max=sigma,
    )


def report_paths(out: str | Path) -> tuple[Path, Path]:
    """The PNG and JSON that ``rnndeploy train --grad-report`` writes next to checkpoint ``out``."""
    out = Path(out)
    return out.with_name(out.stem + ".grad.png"), out.with_name(out.stem + ".grad.json")


def plot_gradient_flow(ax, flows: Sequence[GradientFlow]) -> None:
    """Draws ``||dL/dh_t||`` (log scale) against ``t`` on matplotlib ``ax``, one line per model and layer."""
    for flow in flows:
        for layer, norms in enumerate(flow.h_norm):
            label = flow.label if len(flow.h_norm) == 1 else f"{flow.label} layer {layer}"
            if flow.w_hh_sigma_max is not None:
                label += f" (sigma_max(W_hh) {flow.w_hh_sigma_max[layer]:.2f})"
            positive = [(t, n) for t, n in enumerate(norms) if n > 0]
            ax.plot([p[0] for p in positive], [p[1] for p in positive], label=label)
    ax.set_yscale("log")
    ax.set_xlabel("time step t (the loss is on the output at the last step)")
    ax.set_ylabel("mean ||dL/dh_t||")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)


def write_json(
    flows: Sequence[GradientFlow], path: str | Path, title: str, extra: dict | None = None
) -> None:
    """Writes the numbers of ``flows`` (with the torch version and the commit) to ``path`` as JSON."""
    from rnndeploy.checkpoint import atomic_write
    from rnndeploy.provenance import git_commit

    doc = {
        "title": title,
        "torch": torch.__version__,
        "commit": git_commit(),
        **(extra or {}),
        "flows": [f.to_dict() for f in flows],
    }
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1), encoding="utf-8"))


def write_report(
    flows: Sequence[GradientFlow],
    png: str | Path,
    json_path: str | Path,
    title: str,
    extra: dict | None = None,
) -> None:
    """Writes the plot of ``flows`` to ``png`` and their numbers to ``json_path`` (`write_json`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from rnndeploy.checkpoint import atomic_write

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    plot_gradient_flow(ax, flows)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    atomic_write(Path(png), lambda tmp: fig.savefig(tmp, format="png"))
    write_json(flows, json_path, title, extra)


def grad_report(
    model: SequenceModel, x: Tensor, target: Tensor, out: str | Path, title: str
) -> tuple[Path, Path]:
    """`gradient_flow` of ``model`` on one batch, written as `report_paths` (``out``: a checkpoint)."""
    png, json_path = report_paths(out)
    flow = gradient_flow(model, x, target)
    extra = {"model": json.loads(model.config.to_json()), "decay_per_step": flow.decay_per_step()}
    write_report([flow], png, json_path, title, extra)
    return png, json_path
