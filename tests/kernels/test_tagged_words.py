"""The tagged hand-off's word formats, round-tripped at the steps where their tags wrap.

A reader must get back exactly the value a writer published (16-bit and fp32 values in tagged words) or the
value with at most its lowest mantissa bit changed (the partial sums' parity tag), at any step: 0, the 16-bit
tag's sign and wrap-around, and far beyond. Interpreter on CPU, compiled kernels on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from rnndeploy.kernels.common import _first, _poll, _poll_lsb, _put, _put_lsb, _sum_partials
from rnndeploy.kernels.launch import _tag_word
from rnndeploy.kernels.plan import _pieces

from ..tolerances import PARTIAL_SUM_TOL
from .test_kernels import DEVICE

N = 64
STEPS = [0, 1, 2, 3, 32767, 32768, 65535, 65536, 65537, 100_001]


@triton.jit
def _roundtrip(p_in, p_scr, p_out, tag, N: tl.constexpr, DT: tl.constexpr, LSB: tl.constexpr):
    o = tl.arange(0, N)
    m = o < N - 5  # the last words masked: never written, read back as 0
    v = tl.load(p_in + o).to(tl.float32)
    if LSB:
        _put_lsb(p_scr + o, v, m, tag)
        out = _poll_lsb(_first(p_scr + o, m), p_scr + o, m, tag)
    else:
        _put(p_scr + o, v, m, tag, True, DT)
        out = _poll(_first(p_scr + o, m), p_scr + o, m, tag, DT)
    tl.store(p_out + o, out.to(tl.float32))


_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
def test_tagged_words_give_back_the_value_at_every_step(dtype, step):
    x = (torch.randn(N, device=DEVICE) * 3).to(dtype)
    x[0], x[1], x[2] = -0.0, float("inf"), -65504.0 if dtype == torch.float16 else -1e30
    scr = torch.zeros(N, dtype=_tag_word(dtype), device=DEVICE)
    out = torch.empty(N, device=DEVICE)
    _roundtrip[(1,)](x, scr, out, step, N=N, DT=_TL[dtype], LSB=False)
    want = x.float()
    want[N - 5 :] = 0.0
    assert torch.equal(out, want), (out - want).abs().max()
    # the word holds the step's tag above the value: a reader waiting for another step would not take it
    shift = 32 if dtype == torch.float32 else 16
    assert ((scr[: N - 5] >> shift) & 0xFFFF).eq(step & 0xFFFF).all()


@pytest.mark.parametrize("step", STEPS)
def test_parity_tagged_partials_lose_at_most_their_lowest_bit(step):
    x = torch.randn(N, device=DEVICE) * 1e3
    scr = torch.ones(N, dtype=torch.int32, device=DEVICE)  # what the launcher starts both buffers with
    out = torch.empty(N, device=DEVICE)
    _roundtrip[(1,)](x, scr, out, step, N=N, DT=tl.float32, LSB=True)
    bits_in, bits_out = x.view(torch.int32)[: N - 5], out.view(torch.int32)[: N - 5]
    assert ((bits_in ^ bits_out) & ~1).eq(0).all()  # nothing but the lowest bit differs
    assert (bits_out & 1).eq((step // 2) % 2).all()  # which is the step's parity tag
    assert out[N - 5 :].eq(0).all()


@triton.jit
def _sum_kernel(p_scr, p_out, s, B, H, SP, BB: tl.constexpr, BH: tl.constexpr, NSPLIT: tl.constexpr,
                NJ1: tl.constexpr, NJ2: tl.constexpr, TAGGED: tl.constexpr):  # fmt: skip
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    o_b = i_b * BB + tl.arange(0, BB)
    o_h = i_h * BH + tl.arange(0, BH)
    m_b = o_b < B
    acc = _sum_partials(p_scr, s, o_b, m_b, o_h, B, H, SP, NSPLIT, NJ1, NJ2, TAGGED)
    m = m_b[:, None] & (o_h < H)[None, :]
    tl.store(p_out + o_b[:, None] * H + o_h[None, :], acc, mask=m)


@pytest.mark.parametrize("tagged", [False, True], ids=["barrier", "tagged"])
@pytest.mark.parametrize("B, H, BH, step", [(3, 100, 16, 6), (16, 768, 16, 65537), (5, 33, 16, 1)])
def test_each_program_sums_its_columns_of_everyones_partials(tagged, B, H, BH, step):
    """The partial backward's reduction over a whole split grid (48 programs at H=768: two pieces, 32 + 16),
    from partials already published for this step; the other buffer holds garbage of the wrong tag."""
    nsplit = -(-H // BH)
    nj1, nj2 = _pieces(nsplit, 1)
    SP = -(-H // 16) * 16
    part = torch.randn(2, nsplit, B, SP, device=DEVICE) * 10
    want = part[step % 2, :, :, :H].sum(0)
    if tagged:  # step's parity in the lowest bit of this buffer, the other parity in the other one
        words = part.view(torch.int32) & -2
        words[step % 2] |= (step // 2) % 2
        words[1 - step % 2] |= 1 - (step // 2) % 2
        scr = words
        want = words[step % 2, :, :, :H].view(torch.float32).sum(0)
    else:
        scr = part
    out = torch.full((B, H), float("nan"), device=DEVICE)
    _sum_kernel[(triton.cdiv(B, 16), nsplit)](scr, out, step, B, H, SP, BB=16, BH=BH, NSPLIT=nsplit, NJ1=nj1,
                                              NJ2=nj2, TAGGED=tagged)  # fmt: skip
    atol, rtol = PARTIAL_SUM_TOL
    torch.testing.assert_close(out, want, atol=atol, rtol=rtol)
