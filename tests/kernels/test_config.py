"""make_config and the shared launcher, planned for an H100/H200 (sm_90) from a CPU: no GPU needed.

The model's limits hold by construction over the issue's whole grid; a forced strategy that cannot fit is
refused by name (never silently replaced); barrier grids launch cooperatively; a launch that fails for
resources falls back to the next strategy with one warning.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import triton
from kernels_aot import GRID_B, GRID_DTYPES, GRID_H

from rnndeploy.kernels import launch
from rnndeploy.kernels import plan as planner
from rnndeploy.kernels.plan import H100, make_config, model_regs, model_shared, plan_layer
from rnndeploy.kernels.rules import RULES, refusal

CUDA = torch.device("cuda")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INSTALLED = planner.TRITON_VERSION  # before any test sets it
# the triton releases the product meets: the GPU image's, the dev install's, the one torch 2.15 pins
RELEASES = [(3, 6), (3, 8), (3, 9)]


@pytest.fixture(autouse=True)
def _triton_3_8(monkeypatch):
    """Plans as under triton 3.8, whatever is installed: the picks these tests name are 3.8's; the rules of the
    other releases have tests of their own, which set the version themselves."""
    monkeypatch.setattr(planner, "TRITON_VERSION", (3, 8))


@pytest.mark.parametrize("release", RELEASES)
def test_every_grid_pick_fits_the_model(monkeypatch, release):
    """No configuration make_config returns exceeds shared memory, registers or the co-resident grid, under
    each release's rules."""
    monkeypatch.setattr(planner, "TRITON_VERSION", release)
    picked = refused = 0
    for cell in ("rnn", "lstm", "gru"):
        for dtype_name, precision in GRID_DTYPES:
            for B in GRID_B:
                for H in GRID_H:
                    for backward in (False, True):
                        try:
                            cfg = make_config(cell, B, H, DTYPES[dtype_name], CUDA, None, backward, H100,
                                              precision)  # fmt: skip
                        except ValueError as e:
                            assert "Use backend='torch'" in str(e)
                            refused += 1
                            continue
                        picked += 1
                        name = f"{cell} bwd={backward} {dtype_name}/{precision} B={B} H={H}: {cfg}"
                        assert model_shared(cfg, H, DTYPES[dtype_name]) <= H100.shared_per_block, name
                        assert model_regs(cfg, H, DTYPES[dtype_name]) <= H100.regs_per_thread, name
                        if cfg.NSPLIT > 1:
                            assert triton.cdiv(B, cfg.BB) * cfg.NSPLIT <= H100.sms, name
                        if (
                            not cfg.STREAM_W
                        ):  # the held K pieces cover the product's K, per gate when resident
                            per_gate = cfg.strategy == "resident" or not backward or cfg.PARTIAL
                            assert cfg.BK1 + cfg.BK2 >= (H if per_gate else planner.GATES[cell] * H), name
    assert picked > 0.9 * (picked + refused), f"{refused} of {picked + refused} shapes have no configuration"


def test_headline_picks_split_without_padding_the_k_loop(monkeypatch):
    plan = plan_layer("lstm", 16, 768, torch.bfloat16, CUDA, gpu=H100)
    fwd, bwd = plan.forward, plan.backward
    assert plan.strategy == "split", plan
    assert (fwd.BK1, fwd.BK2) == (512, 256), f"forward K must stop at H=768, walks {fwd.BK1}+{fwd.BK2}"
    # the backward by partial sums walks H (its partial's columns) as the forward does
    assert bwd.PARTIAL and (bwd.BK1, bwd.BK2) == (512, 256), bwd
    assert fwd.NSPLIT * triton.cdiv(16, fwd.BB) <= H100.sms
    # where the gate gradients are exchanged instead (GRU H=1024: its partial would spill), K stops at 3H
    gru = make_config("gru", 16, 1024, torch.bfloat16, CUDA, None, True, H100)
    assert gru.strategy == "split" and not gru.PARTIAL and (gru.BK1, gru.BK2) == (2048, 1024), gru


