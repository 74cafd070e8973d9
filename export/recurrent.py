"""Recurrent layers as standard ONNX ``RNN`` / ``LSTM`` / ``GRU`` nodes.

During export every ``torch.nn.RNN/LSTM/GRU`` (rnndeploy's subclass them) is swapped for an
`OnnxRecurrent` stand-in. Each layer of the stand-in calls `onnx_layer`, which, while
``torch.onnx.export(..., dynamo=True)`` traces it, emits one ONNX node per layer (both directions in one node)
through ``torch.onnx.ops.symbolic_multi_out``, with ``W``, ``R`` and ``B`` as initializers (the stand-in's
buffers), gates reordered from PyTorch's layout to ONNX's:

- LSTM: PyTorch ``i, f, g, o`` -> ONNX ``i, o, f, c``;
- GRU: PyTorch ``r, z, n`` -> ONNX ``z, r, h`` with ``linear_before_reset=1`` (PyTorch applies the reset gate
  after the recurrent product);
- RNN: one gate; ``nonlinearity="relu"`` becomes ``activations=["Relu"]``.

The node's output shapes are written in the input's symbolic time and batch sizes, so both axes stay dynamic
for every cell (left to itself, the exporter unrolls ``nn.RNN`` over a fixed number of steps). Outside an
export the stand-in runs the plain-torch reference, so it computes what the layer it replaces computes.

The graph always uses ``layout=0`` (time-major): onnxruntime and TensorRT reject ``layout=1``, so batch-first
layers get a ``Transpose`` on each side instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from rnndeploy.kernels import reference_layer

ONNX_OP = {"rnn": "RNN", "lstm": "LSTM", "gru": "GRU"}
# Position k of each list is the PyTorch gate block that becomes ONNX gate block k.
GATE_ORDER = {"rnn": [0], "lstm": [0, 3, 1, 2], "gru": [1, 0, 2]}


class UnsupportedLayerError(ValueError):
    """A recurrent layer uses an option that has no standard ONNX equivalent."""


def cell_of(module: nn.RNNBase) -> str:
    """``"rnn"``, ``"lstm"`` or ``"gru"`` for a ``torch.nn`` recurrent layer (or rnndeploy's subclass)."""
    if isinstance(module, nn.LSTM):
        return "lstm"
    if isinstance(module, nn.GRU):
        return "gru"
    if isinstance(module, nn.RNN):
        return "rnn"
    raise UnsupportedLayerError(f"{type(module).__name__} is not an RNN, LSTM or GRU layer")


def _gate_index(cell: str, hidden: int) -> Tensor:
    return torch.cat([torch.arange(g * hidden, (g + 1) * hidden) for g in GATE_ORDER[cell]])


def onnx_weights(module: nn.RNNBase, layer: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ONNX ``W``, ``R``, ``B`` of one layer (all directions), gates in ONNX order, fp32, detached.

    Returns:
        ``W [D, G*H, I]``, ``R [D, G*H, H]``, ``B [D, 2*G*H]`` (input bias then recurrent bias; zeros when the
        layer has ``bias=False``).
    """
    cell, hidden = cell_of(module), module.hidden_size
    idx = _gate_index(cell, hidden)
    ws, rs, bs = [], [], []
    for direction in range(2 if module.bidirectional else 1):
        sfx = f"l{layer}" + ("_reverse" if direction == 1 else "")
        w_ih = getattr(module, f"weight_ih_{sfx}").detach().float()
        w_hh = getattr(module, f"weight_hh_{sfx}").detach().float()
        ws.append(w_ih[idx])
        rs.append(w_hh[idx])
        if module.bias:
            b_ih = getattr(module, f"bias_ih_{sfx}").detach().float()
            b_hh = getattr(module, f"bias_hh_{sfx}").detach().float()
            bs.append(torch.cat([b_ih[idx], b_hh[idx]]))
        else:
            bs.append(torch.zeros(2 * idx.numel()))
    return torch.stack(ws).contiguous(), torch.stack(rs).contiguous(), torch.stack(bs).contiguous()


def check_exportable(module: nn.RNNBase, name: str = "") -> None:
    """Raises `UnsupportedLayerError` naming every option of ``module`` that ONNX cannot express."""
    where = f"layer {name!r} ({type(module).__name__})" if name else type(module).__name__
    if getattr(module, "proj_size", 0):
        raise UnsupportedLayerError(
            f"{where} has proj_size={module.proj_size}: ONNX LSTM has no output projection; "
            "export supports proj_size=0 only"
        )
    cell_of(module)


def onnx_layer(
    x: Tensor,
    h0: Tensor | None,
    c0: Tensor | None,
    W: Tensor,
    R: Tensor,
    B: Tensor,
    cell: str,
    bidirectional: bool,
    nonlinearity: str = "tanh",
) -> tuple[Tensor, ...]:
    """One recurrent layer (all directions): one ONNX node while exporting, the plain-torch reference otherwise.

    Args:
        x: ``[T, B, I]`` (``layout=0``).
        h0, c0: ``[D, B, H]`` or ``None`` for zeros; ``c0`` is used by LSTM only.
        W, R, B: the layer's ONNX weights (see `onnx_weights`), gates in ONNX order.
        cell: ``"rnn"``, ``"lstm"`` or ``"gru"``.
        bidirectional: both directions in this one layer.
        nonlinearity: RNN only, ``"tanh"`` or ``"relu"``.

    Returns:
        ``y [T, B, D*H]``, ``hn [D, B, H]`` and, for LSTM, ``cn [D, B, H]``.
    """
    if torch.onnx.is_in_onnx_export():
        return _symbolic_layer(x, h0, c0, W, R, B, cell, bidirectional, nonlinearity)
    return _reference_layer(x, h0, c0, W, R, B, cell, bidirectional, nonlinearity)


def _symbolic_layer(
    x: Tensor,
    h0: Tensor | None,
    c0: Tensor | None,
    W: Tensor,
    R: Tensor,
    B: Tensor,
    cell: str,
    bidirectional: bool,
    nonlinearity: str,
) -> tuple[Tensor, ...]:
    # NOTE: torch.onnx.ops.symbolic_multi_out puts the standard node itself into the exported program, with
    # output shapes written in terms of x's (symbolic) time and batch sizes, so both stay dynamic. The other
    # route, a torch.library.custom_op plus a custom_translation_table, needs a process-wide op registration
    # and an onnxscript function per node kind, for the same node.
    D, hidden = (2 if bidirectional else 1), R.shape[-1]
    T, N = x.shape[0], x.shape[1]
    attrs: dict[str, int | str | list[str]] = {
        "hidden_size": hidden,
        "direction": "bidirectional" if bidirectional else "forward",
    }
    if cell == "gru":
        attrs["linear_before_reset"] = 1
    if cell == "rnn":
        attrs["activations"] = ["Relu" if nonlinearity == "relu" else "Tanh"] * D
    inputs = [x, W, R, B, None, h0] + ([c0] if cell == "lstm" else [])
    n_states = 2 if cell == "lstm" else 1
    y, *states = torch.onnx.ops.symbolic_multi_out(
        ONNX_OP[cell],
        inputs,
        attrs,
        dtypes=[x.dtype] * (1 + n_states),
        shapes=[[T, D, N, hidden]] + [[D, N, hidden]] * n_states,
    )
    return (y.permute(0, 2, 1, 3).reshape(T, N, D * hidden), *states)  # [T, D, B, H] -> [T, B, D*H]


def _reference_layer(
    x: Tensor,
    h0: Tensor | None,
    c0: Tensor | None,
    W: Tensor,
    R: Tensor,
    B: Tensor,
    cell: str,
    bidirectional: bool,
    nonlinearity: str,
) -> tuple[Tensor, ...]:
    order = GATE_ORDER[cell]
    hidden, gh = R.shape[-1], R.shape[-2]

    def torch_order(v: Tensor) -> Tensor:  # ONNX gate blocks back to PyTorch's
        return torch.cat(
            [v[order.index(j) * hidden : (order.index(j) + 1) * hidden] for j in range(len(order))]
        )

    D = 2 if bidirectional else 1
    zeros = x.new_zeros(D, x.shape[1], hidden)
    h0 = zeros if h0 is None else h0
    c0 = zeros if c0 is None else c0
    ys, finals = [], []
    for d in range(D):
        weights = tuple(torch_order(v) for v in (W[d], R[d], B[d, :gh], B[d, gh:]))
        state = (h0[d], c0[d]) if cell == "lstm" else (h0[d],)
        y, s = reference_layer(cell, x, state, weights, reverse=d == 1, nonlinearity=nonlinearity)
        ys.append(y)
        finals.append(s)
    hn = torch.stack([s[0] for s in finals])
    if cell == "lstm":
        return torch.cat(ys, dim=-1), hn, torch.stack([s[1] for s in finals])
    return torch.cat(ys, dim=-1), hn


class OnnxRecurrent(nn.Module):
    """Drop-in stand-in for a ``torch.nn.RNN/LSTM/GRU`` that exports as standard ONNX nodes.

    Same call contract as the wrapped layer: ``forward(input, hx=None) -> (output, h_n)`` (``(h_n, c_n)`` for
    LSTM), ``input`` ``[B, T, I]`` if ``batch_first`` else ``[T, B, I]``, states ``[L*D, B, H]``. Batched,
    padded input only (no ``PackedSequence``, no unbatched 2-D input).
    """

    def __init__(self, module: nn.RNNBase, name: str = "") -> None:
        super().__init__()
        check_exportable(module, name)
        self.name = name or type(module).__name__
        self.cell = cell_of(module)
        self.num_layers = module.num_layers
        self.num_directions = 2 if module.bidirectional else 1
        self.hidden_size = module.hidden_size
        self.batch_first = module.batch_first
        self.nonlinearity = getattr(module, "nonlinearity", "tanh")
        self.train(module.training)
        for layer in range(module.num_layers):
            W, R, B = onnx_weights(module, layer)
            self.register_buffer(f"W_l{layer}", W)
            self.register_buffer(f"R_l{layer}", R)
            self.register_buffer(f"B_l{layer}", B)

    def forward(self, input: Tensor, hx: Tensor | tuple[Tensor, Tensor] | None = None):  # noqa: A002
        if not isinstance(input, Tensor) or input.dim() != 3:
            found = type(input).__name__ if not isinstance(input, Tensor) else f"shape {tuple(input.shape)}"
            raise UnsupportedLayerError(
                f"ONNX export of {self.name!r} needs a batched 3-D input tensor, got {found} "
                "(PackedSequence and unbatched inputs are not exportable; pad the batch instead)"
            )
        x = input.transpose(0, 1) if self.batch_first else input  # layout=0: [T, B, I]
        D, L = self.num_directions, self.num_layers
        if hx is None:
            h0, c0 = None, None
        elif self.cell == "lstm":
            h0, c0 = hx
        else:
            h0, c0 = hx, None
        hs, cs = [], []
        for layer in range(L):
            rows = slice(layer * D, (layer + 1) * D) if L > 1 else slice(None)
            x, hn, *cn = onnx_layer(
                x,
                None if h0 is None else h0[rows],
                None if c0 is None else c0[rows],
                getattr(self, f"W_l{layer}"),
                getattr(self, f"R_l{layer}"),
                getattr(self, f"B_l{layer}"),
                self.cell,
                D == 2,
                self.nonlinearity,
            )
            hs.append(hn)
            cs.extend(cn)
        y = x.transpose(0, 1) if self.batch_first else x
        h = torch.cat(hs) if L > 1 else hs[0]
        if self.cell == "lstm":
            return y, (h, torch.cat(cs) if L > 1 else cs[0])
        return y, h


@contextlib.contextmanager
def onnx_recurrent_layers(model: nn.Module) -> Iterator[list[str]]:
    """Temporarily swaps every recurrent layer inside ``model`` for `OnnxRecurrent`.

    Yields the dotted names of the swapped layers; the original layers are put back on exit, even on error.
    """
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    names: list[str] = []
    try:
        for name, module in list(model.named_modules()):
            if not name or not isinstance(module, nn.RNNBase):
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, attr, OnnxRecurrent(module, name))
            swapped.append((parent, attr, module))
            names.append(name)
        yield names
    finally:
        for parent, attr, module in reversed(swapped):
            setattr(parent, attr, module)
