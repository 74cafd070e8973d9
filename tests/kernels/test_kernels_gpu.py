"""GPU-only checks of the kernels: low precision, large shapes, every launch strategy, long sequences.

Skipped without CUDA (tests/conftest.py). fp32 comparisons switch TF32 off so the kernels and cuDNN compute
the same thing.
"""

from __future__ import annotations

import pytest
import torch

from rnndeploy import kernels
from rnndeploy.bench.kernels import headline
from rnndeploy.kernels.plan import H100, STRATEGIES, forced_handoff, make_config, plan_layer

from ..tolerances import AUTOCAST_BF16_TOL, GPU_FP32_GRAD_TOL, GPU_FP32_TOL, LONG_SEQUENCE_TOL
from .test_kernels import assert_matches_reference, make_layer

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("B, T, H", [(3, 33, 100), (16, 64, 256)], ids=["B3-T33-H100", "B16-T64-H256"])
def test_low_precision_matches_reference(cell, dtype, B, T, H):
    assert_matches_reference(cell, "tanh", B, T, H, dtype, True, True, True, device="cuda")


def _strategy_cases():
    # each strategy at the largest H (of these) it holds for fp32 without TF32 (what these tests compare), as
    # make_config plans it for an H100/H200, split grids behind the grid barrier (IEEE fp32 takes no tagged
    # words: test_split_grids_each_hand_off covers those); T=1024 everywhere
    cases = []
    for cell in ("rnn", "lstm", "gru"):
        for strategy in STRATEGIES:
            handoff = "barrier" if strategy in ("split", "split-stream") else "auto"
            for H in (1024, 768, 256, 128, 64, 32, 16):
                try:
                    with forced_handoff(handoff):
                        for backward in (False, True):
                            make_config(cell, 16, H, torch.float32, CUDA, strategy, backward, H100, "ieee")
                except ValueError:
                    continue
                name = f"{cell}-B16-T1024-H{H}-fp32-{strategy}" + ("" if handoff == "auto" else f"-{handoff}")
                cases.append(pytest.param(cell, strategy, H, handoff, id=name))
                break
    return cases


def _handoff_cases():
    # split grids in bf16 (tensor cores) with each hand-off forced, at the largest H (of these) both passes
    # plan for, T=64: the forward's tagged words, the backward's partial sums or exchanged gate gradients
    cases = []
    for cell in ("rnn", "lstm", "gru"):
        for strategy in ("split", "split-stream"):
            for handoff in ("barrier", "tagged"):
                for H in (768, 512, 256, 128):
                    try:
                        with forced_handoff(handoff):
                            for backward in (False, True):
                                make_config(cell, 16, H, torch.bfloat16, CUDA, strategy, backward, H100)
                    except ValueError:
                        continue
                    cases.append(pytest.param(cell, strategy, H, handoff, id=f"{cell}-B16-T64-H{H}-bf16-{strategy}-"
                                              f"{handoff}"))  # fmt: skip
                    break
    return cases


@pytest.mark.parametrize("cell, strategy, H, handoff", _handoff_cases())
def test_split_grids_each_hand_off_match_reference(monkeypatch, cell, strategy, H, handoff):
    """Outputs, final states and every gradient against the fp32 reference, bf16, each hand-off forced."""
    monkeypatch.setenv("RNNDEPLOY_HANDOFF", handoff)
    plan = plan_layer(cell, 16, H, torch.bfloat16, CUDA, strategy)
    assert plan.forward.TAGGED == (handoff == "tagged") or plan.forward.NSPLIT == 1, plan
    assert_matches_reference(cell, "tanh", 16, 64, H, torch.bfloat16, True, True, True, strategy=strategy,
                             device="cuda")  # fmt: skip