# picks that a release's sm_90 compile spilled inside the time loop (benchmarks/results/kernels-sm90-grid-triton*):
# release, cell, backward, B, H, dtype ("fp32": TF32, "ieee": fp32 without) and the configuration's
# (strategy, tagged, partial, BB, BH, warps, BK1, BK2, NKS)
SPILLED_UNDER = [
    ((3, 9), "lstm", False, 16, 768, "bf16", ("split", True, False, 16, 16, 4, 512, 256, 1)),
    ((3, 9), "gru", False, 16, 768, "bf16", ("split", True, False, 16, 16, 4, 512, 256, 1)),
    ((3, 9), "rnn", False, 16, 768, "bf16", ("split", True, False, 16, 64, 4, 512, 256, 1)),
    ((3, 9), "rnn", False, 1, 768, "bf16", ("split", True, False, 16, 64, 4, 512, 256, 1)),
    ((3, 9), "gru", True, 16, 768, "bf16", ("split", True, True, 16, 16, 8, 512, 256, 1)),
    ((3, 6), "lstm", True, 16, 768, "bf16", ("split", True, True, 16, 16, 8, 512, 256, 1)),
    ((3, 6), "gru", True, 16, 768, "bf16", ("split", True, True, 16, 16, 8, 512, 256, 1)),
    ((3, 6), "lstm", True, 16, 512, "bf16", ("split", True, True, 16, 16, 8, 512, 0, 1)),
    ((3, 6), "rnn", False, 1, 512, "bf16", ("split", True, False, 16, 64, 4, 512, 0, 1)),
    ((3, 6), "lstm", False, 1, 768, "bf16", ("split", True, False, 16, 16, 4, 512, 256, 1)),
    ((3, 6), "rnn", False, 16, 1024, "bf16", ("split", True, False, 16, 64, 8, 1024, 0, 1)),
    ((3, 6), "rnn", True, 1, 1024, "bf16", ("split", True, False, 16, 16, 8, 1024, 0, 16)),
    ((3, 6), "lstm", False, 256, 512, "bf16", ("split", True, False, 32, 32, 8, 512, 0, 1)),
    ((3, 6), "gru", False, 256, 512, "bf16", ("split", True, False, 32, 32, 8, 512, 0, 1)),
    ((3, 9), "gru", True, 16, 512, "fp32", ("split", True, True, 16, 16, 8, 512, 0, 1)),
    ((3, 9), "gru", False, 128, 1024, "ieee", ("split-stream", False, False, 64, 16, 4, 1024, 0, 1)),
    ((3, 6), "lstm", True, 64, 1024, "fp32", ("split-stream", False, False, 32, 16, 8, 4096, 0, 8)),
    ((3, 6), "lstm", False, 64, 1000, "ieee", ("split-stream", False, False, 32, 16, 4, 1024, 0, 1)),
    ((3, 6), "rnn", True, 128, 1024, "ieee", ("split-stream", False, False, 32, 32, 8, 1024, 0, 1)),
]


def _shape(cfg) -> tuple:
    return cfg.strategy, cfg.TAGGED, cfg.PARTIAL, cfg.BB, cfg.BH, cfg.num_warps, cfg.BK1, cfg.BK2, cfg.NKS


@pytest.mark.parametrize("release, cell, backward, B, H, kind, spilled", SPILLED_UNDER)
def test_a_release_never_gets_the_picks_its_compile_spilled(
    monkeypatch, release, cell, backward, B, H, kind, spilled
):
    """Each release's rule refuses what spilled under that release alone: triton 3.8, which compiles it
    without spills, keeps the pick (the cheapest by the estimate); the release gets the next one that fits."""
    dtype, precision = DTYPES["fp32" if kind == "ieee" else kind], "ieee" if kind == "ieee" else "tf32"
    kept = make_config(cell, B, H, dtype, CUDA, None, backward, H100, precision)
    assert _shape(kept) == spilled, f"under 3.8 the estimate's pick is {kept}"
    monkeypatch.setattr(planner, "TRITON_VERSION", release)
    other = make_config(cell, B, H, dtype, CUDA, None, backward, H100, precision)
    assert _shape(other) != spilled, f"triton {release} plans the configuration its compile spilled: {other}"
    assert other.step_us >= kept.step_us, other


