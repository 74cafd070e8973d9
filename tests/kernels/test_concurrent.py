"""The split strategies' cross-program hand-offs, executed: every program of a launch in its own interpreter
thread (tests/kernels/concurrent.py), under greedy and seeded random schedules.

Each case plans a split grid through the planner's own candidates (``common._candidates``, the list
``make_config`` chooses from; the product refuses split strategies off a GPU), runs forward and backward, and
checks outputs, final states and every gradient against the fp32 reference and against the one-program
``resident`` kernel on the same inputs.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import replace
from types import ModuleType

import pytest
import torch
import triton

from rnndeploy import kernels as product_kernels

from .concurrent import Deadlock, Schedule, Stats, concurrent_programs, unsupported_reason
from .test_kernels import DTYPE_NAME, TOL, assert_near, make_layer, run_with_grads

_REASON = unsupported_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

GREEDY = Schedule("greedy")
RANDOM = Schedule("random", seed=1)


def split_plan(mod: ModuleType, cell: str, B: int, H: int, strategy: str, tagged: bool, partial: bool,
               BH: int = 16):  # fmt: skip
    """The layer plan of a split grid from the planner's interpreter-sized candidates (``cpu=True``), with
    ``BH`` units per program (``cdiv(H, BH)`` programs per batch block) and the hand-off and backward form
    asked for."""
    common = mod.common

    def pick(backward: bool):
        for cfg in common._candidates(cell, B, H, strategy, backward, cpu=True):
            if cfg.tagged == tagged and cfg.PARTIAL == (backward and partial):
                return replace(cfg, BH=BH, NSPLIT=triton.cdiv(H, BH))
        raise AssertionError(f"no {strategy} candidate of {cell} B={B} H={H} tagged={tagged} partial={partial}")

    return common.LayerPlan(pick(False), pick(True))


@contextlib.contextmanager
def planned(mod: ModuleType, plan):
    """Inside, ``mod.triton_layer`` runs ``plan`` (it looks ``plan_layer`` up in ``common`` at each call)."""
    common = mod.common
    saved = common.plan_layer
    common.plan_layer = lambda *args, **kwargs: plan
    try:
        yield
    finally:
        common.plan_layer = saved


def run_layer(mod, cell, nl, x, state, weights, plan, probes=None):
    def fn(*args, **kwargs):
        return mod.triton_layer(*args, **kwargs)

    with planned(mod, plan):
        return run_with_grads(fn, cell, x, state, weights, None, False, nl, probes)


def check_split(mod, cell, nl, B, T, H, dtype, strategy, tagged, partial, schedule, BH=16,
                plan=None) -> Stats:  # fmt: skip
    """Runs the split plan concurrently under ``schedule`` and checks it against the reference and against
    ``resident``; returns what the launches did."""
    x, state, weights, _ = make_layer(cell, B, T, H, dtype)
    plan = plan or split_plan(mod, cell, B, H, strategy, tagged, partial, BH)
    with concurrent_programs(schedule) as stats:
        outs, grads, probes = run_layer(mod, cell, nl, x, state, weights, plan)
    # one program: the interpreter's own sequential launch
    res_outs, res_grads, _ = run_layer(
        mod, cell, nl, x, state, weights, mod.common.plan_layer(cell, B, H, dtype, x.device, "resident"), probes
    )
    f32 = [None if t is None else t.detach().float().requires_grad_() for t in (x, *state, *weights)]
    n = len(state)
    ref_outs, ref_grads, _ = run_with_grads(
        product_kernels.reference_layer, cell, f32[0], tuple(f32[1 : 1 + n]), tuple(f32[1 + n :]), None, False, nl,
        probes,
    )  # fmt: skip
    names = ["y", "h_T", "c_T"][: len(outs)]
    names += ["dx", "dh0", "dc0"][: 1 + n] + ["dw_ih", "dw_hh", "db_ih", "db_hh"]
    for name, a, r, ref in zip(names, (*outs, *grads), (*res_outs, *res_grads), (*ref_outs, *ref_grads),
                               strict=True):  # fmt: skip
        assert_near(f"{name} (reference)", a, ref, dtype)
        assert_near(f"{name} (resident)", a, r.float(), dtype)
    return stats


def _id(cell, nl, B, T, H, dtype, strategy, tagged, partial, schedule, BH=16):
    name = cell if cell != "rnn" else f"rnn_{nl}"
    handoff = "tagged" if tagged else "barrier"
    bwd = "partial" if partial else "exchanged"
    return f"{name}-B{B}-T{T}-H{H}-BH{BH}-{DTYPE_NAME[dtype]}-{strategy}-{handoff}-{bwd}-{schedule}"


def test_lstm_split_forward_and_backward_run_concurrently():
    stats = check_split(product_kernels, "lstm", "tanh", 3, 4, 40, torch.float32, "split", False, True, GREEDY)
    assert stats.programs == [3, 3], stats.programs  # forward and backward: three programs each
    assert stats.switches > 0
