"""``torch.nn``-compatible recurrent layers with a choice of backend, and their cells.

`RNN`, `LSTM` and `GRU` subclass their ``torch.nn`` namesakes: the constructor arguments,
parameter names and shapes, ``state_dict`` keys, forward signature and outputs are torch's, so checkpoints move
both ways and ``isinstance(m, torch.nn.LSTM)`` holds. The one addition is ``backend``:

- ``"auto"`` (default): the Triton kernels on CUDA where they measured faster than cuDNN, torch elsewhere;
- ``"torch"``: torch's own fused path (cuDNN on GPU);
- ``"triton"``: the persistent Triton kernels (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``);
- ``"reference"``: the plain-torch time loop from ``rnndeploy.kernels.reference`` (slow; the test oracle).

`RNNCell`, `LSTMCell` and `GRUCell` are torch's cells under rnndeploy's name.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from rnndeploy import kernels

BACKENDS = ("auto", "torch", "triton", "reference")

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


class _Recurrent:
    """The layer-by-layer forward shared by RNN, LSTM and GRU (mixed in before the torch class)."""

    cell: str
    backend: str

    def _setup(self, backend: str) -> None:
        if getattr(self, "proj_size", 0):
            raise ValueError(
                f"proj_size={self.proj_size} is not supported by rnndeploy (ONNX LSTM has no projection); "
                "use proj_size=0"
            )
        self.backend = _check_backend(backend)

    @property
    def nonlinearity_name(self) -> str:
        return getattr(self, "nonlinearity", "tanh")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"

    def resolve_backend(self, input: Tensor | PackedSequence) -> str:  # noqa: A002 - torch's argument name
        """The backend that runs a forward on ``input``: ``"torch"``, ``"triton"`` or ``"reference"``."""
        device = (input.data if isinstance(input, PackedSequence) else input).device
        backend = getattr(self, "backend", "auto")
        if backend == "triton":
            reason = kernels.triton_unavailable_reason(device)
            if reason is not None:
                raise RuntimeError(f"backend='triton' cannot run on {device}: {reason}")
            return "triton"
        if backend != "auto" or device.type != "cuda":
            return "torch" if backend == "auto" else backend
        dtype = (input.data if isinstance(input, PackedSequence) else input).dtype
        if not kernels.prefer_triton(self.cell, self.batch_size(input), self.hidden_size, dtype, device):
            return "torch"
        reason = kernels.triton_unavailable_reason(device)
        if reason is not None:
            _warn_once(f"rnndeploy: backend='auto' falls back to cuDNN because {reason}")
            return "torch"
        return "triton"

    def batch_size(self, input: Tensor | PackedSequence) -> int:  # noqa: A002 - torch's argument name
        """How many sequences ``input`` holds (1 for unbatched 2-D input)."""
        if isinstance(input, PackedSequence):
            return int(input.batch_sizes[0])
        if input.dim() == 2:
            return 1
        return int(input.shape[0 if self.batch_first else 1])

    def forward(self, input, hx=None):  # noqa: A002 - torch's own argument name
        backend = self.resolve_backend(input)
        if backend == "torch":
            return super().forward(input, hx)
        layer = kernels.triton_layer if backend == "triton" else kernels.reference_layer
        return self._layered_forward(input, hx, layer)

    def _layer_weights(self, layer: int, direction: int):
        sfx = f"l{layer}" + ("_reverse" if direction == 1 else "")
        w_ih = getattr(self, f"weight_ih_{sfx}")
        w_hh = getattr(self, f"weight_hh_{sfx}")
        b_ih = getattr(self, f"bias_ih_{sfx}") if self.bias else None
        b_hh = getattr(self, f"bias_hh_{sfx}") if self.bias else None
        return w_ih, w_hh, b_ih, b_hh

    def _layered_forward(self, input, hx, layer_fn):
        packed = isinstance(input, PackedSequence)
        unbatched = False
        if packed:
            x, lengths = pad_packed_sequence(input, batch_first=False)  # original batch order
            lengths = lengths.to(x.device)
        else:
            x, lengths = input, None
            if x.dim() not in (2, 3):
                raise ValueError(
                    f"{type(self).__name__}: Expected input to be 2D or 3D, got {x.dim()}D instead "
                    f"(shape {tuple(x.shape)})"
                )
            unbatched = x.dim() == 2
            if unbatched:
                x = x.unsqueeze(1)
            elif self.batch_first:
                x = x.transpose(0, 1)
        self._check_input(x)

        n_dir = 2 if self.bidirectional else 1
        n_state = 2 if self.cell == "lstm" else 1
        B = x.shape[1]
        states = self._initial_state(hx, B, x, n_dir, n_state, unbatched)

        finals: list[list[Tensor]] = [[] for _ in range(n_state)]
        for layer in range(self.num_layers):
            outs = []
            for d in range(n_dir):
                idx = layer * n_dir + d
                y, s = layer_fn(
                    self.cell,
                    x,
                    tuple(st[idx] for st in states),
                    self._layer_weights(layer, d),
                    lengths=lengths,
                    reverse=d == 1,
                    nonlinearity=self.nonlinearity_name,
                )
                outs.append(y)
                for k in range(n_state):
                    finals[k].append(s[k])
            x = outs[0] if n_dir == 1 else torch.cat(outs, dim=-1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, p=self.dropout, training=True)

        final = tuple(torch.stack(f) for f in finals)
        if unbatched:
            x = x.squeeze(1)
            final = tuple(f.squeeze(1) for f in final)
        if packed:
            order = input.sorted_indices
            y_sorted = x if order is None else x.index_select(1, order)
            len_sorted = lengths.cpu() if order is None else lengths.cpu().index_select(0, order.cpu())
            data = pack_padded_sequence(y_sorted, len_sorted, enforce_sorted=True).data
            x = PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices)
        elif self.batch_first and not unbatched:
            x = x.transpose(0, 1)
        hidden = final if self.cell == "lstm" else final[0]
        return x, hidden

    # NOTE: the checks below raise the exception types torch.nn's recurrent layers raise for the same mistake
    # (ValueError for the input's rank and dtype, RuntimeError for sizes and states), with torch's wording
    # where it says what was expected, so code written against torch.nn catches them alike.
    def _check_input(self, x: Tensor) -> None:
        """``x`` is the time-major ``[T, B, I]`` view of the input."""
        weight = self.weight_ih_l0
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"RNN input dtype ({x.dtype}) does not match weight dtype ({weight.dtype}). "
                f"Convert input: input.to({weight.dtype}), or convert model: model.to({x.dtype})"
            )
        if x.shape[-1] != self.input_size:
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got {x.shape[-1]}"
            )

    def _initial_state(self, hx, B, x, n_dir, n_state, unbatched):
        shape = (self.num_layers * n_dir, B, self.hidden_size)
        if hx is None:
            zeros = torch.zeros(shape, dtype=x.dtype, device=x.device)
            return (zeros,) * n_state
        given = hx if isinstance(hx, tuple) else (hx,)
        names = ("h_0", "c_0")[:n_state]
        if len(given) != n_state:
            expected = "a tuple (h_0, c_0)" if n_state == 2 else "one tensor h_0"
            raise RuntimeError(f"{type(self).__name__} expects hx as {expected}, got {len(given)} tensor(s)")
        rank = 2 if unbatched else 3
        if any(h.dim() != rank for h in given):
            kind = "unbatched 2-D" if unbatched else "batched 3-D"
            found = ", ".join(f"{h.dim()}-D" for h in given)
            raise RuntimeError(f"For {kind} input, hx should also be {rank}-D but got ({found}) tensors")
        states = tuple(h.unsqueeze(1) if unbatched else h for h in given)
        for k, (name, h) in enumerate(zip(names, states)):
            if tuple(h.shape) != shape:
                which = f"[{k}]" if n_state > 1 else ""
                raise RuntimeError(
                    f"Expected hidden{which} size {shape}, got {list(h.shape)}: {name} is "
                    "[num_layers * num_directions, batch, hidden_size]"
                )
            if h.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
                raise RuntimeError(
                    f"{name} is {h.dtype} but the input is {x.dtype}: expected one dtype for both"
                )
        return states


class RNN(_Recurrent, nn.RNN):
    """Elman RNN, ``torch.nn.RNN``'s interface plus ``backend`` (see the module docstring)."""

    cell = "rnn"

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._setup(backend)