def test_every_refusal_rule_is_the_one_that_refuses_some_grid_candidate():
    """No row of the rules table is dead: each is the first to refuse a candidate over the grid that the
    resource models admit, under some release; its text says what it refuses and, release-bound, for which."""
    unseen = set(range(len(RULES)))
    for cell in ("rnn", "lstm", "gru"):
        for dtype_name, precision in GRID_DTYPES:
            for B in GRID_B:
                for H in GRID_H:
                    for backward in (False, True):
                        for strategy in ("resident", "split", "split-stream", "stream"):
                            for cfg in planner._candidates(cell, B, H, strategy, backward, cpu=False):
                                if planner._does_not_fit(cfg, B, H, DTYPES[dtype_name], H100):
                                    continue
                                for release in RELEASES:
                                    first = next(
                                        (i for i, rule in enumerate(RULES)
                                         if rule.matches(cfg, B, dtype_name, precision, release)),
                                        None,
                                    )  # fmt: skip
                                    unseen.discard(first)
                                if not unseen:
                                    return
    assert not unseen, "rows that refuse nothing: " + "; ".join(RULES[i].refuses for i in sorted(unseen))


def test_a_release_bound_refusal_names_its_release():
    cfg = make_config("lstm", 1, 64, torch.float32, CUDA, None, True, H100, "ieee")
    assert refusal(cfg, 1, torch.float32, "ieee", (3, 8)) is None
    text = refusal(cfg, 1, torch.float32, "ieee", (3, 9))
    assert text == "triton 3.9: LSTM IEEE fp32 backward in one program over 64 or more rows aborts the compiler", text
    assert all(rule.refuses and rule.reason for rule in RULES)


def test_the_rules_follow_the_installed_release():
    major, minor = triton.__version__.split(".")[:2]
    assert INSTALLED == (int(major), int(minor)), (INSTALLED, triton.__version__)


@pytest.mark.parametrize(
    "K, unit, expected", [(768, 16, (512, 256)), (1000, 16, (1024, 0)), (33, 16, (32, 16)), (64, 16, (64, 0)),
                          (3072, 256, (2048, 1024)), (2304, 256, (2048, 256))],
)  # fmt: skip
def test_k_pieces(K, unit, expected):
    assert planner._pieces(K, unit) == expected


@pytest.mark.parametrize("H, expected", [(1000, 8), (100, 4), (20, 4), (768, 1), (1024, 1), (33, 1), (1, 1)])
def test_h_divisor_states_what_the_launch_specialization_does_not(H, expected):
    assert planner.h_divisor(H) == expected


def test_ieee_streamed_forward_takes_chunks_that_did_not_spill():
    for H in (768, 1024):
        cfg = make_config("rnn", 256, H, torch.float32, CUDA, None, False, H100, "ieee")
        assert cfg.strategy == "split-stream" and cfg.BKC <= 32, cfg


def test_forced_strategy_that_cannot_fit_is_refused_by_name():
    """fp32 H=1024: a split slice of W_hh does not fit one block; 'split' must not become 'split-stream'."""
    with pytest.raises(
        ValueError, match=r"lstm forward B=16 H=1024 torch.float32 .* strategy split: .*shared"
    ):
        make_config("lstm", 16, 1024, torch.float32, CUDA, "split", False, H100)
    assert (
        make_config("lstm", 16, 1024, torch.float32, CUDA, "split-stream", False, H100).strategy
        == "split-stream"
    )


class FakeKernel:
    """Stands in for a JITFunction: records launches, raises ``errors`` one per launch first."""

    arg_names = ["p_x", "p_w", "p_scr", "p_bar", "T", "B", "H", "SW", "SP"]

    def __init__(self, errors=()):
        self.errors = list(errors)
        self.launches = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches.append((grid, args, kwargs))
            if self.errors:
                raise self.errors.pop(0)

        return run


def _tensors(H, dtype=torch.bfloat16):
    return {"p_x": torch.zeros(2, 16, 4 * H, dtype=dtype), "p_w": torch.zeros(4 * H, H, dtype=dtype)}


