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

This module holds `train` and the session that drives the loop; the pieces the session wires together
(options and results, stop signals, the optimizer step, validation, the distributed side, checkpoints, the log,
device and memory checks, what the terminal is told) are the modules of `rnndeploy.training`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from rnndeploy.checkpoint import load_checkpoint
from rnndeploy.data import StreamBatcher, load_data
from rnndeploy.models import ModelConfig, SequenceModel
from rnndeploy.training.checkpoints import (
    Checkpoints,
    check_out_is_free,
    check_resumable,
    check_same_data,
    options_for_resume,
)
from rnndeploy.training.options import (
    AMP_MODES,
    DEFAULT_THREADS,
    DEVICES,
    RUN_DEFINING,
    TrainError,
    TrainingDiverged,
    TrainingInterrupted,
    TrainOptions,
    TrainResult,
    log_path,
    model_config,
    plot_path,
    resolve_device,
)
from rnndeploy.training.processes import Processes, process_group
from rnndeploy.training.report import Progress, describe_device, start_report
from rnndeploy.training.resources import check_device, check_size, estimate_memory
from rnndeploy.training.runlog import RunLog
from rnndeploy.training.signals import StopSignals, run_interruptibly
from rnndeploy.training.step import StepStats, autocast, optimizer_step
from rnndeploy.training.validation import eval_record, evaluate, metric_of

__all__ = [
    "AMP_MODES",
    "DEFAULT_THREADS",
    "DEVICES",
    "RUN_DEFINING",
    "SLOW_CPU_FLOPS_PER_STEP",
    "StepStats",
    "TrainError",
    "TrainOptions",
    "TrainResult",
    "TrainingDiverged",
    "TrainingInterrupted",
    "check_out_is_free",
    "describe_device",
    "estimate_memory",
    "evaluate",
    "log_path",
    "optimizer_step",
    "options_for_resume",
    "plot_path",
    "resolve_device",
    "train",
]

#: Training refuses a model whose estimated memory exceeds what the device has; above this many floating point
#: operations per step (forward and backward) on a CPU it warns that each step takes long.
SLOW_CPU_FLOPS_PER_STEP = 1e12


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
            return run_interruptibly(lambda stop: _Run(options, 0, 1, 0, echo, stop))
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        with process_group(resolve_device(options.device, local_rank)):
            return run_interruptibly(lambda stop: _Run(options, rank, world_size, local_rank, echo, stop))
    finally:
        torch.set_num_threads(threads)


