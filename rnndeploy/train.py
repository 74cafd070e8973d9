"""Training: truncated BPTT with carried state, periodic validation, atomic checkpoints, exact resume, DDP.

`train` runs one training job described by `TrainOptions`. It writes, next to the checkpoint
``out`` (say ``runs/model.pt``): a JSON-lines log (``runs/model.log.jsonl``) and a loss curve
(``runs/model.loss.png``). Text is measured in bits per character (nats / ln 2), a series in mean squared
error of the normalised values.

A run is a pure function of its options: the chunk read at step ``k`` depends on ``k`` only, and the
checkpoint keeps the optimizer, the carried recurrent state and the RNG state of every rank, so resuming from
step ``N`` to ``N + M`` gives the parameters an uninterrupted ``N + M``-step run gives.

Launched with ``torchrun --nproc_per_node N``, every process trains a DistributedDataParallel replica on its
own streams (gloo on CPU, nccl on CUDA); rank 0 alone validates, writes files and shows the progress bar, and
at the end all replicas are compared and the result is logged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from rnndeploy import kernels
from rnndeploy.checkpoint import CheckpointError, atomic_write, load_checkpoint, save_checkpoint, write_error
from rnndeploy.data import Dataset, StreamBatcher, load_data
from rnndeploy.models import ModelConfig, SequenceModel

DEVICES = ("auto", "cpu", "cuda")
#: torch intra-op threads unless told (benchmarks/results/threads.txt): the models this trains are small, and on
#: a busy machine a second thread loses several times over, because torch's threads spin-wait for each other.
DEFAULT_THREADS = 1
#: Training refuses a model whose estimated memory exceeds what the device has; above this many floating point
#: operations per step (forward and backward) on a CPU it warns that each step takes long.
SLOW_CPU_FLOPS_PER_STEP = 1e12
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


def options_for_resume(checkpoint: str | Path, **given: Any) -> TrainOptions:
    """The options of the run saved in ``checkpoint``, updated with ``given`` (e.g. a larger ``steps``)."""
    saved = load_checkpoint(checkpoint).extra.get("options")
    if not saved:
        raise TrainError(f"checkpoint {checkpoint} was not written by rnndeploy train (no saved options)")
    if not isinstance(saved, dict):
        raise TrainError(
            f"checkpoint {checkpoint} is damaged: its saved options should be a dict, found "
            f"{type(saved).__name__}"
        )
    session_only = ("overwrite", "allow_data_change")  # permissions given to one session, not to the run
    saved = {k: v for k, v in saved.items() if k not in session_only}
    merged = {**saved, "out": None, **given, "resume": Path(checkpoint)}
    try:
        return TrainOptions(**merged)
    except TypeError as exc:
        raise TrainError(
            f"checkpoint {checkpoint} is damaged: its saved options do not fit ({exc})"
        ) from None


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
        with _autocast(amp, device):
            y, state = model(split[:, start:end], state)
        n = streams * (end - start)
        total += model.loss(y.float(), split[:, start + 1 : end + 1]).item() * n
        count += n
    model.train(was_training)
    return total / count


def train(options: TrainOptions, echo: Callable[[str], None] | None = None) -> TrainResult:
    """Trains a `SequenceModel` as ``options`` describe and returns where the results went.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) this joins the process group, trains a DistributedDataParallel
    replica per process and leaves the group at the end. ``echo`` (rank 0 only) receives what a person
    watching wants to know: device, data, model size and files before the first step, and with
    ``progress=False`` a line per validation.

    Raises:
        DataError: the data cannot be used.
        TrainError: bad options, a resume request that cannot be honoured, or an ``out`` that exists and is
            neither resumed nor ``overwrite``-allowed.
        TrainingDiverged: the loss became NaN/inf; the checkpoint on disk is the last good one.
        TrainingInterrupted: Ctrl-C; the message names the step on disk and the command that resumes.
    """
    check_out_is_free(options)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    threads = torch.get_num_threads()
    torch.set_num_threads(options.threads)
    try:
        if world_size == 1:
            return _interruptible(lambda stop: _Run(options, 0, 1, 0, echo, stop))
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(options.device, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        try:
            result = _interruptible(lambda stop: _Run(options, rank, world_size, local_rank, echo, stop))
            # every rank is done with its collectives before any tears the group down: a gloo peer that is
            # still reading when the other side closes its connections can abort
            dist.barrier()
            return result
        finally:
            dist.destroy_process_group()
    finally:
        torch.set_num_threads(threads)


def describe_device(device: torch.device, backend: str, threads: int) -> str:
    """One line naming the device, the recurrent backend that runs there and the CPU thread count."""
    if backend == "auto":
        backend = "auto (Triton kernels where measured faster, else cuDNN)"
        if device.type != "cuda":
            backend = "auto: torch (the Triton kernels are for CUDA GPUs)"
    return f"{device}; recurrent backend {backend}; {threads} CPU thread{'s' if threads > 1 else ''}"


def estimate_memory(config: ModelConfig, batch: int, seq_len: int) -> tuple[int, int, int]:
    """Bytes a training step needs, estimated before anything is allocated.

    Returns ``(parameters, parameter_bytes, activation_bytes)``: fp32 parameters with their gradients and two
    Adam moments; the activations BPTT keeps for ``[batch, seq_len]`` (gates, cell and hidden states per layer,
    the outputs and their gradients).
    """
    with torch.device("meta"):
        parameters = sum(p.numel() for p in SequenceModel(config, backend="torch").parameters())
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[config.cell]
    hidden = config.hidden_size * (2 if config.bidirectional else 1)
    per_step = config.num_layers * hidden * (gates + 3) + config.embed_dim
    per_step += 3 * (config.vocab_size or config.output_size or 1)
    return parameters, 16 * parameters, 4 * batch * seq_len * per_step


def check_out_is_free(options: TrainOptions) -> None:
    """Refuses to replace an existing checkpoint that this run neither resumes nor may overwrite."""
    out = options.out
    if options.overwrite or not out.exists():
        return
    if options.resume is not None and out.resolve() == options.resume.resolve():
        return
    try:
        held = f"a checkpoint at step {load_checkpoint(out).step}"
    except CheckpointError:
        held = "a file that is not an rnndeploy checkpoint"
    raise TrainError(
        f"--out {out} already exists ({held}) and this run would replace it. Continue that run with "
        f"`rnndeploy train --resume {out}` (Python: resume={str(out)!r}), write this one elsewhere with --out "
        "(out=...), or pass --overwrite (overwrite=True) to replace it"
    )


class _StopRequested(Exception):
    """Raised at a safe point after SIGINT or SIGTERM arrived."""


class _StopSignals:
    """SIGINT and SIGTERM handlers that ask training to stop at the next safe point.

    NOTE: a KeyboardInterrupt raised wherever the signal lands can hit a finalizer (where Python only prints
    "Exception ignored" and goes on) or a checkpoint write. The handler therefore only records the signal; the
    loop checks it between steps and after each validation, and a checkpoint write always finishes. A second
    signal outside a write stops at once (a long validation), still leaving every file whole.
    Handlers can only be installed from the main thread; elsewhere Ctrl-C stays a KeyboardInterrupt.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.writing = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None and not self.writing:
            raise KeyboardInterrupt
        self.signum = signum

    @contextlib.contextmanager
    def protect_write(self):
        """A block (a checkpoint write) that no signal interrupts; a stop request waits for its end."""
        self.writing = True
        try:
            yield
        finally:
            self.writing = False