class LSTM(_Recurrent, nn.LSTM):
    """LSTM, ``torch.nn.LSTM``'s interface plus ``backend`` (``proj_size`` is not supported)."""

    cell = "lstm"

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._setup(backend)


class GRU(_Recurrent, nn.GRU):
    """GRU, ``torch.nn.GRU``'s interface plus ``backend`` (see the module docstring)."""

    cell = "gru"

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._setup(backend)


class RNNCell(nn.RNNCell):
    """``torch.nn.RNNCell``, one step of `RNN`: torch's compute, parameters and ``state_dict``.

    The cells are here so that a model stepping a cell by hand imports it from rnndeploy with its layers; a
    single step gains nothing from a persistent kernel, so the cells have no ``backend``. Args, shapes and
    errors are torch's: ``input [B, I]`` or ``[I]``, ``hx [B, H]`` or ``[H]``.
    """


class LSTMCell(nn.LSTMCell):
    """``torch.nn.LSTMCell``, one step of `LSTM` (see `RNNCell`): ``hx = (h [B, H], c [B, H])``."""


class GRUCell(nn.GRUCell):
    """``torch.nn.GRUCell``, one step of `GRU` (see `RNNCell`)."""


_OURS: dict[type, type] = {nn.RNN: RNN, nn.LSTM: LSTM, nn.GRU: GRU}


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Swaps every ``torch.nn.RNN/LSTM/GRU`` inside ``model`` for rnndeploy's, in place.

    The swap keeps the very same parameter tensors (optimizers holding them stay valid); only the class changes.
    Layers that are already rnndeploy's get ``backend`` set. Cells (``torch.nn.LSTMCell``, ...) stay as they
    are: rnndeploy's cells are torch's. Returns ``model`` for chaining.
    """
    _check_backend(backend)
    for name, module in model.named_modules():
        ours = _OURS.get(type(module))
        if ours is None and not isinstance(module, _Recurrent):
            continue
        if ours is not None:
            if getattr(module, "proj_size", 0):
                raise ValueError(
                    f"cannot convert {name or 'model'}: proj_size={module.proj_size} is not supported"
                )
            module.__class__ = ours
        module.backend = backend
    return model