@pytest.mark.parametrize("handoff", ["barrier", "tagged"])
def test_split_launch_is_cooperative_and_gets_aligned_buffers(monkeypatch, handoff):
    monkeypatch.setenv("RNNDEPLOY_HANDOFF", handoff)
    cfg = make_config("lstm", 16, 100, torch.bfloat16, CUDA, "split", False, H100)
    assert cfg.TAGGED == (handoff == "tagged")
    kernel = FakeKernel()
    h0 = torch.randn(16, 100)
    ran = launch.launch(kernel, cfg, _tensors(100), 2, 16, 100, 1, h0)
    assert ran == cfg
    (grid, args, kwargs), = kernel.launches  # fmt: skip
    assert grid == (1, cfg.NSPLIT) and kwargs["launch_cooperative_grid"] is True and kwargs["HDIV"] == 4
    assert kwargs["TAGGED"] == cfg.TAGGED
    w, scr, bar = args[1], args[2], args[3]
    assert w.shape == (400, 112) and scr.shape == (2, 16, 112) and bar.shape == (1,)
    assert args[-2:] == (112, 112)
    if handoff == "barrier":
        assert scr.dtype == torch.bfloat16 and torch.equal(scr[1, :, :100], h0.bfloat16())
    else:  # h_0 as tagged words of step 0: bf16 bits in the low half, tag 0 above; buffer 0 all tag 0
        assert scr.dtype == torch.int32 and not (scr >> 16).any()
        bits = scr[1, :, :100].to(torch.int16).view(torch.bfloat16)
        assert torch.equal(bits, h0.bfloat16())
    resident = make_config("lstm", 16, 64, torch.bfloat16, CUDA, "resident", False, H100)
    kernel = FakeKernel()
    launch.launch(kernel, resident, _tensors(64), 2, 16, 64, 1)
    assert "launch_cooperative_grid" not in kernel.launches[0][2]


def test_resource_failure_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(planner, "_FAILED", set())
    monkeypatch.setattr(launch, "_WARNED", set())
    cfg = make_config("lstm", 16, 768, torch.bfloat16, CUDA, None, False, H100)
    assert cfg.strategy == "split"
    error = triton.runtime.errors.OutOfResources(262144, 232448, "shared memory")
    kernel = FakeKernel([error])
    with pytest.warns(RuntimeWarning, match=r"strategy 'split' failed to launch .*running 'split-stream'"):
        ran = launch.launch(kernel, cfg, _tensors(768), 2, 16, 768, 1, gpu=H100)
    assert ran.strategy == "split-stream" and len(kernel.launches) == 2
    assert make_config("lstm", 16, 768, torch.bfloat16, CUDA, None, False, H100).strategy != "split"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same shape failing again does not warn twice
        launch.launch(FakeKernel([error]), cfg, _tensors(768), 2, 16, 768, 1, gpu=H100)


def test_other_launch_errors_are_not_swallowed():
    cfg = make_config("lstm", 16, 768, torch.bfloat16, CUDA, None, False, H100)
    with pytest.raises(TypeError, match="bad argument"):
        launch.launch(FakeKernel([TypeError("bad argument")]), cfg, _tensors(768), 2, 16, 768, 1, gpu=H100)


