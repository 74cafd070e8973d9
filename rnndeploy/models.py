"""Sequence models: input encoder -> recurrent stack -> output head ``y_t = g(W_hy h_t + b_y)``.

`SequenceModel` is built from a `ModelConfig`, a small dataclass that is stored as JSON inside
checkpoints (and ONNX metadata), so export and the runtime rebuild the model without code.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from rnndeploy.modules import GRU, LSTM, RNN

TASKS = ("lm", "regression", "classification")
CELLS = ("rnn", "lstm", "gru")
HEADS = ("identity", "softmax", "log_softmax")
_DEFAULT_HEAD = {"lm": "log_softmax", "classification": "log_softmax", "regression": "identity"}


@dataclass
class ModelConfig:
    """Everything needed to rebuild a `SequenceModel`.

    Attributes:
        task: ``"lm"`` (next-token language model), ``"regression"`` (per-step regression / forecasting) or
            ``"classification"`` (one label per sequence).
        cell: ``"rnn"``, ``"lstm"`` or ``"gru"``; ``nonlinearity`` (``"tanh"``/``"relu"``) applies to ``"rnn"``.
        vocab_size: token-id input through ``Embedding(vocab_size, embed_dim)``; ``None`` for real features.
        input_size: real-valued features per step through ``Linear(input_size, embed_dim)``.
        embed_dim, hidden_size, num_layers, dropout, bidirectional: the encoder width and the recurrent stack.
        output_size: width of the head (the vocabulary size for ``"lm"``).
        head: ``g``: ``"identity"``, ``"softmax"`` or ``"log_softmax"``; default by task.
    """

    task: str = "lm"
    cell: str = "lstm"
    nonlinearity: str = "tanh"
    vocab_size: int | None = None
    input_size: int | None = None
    embed_dim: int = 64
    hidden_size: int = 256
    num_layers: int = 1
    dropout: float = 0.0
    bidirectional: bool = False
    output_size: int | None = None
    head: str | None = None

    def __post_init__(self) -> None:
        _choice("task", self.task, TASKS)
        _choice("cell", self.cell, CELLS)
        _choice("nonlinearity", self.nonlinearity, ("tanh", "relu"))
        if (self.vocab_size is None) == (self.input_size is None):
            raise ValueError(
                "give exactly one of vocab_size (token ids in) and input_size (real features in), "
                f"got vocab_size={self.vocab_size}, input_size={self.input_size}"
            )
        if self.task == "lm":
            if self.vocab_size is None:
                raise ValueError("task='lm' needs vocab_size (token ids in)")
            self.output_size = self.output_size or self.vocab_size
        if self.output_size is None or self.output_size < 1:
            raise ValueError(
                f"output_size must be a positive int for task={self.task!r}, got {self.output_size}"
            )
        if self.bidirectional and self.task != "classification":
            raise ValueError(
                f"bidirectional=True needs the whole sequence, so it works for task='classification' only, "
                f"not {self.task!r} (which runs step by step)"
            )
        for name in ("embed_dim", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self.head = self.head or _DEFAULT_HEAD[self.task]
        _choice("head", self.head, HEADS)

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("h", "c") if self.cell == "lstm" else ("h",)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


_RECURRENT = {"rnn": RNN, "lstm": LSTM, "gru": GRU}


class SequenceModel(nn.Module):
    """Encoder -> recurrent stack -> head, for language models, per-step regression and classification.

    Inputs are batch-first: ``[B, T]`` int64 token ids (``vocab_size`` set) or ``[B, T, F]`` real features.
    The recurrent state is a tuple ``(h,)`` or ``(h, c)`` (LSTM), each ``[num_layers * D, B, hidden_size]``,
    taken and returned by `forward` so training and inference can carry it across chunks.
    """

    def __init__(self, config: ModelConfig, backend: str = "auto") -> None:
        super().__init__()
        self.config = config
        if config.vocab_size is not None:
            self.encoder: nn.Module = nn.Embedding(config.vocab_size, config.embed_dim)
        else:
            self.encoder = nn.Linear(config.input_size, config.embed_dim)
        kwargs = dict(
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            bidirectional=config.bidirectional,
            batch_first=True,
            backend=backend,
        )
        if config.cell == "rnn":
            kwargs["nonlinearity"] = config.nonlinearity
        self.rnn = _RECURRENT[config.cell](config.embed_dim, config.hidden_size, **kwargs)
        self.head = nn.Linear(config.hidden_size * config.num_directions, config.output_size)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> tuple[Tensor, ...]:
        """Zero state for ``batch_size`` streams: a tuple of ``[num_layers * D, B, hidden_size]`` tensors."""
        c = self.config
        shape = (c.num_layers * c.num_directions, batch_size, c.hidden_size)
        device = device if device is not None else self.head.weight.device
        return tuple(torch.zeros(shape, device=device) for _ in c.state_names)

    def forward(
        self, x: Tensor, state: tuple[Tensor, ...] | None = None, lengths: Tensor | None = None
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Runs the model.

        Args:
            x: ``[B, T]`` token ids or ``[B, T, F]`` features.
            state: ``(h,)`` or ``(h, c)``, each ``[L*D, B, H]``; ``None`` for zeros.
            lengths: ``[B]`` valid lengths (classification of padded batches); ``None`` for all ``T``.

        Returns:
            ``y`` (``[B, T, output_size]`` for ``"lm"`` / ``"regression"``, ``[B, output_size]`` for
            ``"classification"``) and the new state tuple.
        """
        c = self.config
        if c.vocab_size is not None and x.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"this model takes token ids (int64) of shape [B, T], got dtype {x.dtype}")
        if c.input_size is not None and (x.dim() != 3 or x.shape[-1] != c.input_size):
            raise ValueError(
                f"this model takes features of shape [B, T, {c.input_size}], got {tuple(x.shape)}"
            )
        e = self.encoder(x)
        hx = None if state is None else (tuple(state) if c.cell == "lstm" else state[0])
        if lengths is not None:
            e = pack_padded_sequence(e, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, hn = self.rnn(e, hx)
        new_state = tuple(hn) if c.cell == "lstm" else (hn,)
        if c.task == "classification":
            h_last = new_state[0].view(c.num_layers, c.num_directions, x.shape[0], c.hidden_size)[-1]
            features = h_last.transpose(0, 1).reshape(x.shape[0], -1)  # [B, D*H]
        else:
            if lengths is not None:
                raise ValueError("lengths is only for task='classification'")
            features = out
        return self._activate(self.head(features)), new_state

    def _activate(self, z: Tensor) -> Tensor:
        if self.config.head == "log_softmax":
            return F.log_softmax(z, dim=-1)
        if self.config.head == "softmax":
            return F.softmax(z, dim=-1)
        return z

    def loss(self, y: Tensor, target: Tensor) -> Tensor:
        """The training loss for this task: negative log-likelihood (nats) or mean squared error."""
        head = self.config.head
        if self.config.task == "regression":
            return F.mse_loss(y, target)
        logp = (
            y
            if head == "log_softmax"
            else (y.clamp_min(1e-30).log() if head == "softmax" else F.log_softmax(y, -1))
        )
        return F.nll_loss(logp.reshape(-1, logp.shape[-1]), target.reshape(-1))
