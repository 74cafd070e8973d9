"""The one launcher every cell uses: the exchange scratch and barrier counters, the block sizes of a
`KernelConfig` as the kernel's constexprs, and the fallback to the next strategy when a launch fails for
resources on a GPU."""

from __future__ import annotations

import re
import warnings

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from .plan import GPUSpec, KernelConfig, dot_precision, h_divisor, make_config, record_failure

# the order a failed launch falls back along (each also tried with smaller blocks by make_config)
_FALLBACK = {
    "resident": "stream",
    "split": "split-stream",
    "split-stream": "stream",
    "resident-scratch": "stream",
    "resident-tagged": "stream",
    "resident-partial": "stream",
    "resident-partial-tagged": "stream",
}

_RESOURCE_ERROR = re.compile(
    r"out of resource|too many resources|cooperative launch|TOO_LARGE", re.IGNORECASE
)
_WARNED: set[tuple] = set()


def launch(
    kernel: triton.JITFunction,
    config: KernelConfig,
    tensors: dict[str, Tensor | None],
    T: int,
    B: int,
    H: int,
    scratch_gates: int,
    first_operand: Tensor | None = None,
    gpu: GPUSpec | None = None,
    **flags,
) -> KernelConfig:
    """Launches one pass: allocates the exchange scratch ``[2, B, scratch_gates*H]`` (compute dtype, rows
    padded to 16 elements, as are ``W_hh``'s when ``H % 16 != 0``; the partial backward's ``[2, NSPLIT, B, H]``
    fp32) and the barrier counters, passes every ``p_*`` argument by name from ``tensors``, the block sizes of
    ``config``
    and ``flags`` (the kernel's other constexprs). ``first_operand`` is what the first step reads from the
    scratch (``h_0`` forward). Barrier grids launch cooperatively.

    Where a launch fails for resources on a GPU, the next strategy (``split`` -> ``split-stream`` ->
    ``stream``) runs instead, with one warning, and later layers of that shape skip the failed one.
    Returns the configuration that ran. ``gpu`` plans the fallback for that target instead of the current
    device (tests).
    """
    ref = next(t for name, t in tensors.items() if t is not None and name != "p_len")
    # NOTE: rows of W_hh and of the scratch are padded with zeros to 16 elements and loaded up to the padded
    # width, so every load of them vectorizes: with H % 16 != 0 unpadded rows load one scalar at a time, an
    # address register each, and the sm_90 code spills
    SW = -(-H // 16) * 16
    SP = SW if config.PARTIAL else -(-scratch_gates * H // 16) * 16
    # NOTE: the rows of the other H-strided tensors (inputs, outputs, workspace) cannot be padded without a
    # copy; HDIV tells the compiler the power of two H is a multiple of (H=1000: 8), enough for vectorized
    # loads and stores. Without it every element gets an address of its own, and the sm_90 code spills per step
    w = tensors["p_w"]
    if SW != H:
        tensors = {**tensors, "p_w": F.pad(w, (0, SW - H))}
    while True:
        scr = bar = None
        if config.PARTIAL:
            # everyone's fp32 partial dh, double-buffered; tagged: every word at bit 1, which steps 0 and 1
            # do not write (common._put_lsb)
            shape = (2, config.NSPLIT, B, SP)
            if config.TAGGED:
                scr = torch.ones(shape, dtype=torch.int32, device=ref.device)
            else:
                scr = torch.zeros(shape, dtype=torch.float32, device=ref.device)
        elif config.SCRATCH:
            # zeros: the padding columns meet W_hh's zero padding in the product (empty could hold NaN);
            # tagged: tag 0 (h_0's, written here), which no kernel step writes into buffer 0 first
            word = _tag_word(ref.dtype) if config.TAGGED else ref.dtype
            scr = torch.zeros(2, B, SP, dtype=word, device=ref.device)
            if first_operand is not None:
                scr[1, :, :H].copy_(_tagged(first_operand, ref.dtype) if config.TAGGED else first_operand)
        if config.NSPLIT > 1:
            bar = torch.zeros(triton.cdiv(B, config.BB), dtype=torch.int32, device=ref.device)
        args = {**tensors, "p_scr": scr, "p_bar": bar}
        pointers = [args[name] for name in kernel.arg_names if name.startswith("p_")]
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        if config.NSPLIT > 1:
            options["launch_cooperative_grid"] = True
        # the backward kernels' partial-sum constexprs (the forward kernels have none)
        pieces = (("PARTIAL", config.PARTIAL), ("NJ1", config.NJ[0]), ("NJ2", config.NJ[1]))
        extra = {k: v for k, v in pieces if k in kernel.arg_names}
        try:
            kernel[config.grid(B)](
                *pointers, T, B, H, SW, SP,
                BB=config.BB, BH=config.BH, BK1=config.BK1, BK2=config.BK2, BKC=config.BKC, NKS=config.NKS,
                NSPLIT=config.NSPLIT, STREAM_W=config.STREAM_W, SCRATCH=config.SCRATCH,
                PRECISION=dot_precision(ref.dtype), HDIV=h_divisor(H), TAGGED=config.TAGGED, **extra, **flags,
                **options,
            )  # fmt: skip
            return config
        except Exception as e:
            on_gpu = ref.device.type == "cuda" or gpu is not None
            if not on_gpu or not _RESOURCE_ERROR.search(str(e)) or config.strategy == "stream":
                raise
            config = _fall_back(config, B, H, ref.dtype, e, gpu)


def _fall_back(
    config: KernelConfig, B: int, H: int, dtype: torch.dtype, error: Exception, gpu: GPUSpec | None
):
    """The next strategy along `_FALLBACK` that has a configuration, with one warning per shape."""
    record_failure(config, B, H, dtype)
    pass_ = "backward" if config.backward else "forward"
    nxt = _FALLBACK.get(config.strategy)
    while nxt is not None:
        try:
            new = make_config(config.cell, B, H, dtype, torch.device("cuda"), nxt, config.backward, gpu,
                              dot_precision(dtype))  # fmt: skip
            break
        except ValueError:
            nxt = _FALLBACK.get(nxt)
    else:
        raise RuntimeError(
            f"rnndeploy.kernels: {config.cell} {pass_} B={B} H={H} {dtype}: strategy {config.strategy!r} failed "
            f"to launch ({error}) and no other strategy fits: use backend='torch' for this layer"
        ) from error
    key = (config.cell, config.backward, B, H, dtype, config.strategy)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(
            f"rnndeploy.kernels: {config.cell} {pass_} B={B} H={H} {dtype}: strategy {config.strategy!r} "
            f"failed to launch ({str(error).splitlines()[0][:200]}); running {nxt!r} instead",
            RuntimeWarning,
            stacklevel=4,
        )
    return new


def _tag_word(dtype: torch.dtype) -> torch.dtype:
    """The scratch's element of the tagged hand-off: value and tag in one word."""
    return torch.int64 if dtype == torch.float32 else torch.int32


def _tagged(values: Tensor, dtype: torch.dtype) -> Tensor:
    """``values`` in ``dtype`` as tagged words of tag 0 (what `_put` stores at step -1)."""
    v = values.to(dtype).contiguous()
    if dtype == torch.float32:
        return v.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return v.view(torch.int16).to(torch.int32) & 0xFFFF
