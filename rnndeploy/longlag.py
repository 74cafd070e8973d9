"""Long-time-lag tasks from the literature and a benchmark that trains rnndeploy's cells on them.

- `AddingProblem`: the adding problem exactly as Hochreiter & Schmidhuber (1997, "Long short-term
  memory", Section 5.4, Experiment 4) define it. Each step is a pair (value in [-1, 1], marker in {-1, 0, 1});
  the length is a random integer in [T, T + T/10]; one of the first ten pairs and then one of the first
  T/2 - 1 still unmarked pairs get marker 1 (their values are X1 and X2; as the paper sets X1 to zero when
  the first pair gets marked, a marked first pair has value 0); the first and the last pair carry marker -1
  unless marked. The target, given at the end only, is 0.5 + (X1 + X2) / 4; a sequence is processed
  correctly when the absolute error is below 0.04.
  The paper's LSTM at T = 100 stopped after 74,000 training sequences, when the average training error was
  below 0.01 and the 2,000 most recent sequences had all been processed correctly (1 wrong of 2,560 tested).
- `CopyTask`: the copy (memory) task in its common form: ``symbols`` random symbols out of
  ``alphabet``, a delay of T - 1 blanks, a delimiter, and ``symbols`` more blanks, during which the model
  recalls the symbols in order. Only the recall steps are scored (the blank outputs are trivial).

`train_on_task` trains a `SequenceModel` (rnndeploy's own RNN/LSTM/GRU, any
backend) online on fresh sequences with Adam and gradient-norm clipping, through the step function of
``rnndeploy train`` (`rnndeploy.training.step.optimizer_step`), and stops when the paper's criterion holds on
the training stream. `run_benchmark` runs every cell and
``T``; ``rnndeploy bench memory`` prints the table and writes JSON, CSV and PNGs.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from rnndeploy.models import ModelConfig, SequenceModel
from rnndeploy.training.step import optimizer_step

#: The paper's figures (Hochreiter & Schmidhuber 1997, Table 7): T -> training sequences until stopped,
#: wrong predictions out of 2,560 test sequences.
PAPER_ADDING = {100: (74_000, 1), 500: (209_000, 2), 1000: (853_000, 7)}
#: A sequence of the adding problem counts as correct when the absolute error at its end is below this.
ADDING_TOLERANCE = 0.04
#: The paper's stop criterion: the average training error below this, over the most recent WINDOW sequences.
ADDING_MAX_ERROR = 0.01
WINDOW = 2000
TEST_SEQUENCES = 2560


@dataclass
class Batch:
    """Sequences of one task.

    Attributes:
        x: ``[B, L, 2]`` float pairs (adding) or ``[B, L]`` int64 tokens (copy), zero-padded after ``lengths``.
        target: ``[B, 1]`` float (adding) or ``[B, symbols]`` int64 (copy).
        lengths: ``[B]`` int64 valid lengths.
    """

    x: Tensor
    target: Tensor
    lengths: Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.x.to(device), self.target.to(device), self.lengths.to(device))


@dataclass(frozen=True)
class AddingProblem:
    """Hochreiter & Schmidhuber's adding problem with minimal length ``T`` (see the module docstring)."""

    T: int
    name: str = "adding"

    def __post_init__(self) -> None:
        if self.T < 12:
            raise ValueError(
                f"the adding problem needs T >= 12 (ten candidates for X1 before the end), got {self.T}"
            )

    def sample(self, n: int, generator: torch.Generator, length: int | None = None) -> Batch:
        """``n`` fresh sequences; ``length`` fixes every length (default: random in [T, T + T/10])."""
        T = self.T
        if length is None:
            lengths = torch.randint(T, T + T // 10 + 1, (n,), generator=generator)
        else:
            if length < T:
                raise ValueError(
                    f"length must be >= T={T} (the second marker may sit at T/2 - 1), got {length}"
                )
            lengths = torch.full((n,), length, dtype=torch.int64)
        L = int(lengths.max())
        values = torch.rand(n, L, generator=generator) * 2 - 1
        markers = torch.zeros(n, L)
        rows = torch.arange(n)
        first = torch.randint(0, 10, (n,), generator=generator)
        # one of the first T/2 - 1 pairs other than `first`: a slot among those left, skipping over `first`
        span = T // 2 - 1
        left = span - (first < span).long()
        second = (torch.rand(n, generator=generator) * left).long().clamp_max(left - 1)
        second = second + (second >= first).long()
        markers[rows, 0] = -1.0
        markers[rows, lengths - 1] = -1.0
        markers[rows, first] = 1.0
        markers[rows, second] = 1.0
        # the paper: "in the rare case where the first pair of the sequence gets marked, we set X1 to zero";
        # the second pick may land there too, and its value is zeroed the same way
        values[markers[:, 0] == 1, 0] = 0.0
        steps = torch.arange(L)
        valid = steps[None, :] < lengths[:, None]
        values, markers = values * valid, markers * valid
        target = 0.5 + (values[rows, first] + values[rows, second]) / 4
        return Batch(torch.stack([values, markers], dim=-1), target[:, None], lengths)

    def config(self, cell: str, hidden: int) -> ModelConfig:
        """A regression model: 2 features in, one output read at each sequence's last step."""
        return ModelConfig(
            task="regression", cell=cell, input_size=2, embed_dim=2, hidden_size=hidden, output_size=1
        )

    def predict(self, model: SequenceModel, batch: Batch) -> Tensor:
        """The model's output at each sequence's last step, ``[B, 1]``."""
        y, _ = model(batch.x)  # padding comes after the end: earlier outputs do not see it
        return y[torch.arange(len(y), device=y.device), batch.lengths - 1]

    def loss(self, model: SequenceModel, prediction: Tensor, target: Tensor) -> Tensor:
        return model.loss(prediction, target)

    def errors(self, prediction: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sequence squared error ``[B]`` and correctness (absolute error < 0.04) ``[B]``."""
        diff = (prediction - target).squeeze(-1)
        return diff.square(), diff.abs() < ADDING_TOLERANCE

    def baseline(self, batch: Batch) -> tuple[float, float]:
        """Always predicting the mean target 0.5: mean squared error and fraction correct on ``batch``."""
        error, correct = self.errors(torch.full_like(batch.target, 0.5), batch.target)
        return error.mean().item(), correct.float().mean().item()

    def solved(self, window_error: float, window_correct: float) -> bool:
        """The paper's stop criterion over the most recent sequences."""
        return window_error < ADDING_MAX_ERROR and window_correct == 1.0


@dataclass(frozen=True)
class CopyTask:
    """Copy ``symbols`` random symbols of ``alphabet`` across a delay of ``T`` steps (module docstring).

    Input tokens: 0 blank, 1..alphabet the symbols, alphabet + 1 the delimiter; sequence length
    ``T + 2 * symbols``; the outputs at the last ``symbols`` steps are scored (classes 0..alphabet-1).
    """

    T: int
    symbols: int = 5
    alphabet: int = 4
    name: str = "copy"

    def __post_init__(self) -> None:
        if self.T < 1 or self.symbols < 1 or self.alphabet < 2:
            raise ValueError(
                f"copy task needs T >= 1, symbols >= 1, alphabet >= 2, got {self.T}, {self.symbols}, {self.alphabet}"
            )

    def sample(self, n: int, generator: torch.Generator, length: int | None = None) -> Batch:
        """``n`` fresh sequences of length ``T + 2 * symbols`` (``length`` must be that or ``None``)."""
        K, L = self.symbols, self.T + 2 * self.symbols
        if length is not None and length != L:
            raise ValueError(f"copy sequences have length T + 2 * symbols = {L}, got length={length}")
        target = torch.randint(0, self.alphabet, (n, K), generator=generator)
        x = torch.zeros(n, L, dtype=torch.int64)
        x[:, :K] = target + 1
        x[:, L - K - 1] = self.alphabet + 1
        return Batch(x, target, torch.full((n,), L, dtype=torch.int64))

    def config(self, cell: str, hidden: int) -> ModelConfig:
        return ModelConfig(
            task="lm",
            cell=cell,
            vocab_size=self.alphabet + 2,
            embed_dim=min(16, hidden),
            hidden_size=hidden,
            output_size=self.alphabet,
        )

    def predict(self, model: SequenceModel, batch: Batch) -> Tensor:
        """Log-probabilities at the recall steps, ``[B, symbols, alphabet]``."""
        y, _ = model(batch.x)
        return y[:, -self.symbols :]

    def loss(self, model: SequenceModel, prediction: Tensor, target: Tensor) -> Tensor:
        return model.loss(prediction, target)

    def errors(self, prediction: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sequence cross-entropy (nats per recalled symbol) ``[B]`` and all-symbols-right ``[B]``."""
        nll = -prediction.gather(-1, target[..., None]).squeeze(-1)
        return nll.mean(-1), (prediction.argmax(-1) == target).all(-1)

    def baseline(self, batch: Batch) -> tuple[float, float]:
        """Predicting the symbols' marginal (uniform): ln(alphabet) nats and chance of recalling all."""
        return math.log(self.alphabet), self.alphabet ** (-self.symbols)

    def solved(self, window_error: float, window_correct: float) -> bool:
        """Every one of the most recent sequences recalled exactly (the adding problem's rule, for copy)."""
        return window_correct == 1.0


Task = AddingProblem | CopyTask
TASKS: dict[str, Callable[[int], Task]] = {"adding": AddingProblem, "copy": CopyTask}


@dataclass
class TrainSettings:
    """How `train_on_task` trains.

    Attributes:
        hidden: hidden units; batch: sequences per optimizer step; lr: Adam learning rate; clip: gradient-norm
            clipping (0: none); budget: most training sequences; seed: initialisation and data seed;
        backend: ``SequenceModel`` backend; device: where to train; curve_every: sequences between points of
            the learning curve; gate_bias: `set_gate_bias` value for LSTM/GRU (``None``: torch's init).
    """

    hidden: int = 32
    batch: int = 32
    lr: float = 3e-3
    clip: float = 1.0
    budget: int = 60_000
    seed: int = 0
    backend: str = "torch"
    device: str = "cpu"
    curve_every: int = 1000
    gate_bias: float | None = None


def set_gate_bias(model: SequenceModel, value: float) -> None:
    """Sets the total bias of the LSTM forget gate / the GRU update gate to ``value`` in every layer.

    Both are the second quarter (LSTM ``i, f, g, o``) / third (GRU ``r, z, n``) of the gate rows, so row block
    1 of ``bias_ih`` gets ``value`` and that of ``bias_hh`` zero. A positive value makes the cell keep its
    state by default: ``sigmoid(value)`` of it survives each step (torch's default init keeps about half).
    """
    rnn = model.rnn
    if rnn.cell == "rnn":
        raise ValueError("set_gate_bias needs an LSTM or GRU: the Elman RNN has no gate")
    if not rnn.bias:
        raise ValueError("set_gate_bias needs a model with biases (bias=True)")
    H = rnn.hidden_size
    with torch.no_grad():
        for name, p in rnn.named_parameters():
            if name.startswith("bias_ih"):
                p[H : 2 * H] = value
                if rnn.cell == "lstm":
                    p[:H] = -value
            elif name.startswith("bias_hh"):
                p[H : 2 * H] = 0.0
                if rnn.cell == "lstm":
                    p[:H] = 0.0


@dataclass
class RunResult:
    """One cell trained on one task at one ``T``.

    ``solved_at`` is the number of training sequences after which the stop criterion first held, ``None``
    when it did not within the budget. ``test_*`` are measured on `TEST_SEQUENCES` fresh sequences,
    ``baseline_*`` on the same ones. ``curve`` holds ``(sequences, window error, window fraction correct)``.
    ``seconds`` is the wall time of training, ``cpu_seconds`` the CPU time this process spent on it (on a
    shared machine the second is the one that does not depend on the other jobs).
    """

    task: str
    cell: str
    T: int
    backend: str
    device: str
    parameters: int
    sequences: int
    solved_at: int | None
    test_error: float
    test_correct: float
    baseline_error: float
    baseline_correct: float
    seconds: float
    cpu_seconds: float
    settings: dict[str, Any]
    curve: list[tuple[int, float, float]] = field(default_factory=list)
    model: SequenceModel | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        d["curve"] = [list(p) for p in self.curve]
        return d


@torch.no_grad()
def evaluate_task(model: SequenceModel, task: Task, batch: Batch, chunk: int = 512) -> tuple[float, float]:
    """Mean error and fraction correct of ``model`` on ``batch`` (in chunks of ``chunk`` sequences)."""
    was_training = model.training
    model.eval()
    errors, correct = [], []
    for start in range(0, len(batch.x), chunk):
        part = Batch(*(t[start : start + chunk] for t in (batch.x, batch.target, batch.lengths)))
        e, c = task.errors(task.predict(model, part), part.target)
        errors.append(e)
        correct.append(c)
    model.train(was_training)
    return torch.cat(errors).mean().item(), torch.cat(correct).float().mean().item()


def train_on_task(
    task: Task, cell: str, settings: TrainSettings, progress: Callable[[str], None] | None = None
) -> RunResult:
    """Trains a fresh ``cell`` model on ``task`` until the stop criterion or the budget, then tests it.

    Every optimizer step sees ``settings.batch`` fresh sequences; their errors (before the step) enter a
    window of the most recent `WINDOW` training sequences, on which the criterion is checked.
    """
    device = torch.device(settings.device)
    torch.manual_seed(settings.seed)
    model = SequenceModel(task.config(cell, settings.hidden), backend=settings.backend)
    if settings.gate_bias is not None and cell != "rnn":
        set_gate_bias(model, settings.gate_bias)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    data = torch.Generator().manual_seed(settings.seed + 1)
    test = task.sample(TEST_SEQUENCES, torch.Generator().manual_seed(10_000 + settings.seed)).to(device)
    window_error: collections.deque[float] = collections.deque(maxlen=WINDOW)
    window_correct: collections.deque[bool] = collections.deque(maxlen=WINDOW)
    curve: list[tuple[int, float, float]] = []
    seen, solved_at, start, cpu_start = 0, None, time.perf_counter(), time.process_time()
    while seen < settings.budget:
        batch = task.sample(settings.batch, data).to(device)
        prediction = task.predict(model, batch)
        optimizer_step(task.loss(model, prediction, batch.target), model, optimizer, settings.clip)
        errors, correct = task.errors(prediction.detach(), batch.target)
        window_error.extend(errors.tolist())
        window_correct.extend(correct.tolist())
        previous, seen = seen, seen + settings.batch
        mean_error = sum(window_error) / len(window_error)
        fraction = sum(window_correct) / len(window_correct)
        if seen // settings.curve_every > previous // settings.curve_every:
            curve.append((seen, mean_error, fraction))
            if progress is not None:
                progress(
                    f"{task.name} T={task.T} {cell}: {seen} sequences, error {mean_error:.4f}, correct {fraction:.3f}"
                )
        if len(window_error) == WINDOW and task.solved(mean_error, fraction):
            solved_at = seen
            if not curve or curve[-1][0] != seen:
                curve.append((seen, mean_error, fraction))
            break
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    test_error, test_correct = evaluate_task(model, task, test)
    baseline_error, baseline_correct = task.baseline(test)
    return RunResult(
        task=task.name,
        cell=cell,
        T=task.T,
        backend=settings.backend,
        device=str(device),
        parameters=sum(p.numel() for p in model.parameters()),
        sequences=seen,
        solved_at=solved_at,
        test_error=test_error,
        test_correct=test_correct,
        baseline_error=baseline_error,
        baseline_correct=baseline_correct,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        settings=dataclasses.asdict(settings),
        curve=curve,
        model=model,
    )


def run_benchmark(
    tasks: Sequence[str],
    cells: Sequence[str],
    lengths: Sequence[int],
    settings: dict[str, TrainSettings],
    backends: Sequence[str] = ("torch",),
    progress: Callable[[str], None] | None = None,
) -> list[RunResult]:
    """Trains every cell on every task and ``T`` with each backend; ``settings`` maps task name -> settings."""
    results = []
    for name in tasks:
        for T in lengths:
            task = TASKS[name](T)
            for cell in cells:
                for backend in backends:
                    s = dataclasses.replace(settings[name], backend=backend)
                    results.append(train_on_task(task, cell, s, progress))
    return results
