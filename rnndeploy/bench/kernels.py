"""Timing the persistent kernels against torch.nn (cuDNN) and the plain reference, and the headline check (GPU only).

``run_benchmark`` measures, ``run_logged`` also keeps a JSON line per finished case, ``write_results`` writes
the JSON, CSV and PNG; ``rnndeploy bench kernels`` and benchmarks/gpu_session.sh call them.
"""

from __future__ import annotations

import csv
import itertools
import json
import platform
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from torch import Tensor
from triton.testing import do_bench

from rnndeploy.checkpoint import atomic_write
from rnndeploy.kernels import reference_layer, triton_layer
from rnndeploy.kernels.plan import plan_layer
from rnndeploy.provenance import git_commit

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

    Each case runs in its own ``try``: one that raises becomes a `Failure` and the grid goes on.
    ``on_result`` sees every row and failure as soon as it exists (``run_logged`` writes it as a JSON line then), so
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
                # after the run: a strategy that failed to launch has been replaced (rnndeploy.kernels.launch)
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


def run_logged(
    lines_path: Path, env: dict, *grid, progress: Callable[[str], None] | None = None, **options
) -> tuple[list[Row], list[Failure], bool]:
    """`run_benchmark` appending one JSON line per finished case to ``lines_path`` as it finishes.

    ``grid`` and ``options`` are `run_benchmark`'s. Ctrl-C and SIGTERM (what ``timeout`` sends) end the
    run early and keep what finished. Returns the rows, the failures and whether the run was interrupted.
    """
    rows: list[Row] = []
    failures: list[Failure] = []

    def stop(signum, frame):
        raise KeyboardInterrupt

    def record(result: Row | Failure) -> None:
        (rows if isinstance(result, Row) else failures).append(result)
        kind = "row" if isinstance(result, Row) else "failure"
        lines.write(json.dumps({kind: asdict(result), "commit": env["commit"]}) + "\n")
        lines.flush()

    interrupted = False
    previous = signal.signal(signal.SIGTERM, stop)
    with open(lines_path, "a") as lines:
        lines.write(json.dumps({"environment": env}) + "\n")
        try:
            run_benchmark(*grid, progress=progress, on_result=record, **options)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            signal.signal(signal.SIGTERM, previous)
    return rows, failures, interrupted


def table(rows: list[Row]) -> str:
    """The rows as a fixed-width text table."""
    lines = [
        f"{'cell':5} {'mode':8} {'provider':9} {'dtype':5} {'B':>4} {'H':>5} {'T':>5} "
        f"{'ms':>9} {'p20':>9} {'p80':>9} {'peak MiB':>9}  strategy"
    ]
    for r in rows:
        lines.append(
            f"{r.cell:5} {r.mode:8} {r.provider:9} {r.dtype:5} {r.batch:>4} {r.hidden:>5} {r.seq_len:>5} "
            f"{r.ms:9.3f} {r.ms_p20:9.3f} {r.ms_p80:9.3f} {r.peak_mib:9.1f}  {r.strategy}"
        )
    return "\n".join(lines)


def write_results(
    rows: list[Row], env: dict, options: dict, out_dir: Path, failures: list[Failure] | None = None
) -> list[Path]:
    """Writes ``kernels.json`` (environment, options, rows, speedups, failures), ``kernels.csv``, ``kernels.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [asdict(r) for r in rows]
    faster = speedups(rows)
    doc = {"environment": env, "options": options, "rows": records, "speedups": faster,
           "failures": [asdict(f) for f in failures or []]}  # fmt: skip
    paths = [out_dir / "kernels.json", out_dir / "kernels.csv", out_dir / "kernels.png"]
    atomic_write(paths[0], lambda p: Path(p).write_text(json.dumps(doc, indent=1)))

    def write_csv(p: str) -> None:
        with open(p, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*records[0], *env])
            writer.writeheader()
            writer.writerows({**r, **env} for r in records)

    atomic_write(paths[1], write_csv)

    cells = sorted({r.cell for r in rows})
    modes = sorted({r.mode for r in rows})
    size = (6 * len(modes), 3.5 * len(cells))
    fig, axes = plt.subplots(len(cells), len(modes), figsize=size, squeeze=False)
    for (i, cell), (j, mode) in ((a, b) for a in enumerate(cells) for b in enumerate(modes)):
        ax = axes[i][j]
        series: dict[tuple, list] = {}
        for s in faster:
            if s["cell"] == cell and s["mode"] == mode:
                line = series.setdefault((s["dtype"], s["seq_len"], s["hidden"]), [])
                line.append((s["batch"], s["speedup"]))
        for (dtype, T, H), pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{dtype} T={T} H={H}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{cell} {mode}: cuDNN ms / Triton ms")
        ax.set_xlabel("batch")
        if series:
            ax.legend(fontsize=6)
    fig.suptitle(f"{env.get('device', '?')} (commit {env.get('commit', '?')[:10]})")
    fig.tight_layout()
    atomic_write(paths[2], lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    return paths


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
