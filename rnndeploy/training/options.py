"""What a training run is given and what it gives back: `TrainOptions`, `TrainResult`, the errors, the files
beside the checkpoint, the device and the model configuration the options describe."""

from __future__ import annotations

import dataclasses
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rnndeploy.data import Dataset
from rnndeploy.models import ModelConfig

DEVICES = ("auto", "cpu", "cuda")
#: torch intra-op threads unless told (benchmarks/results/threads.txt): the models this trains are small, and on
#: a busy machine a second thread loses several times over, because torch's threads spin-wait for each other.
DEFAULT_THREADS = 1
AMP_MODES = ("bf16",)
#: Options that define a run: a resumed run must keep them (the rest may change between sessions).
RUN_DEFINING = (
    "data",
    "cell",
    "hidden",
    "layers",
    "embed",
    "dropout",
    "seq_len",
    "batch",
    "lr",
    "clip",
    "seed",
    "valid_fraction",
)


class TrainError(ValueError):
    """Options or a resume request that cannot be honoured."""


class TrainingDiverged(TrainError):
    """The loss or the gradient became NaN or infinite; the last good checkpoint was kept."""


class TrainingInterrupted(TrainError):
    """Ctrl-C (SIGINT) or SIGTERM stopped training; the message says what the checkpoint on disk holds.

    Attributes:
        checkpoint: the run's checkpoint path; saved_step: the step it holds (``None``: none was written);
        signal: the signal's number (a shell reports ``128 + signal`` as the exit status); rank: the process
        that raised it (every process of a distributed run stops; rank 0 speaks for them).
    """

    def __init__(
        self,
        message: str,
        checkpoint: Path,
        saved_step: int | None,
        signum: int = signal.SIGINT,
        rank: int = 0,
    ) -> None:
        super().__init__(message)
        self.checkpoint, self.saved_step, self.signal, self.rank = checkpoint, saved_step, int(signum), rank


@dataclass
class TrainOptions:
    """One training job. Field names match the ``rnndeploy train`` options (``seq_len`` is ``--seq-len``).

    Attributes:
        data: ``"builtin"`` (Python's pydoc topics, English text), a UTF-8 text file, or a ``.npy``/``.csv``
            series ``[T]`` / ``[T, F]``.
        cell, hidden, layers, embed, dropout: the model (``embed``: embedding or input-projection width).
        seq_len: BPTT chunk length; batch: parallel streams per process; steps: total optimizer steps of the
            run (a resumed run continues up to ``steps``).
        lr: Adam learning rate; clip: maximum global gradient norm (0 disables clipping).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``; amp: ``"bf16"`` autocast (CUDA).
        seed: initialisation and dropout seed; out: checkpoint path (default: ``resume``, else
            ``runs/model.pt``); resume: checkpoint to continue; eval_every: steps between validations and
            checkpoints;
        backend: recurrent backend (``"auto"``, ``"torch"``, ``"triton"``, ``"reference"``);
        valid_fraction: share at the end of the data used for validation; progress: show a tqdm bar;
        threads: torch intra-op CPU threads (default `DEFAULT_THREADS`; restored when training ends);
        overwrite: replace an existing ``out`` that this run does not resume (refused otherwise);
        allow_data_change: let ``resume`` continue on training data other than the checkpoint's (refused
            otherwise: the checkpoint stores the size and SHA-256 of its training split);
        grad_report: after training, write the gradient flow through time on one training batch next to
            ``out`` (``.grad.png``, ``.grad.json``; see `rnndeploy.diagnostics`).
    """

    data: str = "builtin"
    cell: str = "lstm"
    hidden: int = 256
    layers: int = 1
    embed: int = 64
    dropout: float = 0.0
    seq_len: int = 64
    batch: int = 32
    steps: int = 2000
    lr: float = 3e-3
    clip: float = 1.0
    device: str = "auto"
    amp: str | None = None
    seed: int = 0
    out: Path | None = None
    resume: Path | None = None
    eval_every: int = 200
    backend: str = "auto"
    valid_fraction: float = 0.05
    progress: bool = True
    threads: int = DEFAULT_THREADS
    overwrite: bool = False
    allow_data_change: bool = False
    grad_report: bool = False

    def __post_init__(self) -> None:
        self.data = str(self.data)
        self.resume = Path(self.resume) if self.resume is not None else None
        self.out = Path(self.out) if self.out is not None else (self.resume or Path("runs/model.pt"))
        for name in ("hidden", "layers", "embed", "seq_len", "batch", "steps", "eval_every", "threads"):
            if getattr(self, name) < 1:
                raise TrainError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.clip < 0:
            raise TrainError(f"lr must be > 0 and clip >= 0, got lr={self.lr}, clip={self.clip}")
        if self.device not in DEVICES:
            raise TrainError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.amp is not None and self.amp not in AMP_MODES:
            raise TrainError(f"amp must be one of {AMP_MODES} or None, got {self.amp!r}")

    def to_dict(self) -> dict[str, Any]:
        """The options as JSON-ready values (paths as strings)."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}


@dataclass
class TrainResult:
    """What a finished run left behind. ``history`` holds the log's ``eval`` records (all sessions)."""

    checkpoint: Path
    log: Path
    plot: Path
    step: int
    rank: int
    world_size: int
    metric: str
    history: list[dict[str, Any]] = field(default_factory=list)
    replicas_identical: bool | None = None

    @property
    def first_valid(self) -> float:
        return self.history[0][f"valid_{self.metric}"]

    @property
    def last_valid(self) -> float:
        return self.history[-1][f"valid_{self.metric}"]


def log_path(out: Path) -> Path:
    """The JSON-lines log written next to checkpoint ``out``."""
    return out.with_name(out.stem + ".log.jsonl")


def plot_path(out: Path) -> Path:
    """The loss-curve PNG written next to checkpoint ``out``."""
    return out.with_name(out.stem + ".loss.png")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; ``"cuda"`` is this process's GPU (``LOCAL_RANK``)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(
                "device 'cuda' was requested but torch sees no CUDA device; use --device cpu or auto"
            )
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "cpu":
        return torch.device("cpu")
    raise TrainError(f"device must be one of {DEVICES}, got {name!r}")


def model_config(options: TrainOptions, data: Dataset) -> ModelConfig:
    """The model ``options`` describe for ``data``: a language model on text, a forecaster on a series."""
    common = dict(
        cell=options.cell,
        embed_dim=options.embed,
        hidden_size=options.hidden,
        num_layers=options.layers,
        dropout=options.dropout,
    )
    try:
        if data.kind == "text":
            return ModelConfig(task="lm", vocab_size=len(data.vocab), **common)
        features = data.num_features
        return ModelConfig(task="regression", input_size=features, output_size=features, **common)
    except ValueError as exc:
        raise TrainError(f"bad model options: {exc}") from exc
