"""What a run needs of its device: support for the chosen options, memory for the model, time per step."""

from __future__ import annotations

from pathlib import Path

import torch

from rnndeploy import kernels
from rnndeploy.models import ModelConfig, SequenceModel
from rnndeploy.training.options import TrainError, TrainOptions


def check_device(options: TrainOptions, device: torch.device) -> None:
    """Refuses options the device cannot run: bf16 autocast off CUDA, the Triton backend where it cannot run."""
    if options.amp is not None and device.type != "cuda":
        raise TrainError(f"--amp {options.amp} needs a CUDA device, but training runs on {device}")
    if options.backend == "triton":
        reason = kernels.triton_unavailable_reason(device)
        if reason is not None:
            raise TrainError(f"--backend triton cannot run on {device}: {reason}")


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


def check_size(
    config: ModelConfig, options: TrainOptions, device: torch.device, slow_cpu_flops: float
) -> str | None:
    """Refuses a model that cannot fit in the device's memory; returns a warning when a step will take long
    on a CPU (more than ``slow_cpu_flops`` floating point operations, forward and backward), else ``None``."""
    parameters, weights, activations = estimate_memory(config, options.batch, options.seq_len)
    available = _available_memory(device)
    needed = weights + activations
    sizes = (
        f"--hidden {options.hidden} --layers {options.layers} --batch {options.batch} "
        f"--seq-len {options.seq_len}"
    )
    if available is not None and needed > available:
        raise TrainError(
            f"{sizes}: training needs about {_gb(needed)} ({parameters:,} parameters: {_gb(weights)} with "
            f"gradients and Adam state; activations {_gb(activations)}), more than the {_gb(available)} "
            f"available on {device}. Use a smaller --hidden (or --layers, --batch, --seq-len)"
        )
    flops = 6 * parameters * options.batch * options.seq_len
    if device.type == "cpu" and flops > slow_cpu_flops:
        return (
            f"{sizes}: {parameters:,} parameters, about {flops / 1e12:,.0f} TFLOP per training step; on a "
            "CPU each step will take long (minutes on a few cores). A smaller --hidden trains much faster"
        )
    return None


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