def _signal_name(signum: int) -> str:
    return "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name


def _interruptible(make_run: Callable[[_StopSignals], _Run]) -> TrainResult:
    """Runs a session; a stop signal becomes a `TrainingInterrupted` that says what is on disk."""
    with _StopSignals() as stop:
        run = make_run(stop)
        try:
            return run.run()
        except KeyboardInterrupt:
            signum, cause = stop.signum or signal.SIGINT, _signal_name(stop.signum or signal.SIGINT)
        except _StopRequested:
            if stop.signum is not None:
                signum, cause = stop.signum, _signal_name(stop.signum)
            else:  # the ranks agreed to stop on another process's signal
                signum, cause = signal.SIGTERM, "a signal to another process of the run"
    out, saved, total = run.out, run.saved_step, run.opts.steps
    at = f"stopped by {cause} "
    at += f"after step {run.done} of {total}" if run.done is not None else "before the first step"
    if saved is None:
        message = f"{at}; this run has not written {out} yet, so there is nothing to resume"
    else:
        message = (
            f"{at}; {out} holds step {saved} (the last validation). "
            f"Resume with: {run.processes.launcher} train --resume {out}"
        )
    raise TrainingInterrupted(message, out, saved, signum, run.rank) from None


def _autocast(amp: str | None, device: torch.device):
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


