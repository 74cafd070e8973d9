"""Timing the persistent kernels against torch.nn (cuDNN) and the plain reference, and the headline check (GPU only).

Measurement only (torch and triton); ``rnndeploy bench kernels`` prints the table and writes the files.
"""

from __future__ import annotations

import itertools
import platform
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from torch import Tensor
from triton.testing import do_bench

from rnndeploy.provenance import git_commit

from . import reference_layer, triton_layer
from .common import plan_layer

PROVIDERS = ("triton", "cudnn", "reference")
MODES = ("forward", "full")  # full = forward + backward
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTILES = [0.5, 0.2, 0.8]


@dataclass
class Case:
    """One point of the benchmark grid."""

    cell: str
    mode: str
    provider: str
    dtype: str
    batch: int
    hidden: int
    seq_len: int


@dataclass
class Row(Case):
    ms: float
    ms_p20: float
    ms_p80: float
    peak_mib: float
    strategy: str


def environment() -> dict[str, str]:
    """Device, driver, library versions and the git commit the numbers belong to."""
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip().splitlines()[0]  # fmt: skip
    except (OSError, subprocess.SubprocessError, IndexError):
        driver = "unknown"
    return {
        "device": props.name,
        "sm_count": str(props.multi_processor_count),
        "driver": driver,
        "cuda": str(torch.version.cuda),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "commit": git_commit(Path(__file__).resolve().parent),
    }


def _cudnn_layer(cell: str, module: torch.nn.Module):
    def run(x, state):
        hx = tuple(s[None] for s in state)
        y, final = module(x, hx if cell == "lstm" else hx[0])
        return y, final if isinstance(final, tuple) else (final,)

    return run


def _triton_layer(cell: str, weights: tuple[Tensor, ...]):
    def run(x, state):
        return triton_layer(cell, x, state, weights)

    return run


def _case(cell: str, provider: str, B: int, H: int, T: int, dtype: torch.dtype, training: bool):
    """Builds inputs and a closure running one forward (and backward when ``training``)."""
    module = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](H, H)
    module = module.to(device="cuda", dtype=dtype)
    x = torch.randn(T, B, H, device="cuda", dtype=dtype, requires_grad=training)
    state = tuple(
        torch.zeros(B, H, device="cuda", dtype=dtype, requires_grad=training)
        for _ in range(2 if cell == "lstm" else 1)
    )
    weights = tuple(module.parameters())
    if provider == "cudnn":
        layer = _cudnn_layer(cell, module)
    elif provider == "triton":
        layer = _triton_layer(cell, weights)
    else:

        def layer(x, state):
            return reference_layer(cell, x, state, weights)

    def step():
        with torch.set_grad_enabled(training):
            y, _ = layer(x, state)
            if training:
                y.backward(torch.ones_like(y))

    return step


def _peak_mib(fn: Callable[[], None]) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@dataclass
class Failure(Case):
    """A case that raised instead of finishing: what it was and the error, so no other number is lost."""

    error: str


def run_benchmark(
    cells: Iterable[str],
    modes: Iterable[str],
    providers: Iterable[str],
    dtypes: Iterable[str],
    batches: Iterable[int],
    hiddens: Iterable[int],
    seq_lens: Iterable[int],
    reference_max_t: int = 256,
    rep_ms: int = 100,
    time_budget_s: float | None = None,
    progress: Callable[[str], None] | None = None,
    on_result: Callable[[Row | Failure], None] | None = None,
) -> tuple[list[Row], list[Failure]]:
    """Times every combination with ``triton.testing.do_bench`` (median and 0.2/0.8 quantiles, ms).

    Each case runs in its own ``try``: one that raises becomes a :class:`Failure` and the grid goes on.
    ``on_result`` sees every row and failure as soon as it exists (the CLI writes it as a JSON line then), so
    a later error or a timeout loses nothing that finished. The reference runs only where
    ``seq_len <= reference_max_t`` (its Python time loop is slow). Once ``time_budget_s`` has passed, the
    remaining cases are skipped (reported through ``progress``).
    """

    rows: list[Row] = []
    failures: list[Failure] = []
    start = time.monotonic()
    grid = list(itertools.product(cells, modes, dtypes, seq_lens, hiddens, batches, providers))
    for n, (cell, mode, dtype_name, T, H, B, provider) in enumerate(grid):
        if provider == "reference" and T > reference_max_t:
            continue
        if time_budget_s is not None and time.monotonic() - start > time_budget_s:
            if progress is not None:
                progress(
                    f"time budget of {time_budget_s:.0f} s spent: skipped the last {len(grid) - n} cases"
                )
            break
        dtype = DTYPES[dtype_name]
        if progress is not None:
            progress(f"{cell} {mode} {provider} {dtype_name} B={B} H={H} T={T}")
        result: Row | Failure
        try:
            step = _case(cell, provider, B, H, T, dtype, mode == "full")
            step()  # compile outside the timed region
            ms, p20, p80 = do_bench(step, quantiles=QUANTILES, rep=rep_ms)
            strategy = ""
            if provider == "triton":
                # after the run: a strategy that failed to launch has been replaced (common.launch)
                strategy = plan_layer(cell, B, H, dtype, torch.device("cuda")).strategy
            result = Row(cell, mode, provider, dtype_name, B, H, T, ms, p20, p80, _peak_mib(step), strategy)
            rows.append(result)
        except Exception as e:  # one failing case is recorded; the grid goes on
            result = Failure(cell, mode, provider, dtype_name, B, H, T, f"{type(e).__name__}: {e}"[:2000])
            failures.append(result)
            if progress is not None:
                progress(f"  FAILED: {result.error.splitlines()[0] if result.error else ''}")
        if on_result is not None:
            on_result(result)
    return rows, failures