@pytest.mark.parametrize("cell, strategy, H, handoff", _strategy_cases())
def test_large_shapes_every_strategy_match_cudnn(monkeypatch, cell, strategy, H, handoff):
    """Forward and every gradient against torch.nn (cuDNN) on the same weights, one layer, fp32."""
    monkeypatch.setenv("RNNDEPLOY_HANDOFF", handoff)
    T, B = 1024, 16
    x, state, weights, _ = make_layer(cell, B, T, H, device="cuda")
    module = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](4, H).cuda()
    with torch.no_grad():
        for p, w in zip(module.parameters(), weights, strict=True):
            p.copy_(w)
    plan = plan_layer(cell, B, H, torch.float32, torch.device("cuda"), strategy)
    assert plan.strategy == strategy, f"forced {strategy!r}, planned {plan}"
    if handoff != "auto":
        assert plan.forward.TAGGED == plan.backward.TAGGED == (handoff == "tagged"), plan
    y, final = kernels.triton_layer(cell, x, state, weights, strategy=strategy)
    hx = tuple(s[None] for s in state)
    y_ref, final_ref = module(x, hx if cell == "lstm" else hx[0])
    final_ref = final_ref if isinstance(final_ref, tuple) else (final_ref,)
    probes = [torch.randn_like(t) for t in (y, *final)]
    loss = sum((t * p).sum() for t, p in zip((y, *final), probes, strict=True))
    loss_ref = sum((t * p).sum() for t, p in zip((y_ref, *(f[0] for f in final_ref)), probes, strict=True))
    grads = torch.autograd.grad(loss, [x, *state, *weights])
    grads_ref = torch.autograd.grad(loss_ref, [x, *hx, *module.parameters()])
    atol, rtol = GPU_FP32_TOL
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    atol, rtol = GPU_FP32_GRAD_TOL
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b.view_as(a), atol=atol, rtol=rtol)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_headline_configuration_matches_cudnn(cell):
    """bf16 B=16 T=1024 H=768 as the dispatcher plans it (split, K walked as 512 + 256): outputs and every
    gradient no further from fp32 cuDNN than cuDNN's own bf16 run (twice its error plus 1e-2)."""
    plan = plan_layer(cell, 16, 768, torch.bfloat16, torch.device("cuda"))
    assert plan.forward.strategy == "split" and (plan.forward.BK1, plan.forward.BK2) == (512, 256), plan
    results = headline(cells=(cell,), echo=lambda line: None, timings=False)
    checks = [r for r in results if "check" in r]
    assert checks and all(r["result"] == "ok" for r in checks), checks


def test_long_sequence_does_not_drift():
    """T=10k in fp32 against the float64 reference: the fp32 state carries no accumulating error."""
    x, state, weights, _ = make_layer("lstm", 4, 10_000, 64, device="cuda")
    with torch.no_grad():
        y, (h, c) = kernels.triton_layer("lstm", x, state, weights)
        f64 = [t.double() for t in (x, *state, *weights)]
        y_ref, (h_ref, c_ref) = kernels.reference_layer("lstm", f64[0], tuple(f64[1:3]), tuple(f64[3:]))
    err = (y.double() - y_ref).abs().amax(dim=(1, 2))
    assert err.max() < 1e-4
    assert err[-1000:].max() <= 10 * err[:1000].max() + 1e-6  # no growth along time
    atol, rtol = LONG_SEQUENCE_TOL
    torch.testing.assert_close(c.double(), c_ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("B", [1, 16, 64, 256])
@pytest.mark.parametrize("H", [64, 128, 768, 1024, 4096])
def test_dispatch_never_oversubscribes_the_barrier(B, H):
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for cell in ("rnn", "lstm", "gru"):
        for dtype in (torch.float32, torch.bfloat16):
            try:
                plan = plan_layer(cell, B, H, dtype, torch.device("cuda"))
            except ValueError as e:
                assert "Use backend='torch'" in str(e)
                continue
            for cfg in (plan.forward, plan.backward):
                assert cfg.strategy in STRATEGIES
                if cfg.NSPLIT > 1:
                    assert -(-B // cfg.BB) * cfg.NSPLIT <= sms


def test_auto_backend_uses_cudnn_until_measured():
    import rnndeploy

    m = rnndeploy.LSTM(8, 768).cuda()
    assert m.resolve_backend(torch.randn(5, 16, 8, device="cuda")) == "torch"


def test_autocast_on_gpu():
    import rnndeploy

    m = rnndeploy.GRU(8, 256, backend="triton").cuda()
    ref = torch.nn.GRU(8, 256).cuda()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(50, 16, 8, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, h = m(x)
        y_ref, _ = ref(x)
    assert y.dtype == torch.bfloat16
    atol, rtol = AUTOCAST_BF16_TOL
    torch.testing.assert_close(y.float(), y_ref.float(), atol=atol, rtol=rtol)
    y.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in m.parameters())
