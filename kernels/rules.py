"""The configurations the planner refuses although the resource models admit them, one row each with its reason.

The models (`rnndeploy.kernels.plan.model_shared`, `model_regs`) bound what a kernel allocates; they do not
see where the compiler's code generation spills inside the time loop, or a compiler that aborts. Each row
names what it refuses (the block shape, cell, pass, dtype, precision and triton releases it matches) and why;
`refusal` applies the table in order and returns the first match's text. A row with releases applies only
when the planner plans for one of them (``rnndeploy.kernels.plan.TRITON_VERSION``): code generation differs
by release, and each release's rows stand on that release's sm_90 compile of the whole grid
(tests/kernels/test_compile_sm90.py, benchmarks/results/kernels-sm90-grid-triton*).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .plan import KernelConfig

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_OPS = {"==": operator.eq, ">": operator.gt, ">=": operator.ge}
# the block-shape quantities a row may test, from the configuration
_SHAPES = {
    "K": lambda cfg: cfg.BK1 + cfg.BK2,  # the held K pieces together
    "K piece": lambda cfg: max(cfg.BK1, cfg.BK2),
    "second K piece": lambda cfg: cfg.BK2,
    "tile": lambda cfg: cfg.BB * cfg.BH,  # the [BB, BH] elementwise tile
    "BB": lambda cfg: cfg.BB,
    "BH": lambda cfg: cfg.BH,
    "BKC": lambda cfg: cfg.BKC,
    "NKS": lambda cfg: cfg.NKS,
}


@dataclass(frozen=True)
class Rule:
    """One refusal. Every field left ``None`` matches anything; the row applies where all the others match.

    ``since``/``before``: the triton releases it holds for (``since <= release < before``; a row with either
    prefixes its text with the release). ``split``: a grid of several programs (``True``) or one (``False``).
    ``streamed``: ``W_hh`` streamed (``stream``, ``split-stream``) or held. ``masked_rows``: the batch is not a
    multiple of 16 (the last batch block has masked rows). ``shape``: ``(quantity, op, value)`` tests on the
    block shape, quantities from ``_SHAPES``.
    """

    refuses: str
    reason: str
    since: tuple[int, int] | None = None
    before: tuple[int, int] | None = None
    cells: frozenset[str] | None = None
    backward: bool | None = None
    dtypes: frozenset[str] | None = None
    precisions: frozenset[str] | None = None
    strategies: frozenset[str] | None = None
    split: bool | None = None
    streamed: bool | None = None
    tagged: bool | None = None
    partial: bool | None = None
    masked_rows: bool | None = None
    warps: frozenset[int] | None = None
    shape: tuple[tuple[str, str, int], ...] = ()

    def matches(
        self, cfg: KernelConfig, B: int, dtype: str, precision: str, version: tuple[int, int]
    ) -> bool:
        fields = (
            self.since is None or version >= self.since,
            self.before is None or version < self.before,
            self.cells is None or cfg.cell in self.cells,
            self.backward is None or cfg.backward == self.backward,
            self.dtypes is None or dtype in self.dtypes,
            self.precisions is None or precision in self.precisions,
            self.strategies is None or cfg.strategy in self.strategies,
            self.split is None or (cfg.NSPLIT > 1) == self.split,
            self.streamed is None or cfg.STREAM_W == self.streamed,
            self.tagged is None or cfg.TAGGED == self.tagged,
            self.partial is None or cfg.PARTIAL == self.partial,
            self.masked_rows is None or (B % 16 != 0) == self.masked_rows,
            self.warps is None or cfg.num_warps in self.warps,
        )
        if not all(fields):
            return False
        return all(_OPS[op](_SHAPES[name](cfg), value) for name, op, value in self.shape)

    def text(self, version: tuple[int, int]) -> str:
        if self.since is None and self.before is None:
            return self.refuses
        return "triton {}.{}: ".format(*version) + self.refuses


_FP32 = frozenset({"fp32"})
_IEEE = frozenset({"ieee"})

# NOTE: IEEE fp32 rows: without tensor cores tl.dot is an FMA outer product held in registers, so the size of
# one product decides whether a kernel spills.
RULES: tuple[Rule, ...] = (
    Rule(
        "IEEE fp32 product over K > 256 in registers",
        "an FMA outer product over K > 256 in one product spills per thread; the streamed chunks keep it small",
        dtypes=_FP32,
        precisions=_IEEE,
        strategies=frozenset({"split"}),
        shape=(("K piece", ">", 256),),
    ),
    Rule(
        "IEEE fp32 streamed chunk of 64 in registers",
        "the RNN forward's FMA outer product per streamed 64-wide chunk spills per step where 32-wide chunks "
        "do not, at the same estimate",
        cells=frozenset({"rnn"}),
        backward=False,
        dtypes=_FP32,
        precisions=_IEEE,
        streamed=True,
        shape=(("BKC", "==", 64),),
    ),
    Rule(
        "IEEE fp32: eight slice sums over a 512-element tile",
        "eight FMA slice sums over a [32, 16] tile spill per step where four do not",
        backward=True,
        dtypes=_FP32,
        precisions=_IEEE,
        streamed=True,
        shape=(("NKS", "==", 8), ("tile", ">=", 512)),
    ),
    Rule(
        "IEEE fp32 partial product over K > 128 in registers",
        "the partial product [BB, G*BH] x [G*BH, K] as an FMA outer product spills per step beyond K=128",
        dtypes=_FP32,
        precisions=_IEEE,
        partial=True,
        shape=(("K", ">", 128),),
    ),
    Rule(
        "IEEE fp32 with tagged words in registers",
        "the FMA outer product in registers and the poll's words beside it spill per step",
        dtypes=_FP32,
        precisions=_IEEE,
        split=True,
        tagged=True,
    ),
    Rule(
        "fp16 tagged words with masked batch rows",
        "the fp16 tagged forward with masked batch rows spills per step, where bf16 and full 16-row blocks do not",
        backward=False,
        dtypes=frozenset({"fp16"}),
        split=True,
        tagged=True,
        masked_rows=True,
    ),
    Rule(
        "tagged streamed gate gradients over a wide tile",
        "a streamed backward polling wide gate-gradient tiles spills per step",
        backward=True,
        streamed=True,
        tagged=True,
        partial=False,
        shape=(("tile", ">", 512),),
    ),
    Rule(
        "GRU fp32 tagged partial sums at K=512 with masked batch rows",
        "GRU's fp32 partial sums with masked batch rows spill per step over K=512",
        cells=frozenset({"gru"}),
        dtypes=_FP32,
        tagged=True,
        partial=True,
        masked_rows=True,
        shape=(("K", "==", 512),),
    ),
    Rule(
        "LSTM IEEE fp32 backward in one program over 64 or more rows aborts the compiler",
        "triton 3.9's LLVM aborts the whole process (an SLP-vectorizer assertion) compiling LSTM's IEEE fp32 "
        "backward in one program with a 64-row block; 16- and 32-row blocks and the TF32 form compile",
        since=(3, 9),
        cells=frozenset({"lstm"}),
        backward=True,
        dtypes=_FP32,
        precisions=_IEEE,
        split=False,
        shape=(("BH", ">=", 64),),
    ),
    Rule(
        "tagged forward over two held K pieces in one warpgroup",
        "the tagged forward over two held K pieces in one warpgroup reaches 255 registers and spills per step; "
        "a warpgroup per 64 rows (BH doubled, 8 warps) does not",
        since=(3, 9),
        backward=False,
        split=True,
        streamed=False,
        tagged=True,
        warps=frozenset({4}),
        shape=(("second K piece", ">", 0),),
    ),
    Rule(
        "GRU tagged partial sums over two K pieces",
        "GRU's tagged partial sums over two K pieces spill per step, where LSTM's do not",
        since=(3, 9),
        cells=frozenset({"gru"}),
        split=True,
        tagged=True,
        partial=True,
        shape=(("BH", "==", 16), ("second K piece", ">", 0)),
    ),
    Rule(
        "GRU fp32 tagged partial sums at K=512",
        "what spills under 3.8 with masked batch rows alone spills with full ones too",
        since=(3, 9),
        cells=frozenset({"gru"}),
        dtypes=_FP32,
        split=True,
        tagged=True,
        partial=True,
        shape=(("K", "==", 512),),
    ),
    Rule(
        "IEEE fp32 gated streamed forward over a 1024-element tile",
        "the gated cells' FMA outer product of a streamed chunk over a 1024-element tile spills per step; "
        "2048-element tiles in 8 warps do not",
        since=(3, 9),
        cells=frozenset({"lstm", "gru"}),
        backward=False,
        dtypes=_FP32,
        precisions=_IEEE,
        split=True,
        streamed=True,
        shape=(("tile", "==", 1024),),
    ),
    Rule(
        "backward by partial sums",
        "the partial products' fp32 results, stored and polled one element each, spill per step",
        before=(3, 8),
        split=True,
        partial=True,
    ),
    Rule(
        "tagged words with masked batch rows",
        "held tagged words with masked batch rows spill per step, where full 16-row blocks do not",
        before=(3, 8),
        split=True,
        streamed=False,
        tagged=True,
        masked_rows=True,
    ),
    Rule(
        "LSTM fp32 streamed over a 512-element tile",
        "LSTM's fp32 streamed kernels over 512-element tiles spill per step; GRU's and RNN's do not",
        before=(3, 8),
        cells=frozenset({"lstm"}),
        dtypes=_FP32,
        split=True,
        streamed=True,
        shape=(("tile", "==", 512),),
    ),
    Rule(
        "RNN IEEE fp32 streamed backward over a [32, 32] tile in 8 warps",
        "RNN's IEEE streamed backward over a [32, 32] tile in 8 warps gets too few registers a thread and "
        "spills per step; 4 warps get twice the registers",
        before=(3, 8),
        cells=frozenset({"rnn"}),
        backward=True,
        dtypes=_FP32,
        precisions=_IEEE,
        split=True,
        streamed=True,
        warps=frozenset({8}),
        shape=(("tile", "==", 1024),),
    ),
    Rule(
        "tagged forward over more than 16 batch rows",
        "the tagged forward over 32 batch rows spills per step, where 16 rows at the same BH do not",
        before=(3, 8),
        backward=False,
        split=True,
        streamed=False,
        tagged=True,
        shape=(("BB", ">", 16),),
    ),
    Rule(
        "RNN tagged forward with two warpgroups over 64 rows",
        "two warpgroups over RNN's 64 rows, each reading the whole tagged operand, spill per step, where the "
        "gated cells' 8-warp forward at the same K does not",
        before=(3, 8),
        cells=frozenset({"rnn"}),
        backward=False,
        split=True,
        streamed=False,
        tagged=True,
        warps=frozenset({8}),
    ),
)


def refusal(
    cfg: KernelConfig, B: int, dtype: torch.dtype, precision: str, version: tuple[int, int]
) -> str | None:
    """The text of the first row of `RULES` that refuses ``cfg`` at batch ``B`` when triton ``version``
    compiles it for sm_90; ``None`` when none does."""
    name = _DTYPE_NAMES.get(dtype, str(dtype))
    for rule in RULES:
        if rule.matches(cfg, B, name, precision, version):
            return rule.text(version)
    return None