class _Run:
    """One training session of one process (see `train`): it builds the run from the pieces in
    `rnndeploy.training` (`Processes`, `Checkpoints`, `RunLog`, `StopSignals`) and drives the loop."""

    def __init__(
        self,
        options: TrainOptions,
        rank: int,
        world_size: int,
        local_rank: int,
        echo: Callable[[str], None] | None = None,
        stop: StopSignals | None = None,
    ) -> None:
        self.opts = options
        self.rank, self.world_size = rank, world_size
        self.echo = echo if rank == 0 else None
        self.stop = stop or StopSignals()
        self.stop_agreed = (
            False  # some rank was signalled (all-reduced with each step's loss: every rank knows)
        )
        self.done: int | None = None  # steps completed, for the interruption message
        self.device = resolve_device(options.device, local_rank)
        check_device(options, self.device)
        self.out = options.out
        self.processes = Processes(rank, world_size, self.device)
        self.checkpoints = Checkpoints(self.out, self.processes)
        self.log = RunLog(self.out, writes=rank == 0)

    @property
    def saved_step(self) -> int | None:
        """The step this run's checkpoint holds on disk (``None``: none written by this run)."""
        return self.checkpoints.saved_step

    def run(self) -> TrainResult:
        """Builds the run (fresh, or resumed from ``options.resume`` after its checks), then trains."""
        opts = self.opts
        ckpt = load_checkpoint(opts.resume, backend=opts.backend) if opts.resume is not None else None
        if ckpt is not None:
            check_resumable(ckpt, opts)
        data = load_data(opts.data, valid_fraction=opts.valid_fraction, vocab=ckpt.vocab if ckpt else None)
        self.data, self.fingerprint, self.metric = data, data.fingerprint(), metric_of(data)
        if ckpt is not None:
            check_same_data(ckpt, opts, data, self.fingerprint)

        torch.manual_seed(opts.seed)
        config = ckpt.config if ckpt else model_config(opts, data)
        self._check_size(config)
        self.model = ckpt.model if ckpt else SequenceModel(config, backend=opts.backend)
        self.model.to(self.device).train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=opts.lr)
        self.start = self.last_saved = 0
        self.state: tuple[Tensor, ...] | None = None
        torch.manual_seed(opts.seed + 1 + self.rank)  # dropout masks differ between ranks
        if ckpt is not None:
            self.state = self.checkpoints.resume(ckpt, self.optimizer, opts.resume)
            self.start = self.last_saved = ckpt.step
        self.net = self.processes.wrap(self.model)
        split = f"the training split of {data.source}"
        self.batcher = StreamBatcher(
            data.train, opts.batch, opts.seq_len, self.rank, self.world_size, what=split
        )
        self.history = self.log.restart(opts.resume if ckpt else None, ckpt.step if ckpt else 0)
        parameters = sum(p.numel() for p in self.model.parameters())
        self.log.start(self.start, opts, self.world_size, self.device, data, parameters)
        if self.echo is not None:
            self.echo(
                start_report(opts, self.device, self.world_size, data, self.model, self.start, self.log)
            )
        return self._loop()

    def _check_size(self, config: ModelConfig) -> None:
        """`check_size`; its warning goes to the terminal when one is watching, else to `warnings`."""
        warning = check_size(config, self.opts, self.device, SLOW_CPU_FLOPS_PER_STEP)
        if warning is not None and self.echo is not None:
            self.echo(f"warning: {warning}")
        elif warning is not None and self.rank == 0:
            warnings.warn(warning, RuntimeWarning, stacklevel=2)

    def _loop(self) -> TrainResult:
        opts = self.opts
        tokens_per_step = opts.batch * opts.seq_len * self.world_size
        self.stop.check(self.world_size)
        if self.start == 0:
            self._validate_and_save(0, train_loss=None, tokens_per_s=None)
            self.stop.check(self.world_size)
        # the bar starts its clock after the step-0 validation, so its first ETA counts training steps only
        bar = tqdm(
            total=opts.steps,
            initial=self.start,
            unit="step",
            dynamic_ncols=True,
            disable=not opts.progress or self.rank != 0,
        )
        echo = self.echo if not opts.progress else None
        progress = Progress(bar, self.metric, tokens_per_step, opts.steps, self.out, echo)
        with bar:
            for step in range(self.start, opts.steps):
                loss = self._step(step)
                self.done = step + 1
                self.stop.check(self.world_size, agreed=self.stop_agreed)
                progress.stepped(loss)
                if (step + 1) % opts.eval_every == 0 or step + 1 == opts.steps:
                    record = self._validate_and_save(step + 1, progress.train_loss, progress.rate)
                    progress.validated(step + 1, record)
                    self.stop.check(self.world_size)
                progress.restart_clock()
        return self._finish()

    def _finish(self) -> TrainResult:
        """Compares the replicas, writes the gradient report if asked, and closes the log."""
        opts = self.opts
        identical = self.log.replicas(
            opts.steps, self.world_size, self.processes.replica_difference(self.model)
        )
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
        with autocast(self.opts.amp, self.device):
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

    def _diverged(self, step: int, loss: float, grad_norm: float) -> None:
        message = (
            f"training diverged at step {step}: loss {loss}, gradient norm {grad_norm}. Stopped; "
            f"the last good checkpoint {self.out} (step {self.last_saved}) was kept. "
            f"Try a lower --lr (now {self.opts.lr}) or a smaller --clip (now {self.opts.clip})."
        )
        self.log.append(event="diverged", step=step, loss=loss, grad_norm=grad_norm, message=message)
        raise TrainingDiverged(message)

    def _validate_and_save(
        self, step: int, train_loss: float | None, tokens_per_s: float | None
    ) -> dict | None:
        """Gathers every rank's carried state and RNG; rank 0 validates, saves the checkpoint, log and plot."""
        ranks = self.checkpoints.gather_rank_state(self.state)
        self.last_saved = step
        if self.rank != 0:
            self.checkpoints.saved_step = step  # rank 0 writes it
            return None
        valid_loss = evaluate(self.model, self.data.valid, self.opts.seq_len, self.opts.batch, self.opts.amp)
        record = eval_record(step, self.metric, valid_loss, train_loss, tokens_per_s)
        title = f"{self.opts.cell.upper()} {self.opts.hidden}x{self.opts.layers} on {self.data.source}"
        position = self.batcher.position(step)
        with self.stop.protect_write():
            self.checkpoints.save(
                step, self.model, self.optimizer, self.data, self.opts, ranks, position, self.fingerprint
            )
            self.history.append(record)
            self.log.append(**record)
            self.log.plot(self.history, self.metric, title)
        return record