class _Processes:
    """The distributed side of a session: this process's rank among ``world_size``, the DDP wrapper and the
    collectives. With one process every method is a local call."""

    def __init__(self, rank: int, world_size: int, device: torch.device) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device

    @property
    def launcher(self) -> str:
        """The command that starts this many processes again (for the resume hint)."""
        if self.world_size == 1:
            return "rnndeploy"
        return f"torchrun --nproc_per_node {self.world_size} -m rnndeploy"

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` as the training step calls it: DistributedDataParallel with several processes."""
        if self.world_size == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def gather(self, mine: Any) -> list[Any]:
        """Every process's ``mine`` (a picklable object), in rank order."""
        if self.world_size == 1:
            return [mine]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, mine)
        return gathered

    def replica_difference(self, model: torch.nn.Module) -> float | None:
        """The largest absolute difference between the replicas' parameters (``None``: one process)."""
        if self.world_size == 1:
            return None
        flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(self.world_size)]
        dist.all_gather(gathered, flat)
        return max((g - gathered[0]).abs().max().item() for g in gathered)


class _RunLog:
    """The run's JSON-lines log and loss-curve plot beside checkpoint ``out``; only rank 0 writes them."""

    def __init__(self, out: Path, writes: bool) -> None:
        self.file, self.plot_file, self.writes = log_path(out), plot_path(out), writes

    def restart(self, resumed: Path | None, upto: int) -> list[dict[str, Any]]:
        """Rewrites the log with the records of ``resumed``'s log up to step ``upto``; returns their evals."""
        if not self.writes:
            return []
        records = []
        if resumed is not None and log_path(resumed).is_file():
            records = [r for r in _read_log(log_path(resumed)) if r.get("step", 0) <= upto]
        text = "".join(json.dumps(r) + "\n" for r in records)
        atomic_write(self.file, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        return [r for r in records if r.get("event") == "eval"]

    def append(self, **record: Any) -> None:
        if not self.writes:
            return
        record["time"] = time.time()
        try:
            with self.file.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise write_error(self.file, exc, "appending a record", kept=False) from None

    def plot(self, history: list[dict[str, Any]], metric: str, title: str) -> None:
        """Draws the training and validation curves of ``history`` (eval records)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        unit = "bits per character" if metric == "bpc" else "mean squared error (normalised)"
        trained = [r for r in history if f"train_{metric}" in r]
        if trained:
            ax.plot(
                [r["step"] for r in trained],
                [r[f"train_{metric}"] for r in trained],
                label="train (mean since the previous point)",
            )
        ax.plot(
            [r["step"] for r in history], [r[f"valid_{metric}"] for r in history], "o-", label="validation"
        )
        ax.set_xlabel("step")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        atomic_write(self.plot_file, lambda tmp: fig.savefig(tmp, format="png"))


class _Checkpoints:
    """The run's checkpoint: what each process carries into it (state, RNG), saving, and restoring.

    ``saved_step`` is the step the checkpoint on disk holds for this run (``None``: this run has none yet).
    """

    def __init__(self, out: Path, processes: _Processes) -> None:
        self.out, self.processes = out, processes
        self.saved_step: int | None = None

    def gather_rank_state(self, state: tuple[Tensor, ...] | None) -> list[dict[str, Any]]:
        """Every process's carried recurrent state and RNG states, in rank order."""
        device = self.processes.device
        mine = {
            "state": None if state is None else [s.detach().cpu() for s in state],
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        }
        return self.processes.gather(mine)

    def restore_rank_state(self, extra: dict[str, Any]) -> tuple[Tensor, ...] | None:
        """Sets this process's RNG states from ``extra["ranks"]`` and returns its carried state."""
        rank, world_size, device = self.processes.rank, self.processes.world_size, self.processes.device
        ranks = extra.get("ranks") or []
        if len(ranks) != world_size:
            warnings.warn(
                f"the checkpoint was written by {len(ranks)} process(es), this run has {world_size}: "
                "the carried state restarts from zeros and the data streams are cut differently",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        saved = ranks[rank]
        torch.set_rng_state(saved["rng"])
        if device.type == "cuda" and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], device)
        if saved["state"] is None:
            return None
        return tuple(s.to(device) for s in saved["state"])

    def save(
        self,
        step: int,
        model: SequenceModel,
        optimizer: torch.optim.Optimizer,
        data: Dataset,
        extra: dict[str, Any],
    ) -> None:
        """Writes the checkpoint of ``step`` (rank 0 alone calls this)."""
        save_checkpoint(
            self.out,
            model,
            vocab=data.vocab,
            step=step,
            data_stats=data.data_stats,
            optimizer=optimizer,
            extra=extra,
        )
        self.saved_step = step


class _Run:
    """One training session of one process (see `train`): setup, the loop and validation; the
    distributed side, the checkpoint and the log are its parts `_Processes`, `_Checkpoints` and
    `_RunLog`."""

    def __init__(
        self,
        options: TrainOptions,
        rank: int,
        world_size: int,
        local_rank: int,
        echo: Callable[[str], None] | None = None,
        stop: _StopSignals | None = None,
    ) -> None:
        self.opts = options
        self.rank, self.world_size = rank, world_size
        self.echo = echo if rank == 0 else None
        self.stop = stop or _StopSignals()
        self.stop_agreed = False  # every rank saw a stop request (all-reduced with each step's loss)
        self.done: int | None = None  # steps completed, for the interruption message
        self.device = resolve_device(options.device, local_rank)
        if options.amp is not None and self.device.type != "cuda":
            raise TrainError(f"--amp {options.amp} needs a CUDA device, but training runs on {self.device}")
        if options.backend == "triton":
            reason = kernels.triton_unavailable_reason(self.device)
            if reason is not None:
                raise TrainError(f"--backend triton cannot run on {self.device}: {reason}")
        self.out = options.out
        self.processes = _Processes(rank, world_size, self.device)
        self.checkpoints = _Checkpoints(self.out, self.processes)
        self.log = _RunLog(self.out, writes=rank == 0)

    @property
    def saved_step(self) -> int | None:
        """The step this run's checkpoint holds on disk (``None``: none written by this run)."""
        return self.checkpoints.saved_step

    # --- setup -------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        opts = self.opts
        ckpt = load_checkpoint(opts.resume, backend=opts.backend) if opts.resume is not None else None
        if ckpt is not None:
            self._check_resumable(ckpt)
        data = load_data(opts.data, valid_fraction=opts.valid_fraction, vocab=ckpt.vocab if ckpt else None)
        self.data = data
        self.fingerprint = data.fingerprint()
        self.metric = "bpc" if data.kind == "text" else "mse"
        if ckpt is not None:
            self._check_same_data(ckpt)

        torch.manual_seed(opts.seed)
        config = ckpt.config if ckpt else self._config(data)
        self._check_size(config)
        self.model = ckpt.model if ckpt else SequenceModel(config, backend=opts.backend)
        self.model.to(self.device).train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=opts.lr)
        self.start = self.last_saved = 0
        self.state: tuple[Tensor, ...] | None = None
        torch.manual_seed(opts.seed + 1 + self.rank)  # dropout masks differ between ranks
        if ckpt is not None:
            try:
                self.optimizer.load_state_dict(ckpt.optimizer)
                self.state = self.checkpoints.restore_rank_state(ckpt.extra)
            except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
                raise TrainError(
                    f"checkpoint {opts.resume} is damaged: its optimizer or per-process state cannot be "
                    f"restored ({type(exc).__name__}: {exc})"
                ) from None
            self.start = self.last_saved = ckpt.step
            if self.out.resolve() == opts.resume.resolve():
                self.checkpoints.saved_step = ckpt.step
        self.net = self.processes.wrap(self.model)
        split = f"the training split of {data.source}"
        self.batcher = StreamBatcher(
            data.train, opts.batch, opts.seq_len, self.rank, self.world_size, what=split
        )
        self.history = self.log.restart(opts.resume if ckpt else None, ckpt.step if ckpt else 0)
        self._log_start()
        self._report_start()
        return self._loop()

    def _check_size(self, config: ModelConfig) -> None:
        """Refuses a model that cannot fit in the device's memory; warns when steps will be slow on a CPU."""
        opts = self.opts
        parameters, weights, activations = estimate_memory(config, opts.batch, opts.seq_len)
        available = _available_memory(self.device)
        needed = weights + activations
        sizes = f"--hidden {opts.hidden} --layers {opts.layers} --batch {opts.batch} --seq-len {opts.seq_len}"
        if available is not None and needed > available:
            raise TrainError(
                f"{sizes}: training needs about {_gb(needed)} ({parameters:,} parameters: {_gb(weights)} with "
                f"gradients and Adam state; activations {_gb(activations)}), more than the {_gb(available)} "
                f"available on {self.device}. Use a smaller --hidden (or --layers, --batch, --seq-len)"
            )
        flops = 6 * parameters * opts.batch * opts.seq_len
        if self.device.type == "cpu" and flops > SLOW_CPU_FLOPS_PER_STEP:
            message = (
                f"{sizes}: {parameters:,} parameters, about {flops / 1e12:,.0f} TFLOP per training step; on a "
                "CPU each step will take long (minutes on a few cores). A smaller --hidden trains much faster"
            )
            if self.echo is not None:
                self.echo(f"warning: {message}")
            elif self.rank == 0:
                warnings.warn(message, RuntimeWarning, stacklevel=2)

    def _report_start(self) -> None:
        """Tells the person at the terminal what runs where, before the first step."""
        if self.echo is None:
            return
        opts, data, model = self.opts, self.data, self.model
        why = ""
        if opts.device == "auto":
            why = (
                " (auto: CUDA GPU found)" if self.device.type == "cuda" else " (auto: torch sees no CUDA GPU)"
            )
        source = "builtin corpus (Python's pydoc topics)" if data.source == "builtin" else data.source
        unit = "characters" if data.kind == "text" else "time steps"
        kind = f"vocabulary {len(data.vocab)}" if data.vocab else f"{data.num_features} feature(s)"
        params = sum(p.numel() for p in model.parameters())
        cfg = model.config
        start = f"resuming at step {self.start} of {opts.steps}" if self.start else f"{opts.steps} steps"
        processes = f", {self.world_size} processes" if self.world_size > 1 else ""
        device, _, rest = describe_device(self.device, opts.backend, torch.get_num_threads()).partition(";")
        self.echo(
            f"device:  {device}{why}{processes};{rest}\n"
            f"data:    {source}: {len(data.train):,} training / {len(data.valid):,} validation "
            f"{unit}, {kind}\n"
            f"model:   {cfg.cell.upper()} {cfg.hidden_size} x {cfg.num_layers} ({cfg.task}), {params:,} "
            f"parameters; {start}, batch {opts.batch} x {opts.seq_len}\n"
            f"files:   {self.out} (checkpoint every {opts.eval_every} steps), {self.log.file}, "
            f"{self.log.plot_file}"
        )

    def _config(self, data: Dataset) -> ModelConfig:
        opts = self.opts
        common = dict(
            cell=opts.cell,
            embed_dim=opts.embed,
            hidden_size=opts.hidden,
            num_layers=opts.layers,
            dropout=opts.dropout,
        )
        try:
            if data.kind == "text":
                return ModelConfig(task="lm", vocab_size=len(data.vocab), **common)
            features = data.num_features
            return ModelConfig(task="regression", input_size=features, output_size=features, **common)
        except ValueError as exc:
            raise TrainError(f"bad model options: {exc}") from exc

    def _check_resumable(self, ckpt) -> None:
        saved = ckpt.extra.get("options")
        if not saved:
            raise TrainError(
                f"checkpoint {self.opts.resume} was not written by rnndeploy train (no saved options)"
            )
        now = self.opts.to_dict()
        # allow_data_change lets the data be another file as well as the same file changed
        defining = [k for k in RUN_DEFINING if not (k == "data" and self.opts.allow_data_change)]
        changed = [
            f"{k}: {saved.get(k)!r} in the checkpoint, {now[k]!r} now"
            for k in defining
            if saved.get(k) != now[k]
        ]
        if changed:
            raise TrainError(
                f"--resume continues the run saved in {self.opts.resume}, but these options differ: "
                + "; ".join(changed)
                + ". Keep them, or start a new run without --resume."
            )
        if ckpt.step >= self.opts.steps:
            raise TrainError(
                f"checkpoint {self.opts.resume} is already at step {ckpt.step}; give --steps larger than that"
            )

    def _check_same_data(self, ckpt) -> None:
        """Refuses to resume on other training data (unless ``allow_data_change``), naming both fingerprints."""
        opts, data = self.opts, self.data
        saved = ckpt.extra.get("data_fingerprint")
        if opts.allow_data_change:
            return
        if saved is not None and saved != self.fingerprint:
            raise TrainError(
                f"--resume {opts.resume}: the training data differs from the data this checkpoint was trained "
                f"on (checkpoint: {_describe(saved)}; {data.source} now: {_describe(self.fingerprint)}). "
                "Resume on the same data, or allow the change with --allow-data-change "
                "(allow_data_change=True in Python)"
            )
        if data.kind == "series" and not _same_stats(ckpt.data_stats, data.data_stats):
            raise TrainError(f"data {opts.data} is not the series checkpoint {opts.resume} was trained on")

    def _log_start(self) -> None:
        data = self.data
        self.log.append(
            event="start",
            step=self.start,
            options=self.opts.to_dict(),
            world_size=self.world_size,
            device=str(self.device),
            torch=torch.__version__,
            data={
                "kind": data.kind,
                "source": data.source,
                "train_steps": len(data.train),
                "valid_steps": len(data.valid),
                "vocab_size": len(data.vocab) if data.vocab else None,
            },
            parameters=sum(p.numel() for p in self.model.parameters()),
        )

    # --- the loop ----------------------------------------------------------------------------------------
    def _loop(self) -> TrainResult:
        opts = self.opts
        tokens_per_step = opts.batch * opts.seq_len * self.world_size
        self._stop_if_asked()
        if self.start == 0:
            self._validate_and_save(0, train_loss=None, tokens_per_s=None)
            self._stop_if_asked()
        # the bar starts its clock after the step-0 validation, so its first ETA counts training steps only
        bar = tqdm(
            total=opts.steps,
            initial=self.start,
            unit="step",
            dynamic_ncols=True,
            disable=not opts.progress or self.rank != 0,
        )
        loss_sum, loss_count, rate, t_last = 0.0, 0, 0.0, time.perf_counter()
        with bar:
            for step in range(self.start, opts.steps):
                loss = self._step(step)
                self.done = step + 1
                self._stop_if_asked(after_step=True)
                now = time.perf_counter()
                current = tokens_per_step / (now - t_last)
                rate = current if rate == 0 else 0.9 * rate + 0.1 * current
                t_last = now
                loss_sum, loss_count = loss_sum + loss, loss_count + 1
                bar.update(1)
                bar.set_postfix(
                    {self.metric: f"{self._metric(loss):.3f}", "tok/s": f"{rate:,.0f}"}, refresh=False
                )
                if (step + 1) % opts.eval_every == 0 or step + 1 == opts.steps:
                    record = self._validate_and_save(step + 1, loss_sum / loss_count, rate)
                    loss_sum, loss_count = 0.0, 0
                    if record is not None and self.echo is not None and not opts.progress:
                        m = self.metric
                        self.echo(
                            f"step {step + 1}/{opts.steps}: train {m} {record[f'train_{m}']:.3f}, validation "
                            f"{m} {record[f'valid_{m}']:.3f}, {rate:,.0f} tok/s, saved {self.out}"
                        )
                    if record is not None:
                        bar.set_postfix(
                            {
                                self.metric: f"{record[f'train_{self.metric}']:.3f}",
                                f"val_{self.metric}": f"{record[f'valid_{self.metric}']:.3f}",
                                "tok/s": f"{rate:,.0f}",
                            }
                        )
                    self._stop_if_asked()
                t_last = time.perf_counter()
        identical = self._compare_replicas()
        if opts.grad_report and self.rank == 0:
            from rnndeploy.diagnostics import grad_report

            x, y, _ = self.batcher.batch(opts.steps - 1)
            title = f"{opts.cell.upper()} {opts.hidden}x{opts.layers} on {self.data.source}, a training batch"
            grad_report(self.model, x.to(self.device), y[:, -1].to(self.device), self.out, title)
        self.log.append(event="end", step=opts.steps, checkpoint=str(self.out))
        return TrainResult(
            checkpoint=self.out,
            log=self.log.file,
            plot=self.log.plot_file,
            step=opts.steps,
            rank=self.rank,
            world_size=self.world_size,
            metric=self.metric,
            history=self.history,
            replicas_identical=identical,
        )

    def _step(self, step: int) -> float:
        """One optimizer step on the chunk of ``step``; returns the loss (mean over ranks)."""
        x, y, fresh = self.batcher.batch(step)
        if fresh:
            self.state = None
        x, y = x.to(self.device), y.to(self.device)
        with _autocast(self.opts.amp, self.device):
            out, new_state = self.net(x, self.state)
        loss = self.model.loss(out.float(), y)
        stats = optimizer_step(
            loss,
            self.model,
            self.optimizer,
            self.opts.clip,
            world_size=self.world_size,
            stop_asked=self.stop.signum is not None,
            on_non_finite=lambda loss, grad_norm: self._diverged(step + 1, loss, grad_norm),
        )
        self.stop_agreed = stats.stop_asked
        self.state = tuple(s.detach() for s in new_state)
        return stats.loss

    def _stop_if_asked(self, after_step: bool = False) -> None:
        """Stops at a safe point once SIGINT/SIGTERM arrived (with several processes: right after a step,
        where every rank knows whether any rank was signalled)."""
        if self.world_size > 1:
            if after_step and self.stop_agreed:
                raise _StopRequested
        elif self.stop.signum is not None:
            raise _StopRequested

    def _diverged(self, step: int, loss: float, grad_norm: float) -> None:
        message = (
            f"training diverged at step {step}: loss {loss}, gradient norm {grad_norm}. Stopped; "
            f"the last good checkpoint {self.out} (step {self.last_saved}) was kept. "
            f"Try a lower --lr (now {self.opts.lr}) or a smaller --clip (now {self.opts.clip})."
        )
        self.log.append(event="diverged", step=step, loss=loss, grad_norm=grad_norm, message=message)
        raise TrainingDiverged(message)

    def _metric(self, loss: float) -> float:
        return loss / math.log(2) if self.metric == "bpc" else loss

    def _validate_and_save(
        self, step: int, train_loss: float | None, tokens_per_s: float | None
    ) -> dict | None:
        """Gathers every rank's carried state and RNG; rank 0 validates, saves the checkpoint, log and plot."""
        ranks = self.checkpoints.gather_rank_state(self.state)
        self.last_saved = step
        if self.rank != 0:
            self.checkpoints.saved_step = step  # rank 0 writes it
            return None
        record = self._validate(step, train_loss, tokens_per_s)
        extra = {
            "options": self.opts.to_dict(),
            "ranks": ranks,
            "world_size": self.world_size,
            "data_position": dict(zip(("epoch", "chunk"), self.batcher.position(step), strict=True)),
            "data_fingerprint": self.fingerprint,
        }
        title = f"{self.opts.cell.upper()} {self.opts.hidden}x{self.opts.layers} on {self.data.source}"
        with self.stop.protect_write():
            self.checkpoints.save(step, self.model, self.optimizer, self.data, extra)
            self.history.append(record)
            self.log.append(**record)
            self.log.plot(self.history, self.metric, title)
        return record

    def _validate(self, step: int, train_loss: float | None, tokens_per_s: float | None) -> dict[str, Any]:
        """The eval record of ``step``: the validation loss, and the training loss since the last one."""
        valid_loss = evaluate(self.model, self.data.valid, self.opts.seq_len, self.opts.batch, self.opts.amp)
        record: dict[str, Any] = {"event": "eval", "step": step, "valid_loss": valid_loss}
        record[f"valid_{self.metric}"] = self._metric(valid_loss)
        if train_loss is not None:
            record.update(train_loss=train_loss, tokens_per_s=tokens_per_s)
            record[f"train_{self.metric}"] = self._metric(train_loss)
        return record

    def _compare_replicas(self) -> bool | None:
        """Logs whether every replica holds the same parameters (``None``: one process)."""
        diff = self.processes.replica_difference(self.model)
        if diff is None:
            return None
        self.log.append(
            event="replicas",
            step=self.opts.steps,
            world_size=self.world_size,
            identical=diff == 0.0,
            max_abs_diff=diff,
        )
        return diff == 0.0


def _available_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device, or the memory Linux reports available (``None``: unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def _read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines log; a torn last line (a write cut short by a crash) is left out."""
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise TrainError(
                f"log {path} line {number} is not JSON; move the log aside to resume without its history"
            ) from None
        if isinstance(record, dict):
            records.append(record)
    return records


def _describe(fingerprint: Any) -> str:
    if isinstance(fingerprint, dict):
        return f"{fingerprint.get('steps')} steps, sha256 {str(fingerprint.get('sha256'))[:16]}"
    return repr(fingerprint)[:80]


def _same_stats(a: dict[str, Any], b: dict[str, Any]) -> bool:
    try:
        return all(
            k in a and k in b and torch.allclose(torch.tensor(a[k]), torch.tensor(b[k]))
            for k in ("mean", "std")
        )
    except (TypeError, ValueError, RuntimeError):
        return False  # statistics of the wrong type or shape are not the same statistics