def test_the_estimate_chooses_each_pass_its_hand_off(monkeypatch):
    """Headline LSTM: the forward's operand is small, tagged words (twice its bytes, no barrier round) win;
    the backward's partial sums carry their tag in the lowest bit (no extra bytes), tagged wins too. Forcing
    either plans that hand-off and costs what the estimate says; the chosen one is never the dearer."""
    plans = {}
    for handoff in ("auto", "barrier", "tagged"):
        monkeypatch.setenv("RNNDEPLOY_HANDOFF", handoff)
        plans[handoff] = plan_layer("lstm", 16, 768, torch.bfloat16, CUDA, gpu=H100)
    auto, barrier, tagged = plans["auto"], plans["barrier"], plans["tagged"]
    assert auto.forward.TAGGED and auto.backward.TAGGED and auto.backward.PARTIAL, auto
    assert not barrier.forward.TAGGED and not barrier.backward.TAGGED
    assert tagged.forward.TAGGED and tagged.backward.TAGGED
    for p in ("forward", "backward"):
        chosen = getattr(auto, p).step_us
        assert chosen <= min(getattr(barrier, p).step_us, getattr(tagged, p).step_us) + 1e-9, p
    est_b = planner.estimate(barrier.forward, 768, torch.bfloat16)
    est_t = planner.estimate(auto.forward, 768, torch.bfloat16)
    assert est_b["barrier_clk"] == H100.barrier_clk and est_t["barrier_clk"] == 0
    # tagged: value and tag per element of the [BB, H] operand, bf16 -> 4 bytes
    assert est_t["l2_bytes"] == 16 * 768 * 4 and est_b["l2_bytes"] == 16 * 768 * 2
    # the partial backward: its [BB, H] partial written, its [BB, BH] columns of all 48 read, fp32 either way
    for plan in (auto, barrier):
        assert (
            planner.estimate(plan.backward, 768, torch.bfloat16)["l2_bytes"] == (16 * 768 + 48 * 16 * 16) * 4
        )
    # exchanged gate gradients would read [BB, 4H]: the partial sums move half the bytes (a quarter the values)
    dg = make_config("lstm", 16, 768, torch.bfloat16, CUDA, "split-stream", True, H100)
    assert not dg.PARTIAL and planner.estimate(dg, 768, torch.bfloat16)["l2_bytes"] >= 16 * 3072 * 2
    # one-program strategies have no hand-off to choose: the switch leaves them alone
    resident = make_config("lstm", 16, 64, torch.bfloat16, CUDA, "resident", False, H100)
    assert not resident.TAGGED


def test_a_bad_hand_off_setting_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("RNNDEPLOY_HANDOFF", "flags")
    with pytest.raises(ValueError, match=r"RNNDEPLOY_HANDOFF must be one of .*'flags'"):
        make_config("lstm", 16, 768, torch.bfloat16, CUDA, None, False, H100)


def test_forced_handoff_restores_the_environment(monkeypatch):
    monkeypatch.delenv("RNNDEPLOY_HANDOFF", raising=False)
    with planner.forced_handoff("tagged"):
        assert make_config("lstm", 16, 768, torch.bfloat16, CUDA, None, True, H100).TAGGED
    assert "RNNDEPLOY_HANDOFF" not in os.environ
    monkeypatch.setenv("RNNDEPLOY_HANDOFF", "barrier")
    with planner.forced_handoff("tagged"):
        pass
    assert os.environ["RNNDEPLOY_HANDOFF"] == "barrier"


def test_triton_3_9_never_plans_the_lstm_ieee_backward_its_compiler_aborts_on(monkeypatch):
    """Triton 3.9 aborts the process compiling LSTM's IEEE fp32 backward in one program with a 64-row block
    (B=1, H=64); the planner gives 3.9 something else, or refuses with the reason, and 3.8 keeps its pick.
    Smaller blocks compile (the sm_90 grid, H=16), so 3.9 keeps one program there."""
    kept = make_config("lstm", 1, 64, torch.float32, CUDA, None, True, H100, "ieee")
    assert kept.NSPLIT == 1, kept
    monkeypatch.setattr(planner, "TRITON_VERSION", (3, 9))
    try:
        other = make_config("lstm", 1, 64, torch.float32, CUDA, None, True, H100, "ieee")
    except ValueError as error:
        assert "aborts the compiler" in str(error), error
    else:
        assert other.NSPLIT > 1, f"triton 3.9 plans the one-program kernel its compiler aborts on: {other}"
    tf32 = make_config("lstm", 1, 64, torch.float32, CUDA, None, True, H100, "tf32")
    assert tf32.NSPLIT == 1, "the TF32 form compiles under 3.9 and keeps its pick"
    for H in (16, 32):
        small = make_config("lstm", 1, H, torch.float32, CUDA, None, True, H100, "ieee")
        assert small.NSPLIT == 1 and small.BH == H, f"16- and 32-row blocks compile under 3.9: {small}"