def speedups(rows: list[Row]) -> list[dict]:
    """Triton against cuDNN for every case both ran: ``cudnn_ms / triton_ms`` (> 1: Triton faster)."""
    key = lambda r: (r.cell, r.mode, r.dtype, r.batch, r.hidden, r.seq_len)
    cudnn = {key(r): r for r in rows if r.provider == "cudnn"}
    out = []
    for r in rows:
        if r.provider == "triton" and key(r) in cudnn:
            c = cudnn[key(r)]
            out.append({**asdict(r), "cudnn_ms": c.ms, "speedup": c.ms / r.ms, "cudnn_peak_mib": c.peak_mib})
    return out


def _outputs_and_grads(layer, x: Tensor, state: tuple[Tensor, ...], params, probes):
    xi = x.detach().clone().requires_grad_()
    si = tuple(s.detach().clone().requires_grad_() for s in state)
    y, final = layer(xi, si)
    outs = (y, *final)
    loss = sum((o.float() * p).sum() for o, p in zip(outs, probes, strict=True))
    return [o.detach().float() for o in outs] + [
        g.float() for g in torch.autograd.grad(loss, [xi, *si, *params])
    ]


def _handoff_name(cfg) -> str:
    return "-" if cfg.NSPLIT == 1 else ("tagged" if cfg.TAGGED else "barrier")


def headline(
    cells: Iterable[str] = ("lstm", "gru", "rnn"),
    B: int = 16,
    T: int = 1024,
    H: int = 768,
    dtype_name: str = "bf16",
    rep_ms: int = 50,
    echo: Callable[[str], None] = print,
    device: str = "cuda",
    timings: bool = True,
) -> list[dict]:
    """The first GPU check: each cell at one shape, outputs and every gradient, then timings, against cuDNN.

    Both the kernels and cuDNN run in ``dtype_name``; each is compared with cuDNN in fp32 (TF32 off) on the
    same weights, as ``max |a - ref| / max |ref|`` per tensor. A tensor passes when the kernels' error is at
    most twice cuDNN's plus 1e-2 (rounding of the low-precision dtype; a wrong kernel is off by order 1).
    Every line goes to ``echo`` as soon as it exists. Returns one dict per line. Timings need CUDA; on
    ``device="cpu"`` (the interpreter) only the comparison runs.
    """
    dtype = DTYPES[dtype_name]
    results = []

    def emit(d: dict) -> None:
        results.append(d)
        echo(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items()))

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    for cell in cells:
        try:
            # the kernels' plan (RNNDEPLOY_HANDOFF fixes the hand-off of split grids: every line says it)
            plan = plan_layer(cell, B, H, dtype, torch.device(device))
            handoff = "/".join(_handoff_name(c) for c in (plan.forward, plan.backward))
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
            module_cls = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell]
            ref_module = module_cls(H, H).to(device)
            low_module = module_cls(H, H).to(device=device, dtype=dtype)
            low_module.load_state_dict(ref_module.state_dict())
            x = torch.randn(T, B, H, device=device)
            state = tuple(torch.randn(B, H, device=device) for _ in range(2 if cell == "lstm" else 1))
            probes = [torch.randn(T, B, H, device=device)] + [torch.randn(B, H, device=device) for _ in state]
            ref = _outputs_and_grads(
                _cudnn_layer(cell, ref_module), x, state, ref_module.parameters(), probes
            )
            low_x, low_state = x.to(dtype), tuple(s.to(dtype) for s in state)
            weights = tuple(low_module.parameters())
            cudnn = _outputs_and_grads(_cudnn_layer(cell, low_module), low_x, low_state, weights, probes)
            ours = _outputs_and_grads(_triton_layer(cell, weights), low_x, low_state, weights, probes)
            names = ["y", "h_T", "c_T"][: 1 + len(state)] + ["dx", "dh0", "dc0"][: 1 + len(state)]
            names += [f"d{n}" for n, _ in low_module.named_parameters()]
            for name, r, c, o in zip(names, ref, cudnn, ours, strict=True):
                scale = r.abs().max().item() or 1.0
                err_c = (c - r).abs().max().item() / scale
                err_t = (o - r).abs().max().item() / scale
                ok = bool(torch.isfinite(o).all()) and err_t <= 2 * err_c + 1e-2
                emit({"check": cell, "tensor": name, "triton_err": err_t, "cudnn_err": err_c,
                      "result": "ok" if ok else "FAIL", "handoff": handoff})  # fmt: skip
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
            for mode in MODES if device == "cuda" and timings else ():
                ms = {}
                for provider in ("triton", "cudnn"):
                    step = _case(cell, provider, B, H, T, dtype, mode == "full")
                    step()
                    ms[provider] = do_bench(step, quantiles=QUANTILES, rep=rep_ms)[0]
                emit({"time": cell, "mode": mode, "dtype": dtype_name, "B": B, "H": H, "T": T,
                      "triton_ms": ms["triton"], "cudnn_ms": ms["cudnn"],
                      "speedup": ms["cudnn"] / ms["triton"], "strategy": plan.strategy,
                      "handoff": handoff})  # fmt: skip
        except Exception as e:  # one cell failing leaves the others' lines
            emit({"check": cell, "result": "ERROR", "error": f"{type(e).__name__}: {e}"[:500]})
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    return results
