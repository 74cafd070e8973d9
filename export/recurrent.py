"""Recurrent layers as standard ONNX ``RNN`` / ``LSTM`` / ``GRU`` nodes.

During export every ``torch.nn.RNN/LSTM/GRU`` (rnndeploy's subclass them) is swapped for an
:class:`OnnxRecurrent` wrapper. Each layer of the wrapper calls :class:`RecurrentFunction`, whose
``symbolic()`` emits one ONNX node per layer (both directions in one node) with ``W``, ``R`` and ``B`` as
initializers, gates reordered from PyTorch's layout to ONNX's:

- LSTM: PyTorch ``i, f, g, o`` -> ONNX ``i, o, f, c``;
- GRU: PyTorch ``r, z, n`` -> ONNX ``z, r, h`` with ``linear_before_reset=1`` (PyTorch applies the reset gate
  after the recurrent product);
- RNN: one gate; ``nonlinearity="relu"`` becomes ``activations=["Relu"]``.

The graph always uses ``layout=0`` (time-major): onnxruntime and TensorRT reject ``layout=1``, so batch-first
layers get a ``Transpose`` on each side instead.

``symbolic()`` is honoured by the TorchScript exporter only (``torch.onnx.export(..., dynamo=False)``); the
dynamo exporter would trace the Python forward instead, which is why the exporter asserts the node types.
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
    """Raises :class:`UnsupportedLayerError` naming every option of ``module`` that ONNX cannot express."""
    where = f"layer {name!r} ({type(module).__name__})" if name else type(module).__name__
    if getattr(module, "proj_size", 0):
        raise UnsupportedLayerError(
            f"{where} has proj_size={module.proj_size}: ONNX LSTM has no output projection; "
            "export supports proj_size=0 only"
        )
    cell_of(module)


@contextlib.contextmanager
def _untraced() -> Iterator[None]:
    # NOTE: the TorchScript tracer records an autograd.Function's forward as a subgraph of its node, and its
    # peephole pass fails on the reference loop's ops; symbolic() replaces that subgraph anyway, so the
    # forward runs with tracing paused (its values are still computed, only not recorded).
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


class RecurrentFunction(torch.autograd.Function):
    """One recurrent layer (all directions) as a single ONNX node.

    ``forward`` runs the plain-torch reference on the weights given back in PyTorch's gate order, so the
    wrapped model still computes (the TorchScript tracer runs it once on the example input).
    """

    @staticmethod
    def forward(ctx, x, h0, c0, W, R, B, cell, bidirectional, nonlinearity):
        """``x [T, B, I]``, ``h0``/``c0`` ``[D, B, H]`` -> ``y [T, B, D*H]``, ``hn`` (, ``cn``) ``[D, B, H]``.

        ``c0`` is ignored and ``cn`` not returned unless ``cell == "lstm"``.
        """
        order = GATE_ORDER[cell]
        hidden, gh = R.shape[-1], R.shape[-2]

        def torch_order(v: Tensor) -> Tensor:  # ONNX gate blocks back to PyTorch's (slices only: traceable)
            return torch.cat(
                [v[order.index(j) * hidden : (order.index(j) + 1) * hidden] for j in range(len(order))]
            )

        ys, finals = [], []
        with _untraced():
            for d in range(2 if bidirectional else 1):
                weights = tuple(torch_order(v) for v in (W[d], R[d], B[d, :gh], B[d, gh:]))
                state = (h0[d], c0[d]) if cell == "lstm" else (h0[d],)
                y, s = reference_layer(cell, x, state, weights, reverse=d == 1, nonlinearity=nonlinearity)
                ys.append(y)
                finals.append(s)
        y = torch.cat(ys, dim=-1)
        hn = torch.stack([s[0] for s in finals])
        if cell == "lstm":
            return y, hn, torch.stack([s[1] for s in finals])
        return y, hn

    @staticmethod
    def symbolic(g, x, h0, c0, W, R, B, cell, bidirectional, nonlinearity):
        hidden = R.type().sizes()[-1]
        attrs = {
            "hidden_size_i": hidden,
            "direction_s": "bidirectional" if bidirectional else "forward",
        }
        if cell == "gru":
            attrs["linear_before_reset_i"] = 1
        if cell == "rnn":
            act = "Relu" if nonlinearity == "relu" else "Tanh"
            attrs["activations_s"] = [act] * (2 if bidirectional else 1)
        no_lengths = g.op("prim::Constant")
        no_lengths.setType(torch._C.OptionalType.ofTensor())
        inputs = [x, W, R, B, no_lengths, h0] + ([c0] if cell == "lstm" else [])
        n_out = 3 if cell == "lstm" else 2
        outs = g.op(ONNX_OP[cell], *inputs, outputs=n_out, **attrs)
        y = outs[0]  # [T, D, B, H]
        y = g.op("Transpose", y, perm_i=[0, 2, 1, 3])
        y = g.op("Reshape", y, g.op("Constant", value_t=torch.tensor([0, 0, -1], dtype=torch.int64)))
        return (y, *outs[1:])


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
            zeros = x.new_zeros(L * D, x.shape[1], self.hidden_size)
            h0, c0 = zeros, zeros
        elif self.cell == "lstm":
            h0, c0 = hx
        else:
            h0, c0 = hx, hx
        hs, cs = [], []
        for layer in range(L):
            rows = slice(layer * D, (layer + 1) * D) if L > 1 else slice(None)
            x, hn, *cn = RecurrentFunction.apply(
                x,
                h0[rows],
                c0[rows],
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
    """Temporarily swaps every recurrent layer inside ``model`` for :class:`OnnxRecurrent`.

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
