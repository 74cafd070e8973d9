"""The tolerances of the comparisons against the reference cells and torch.nn, in one place: ``(atol, rtol)``."""

import torch

# The Triton kernels (and any path through them: modules, cells stepped against them) against the fp32
# reference on the same rounded inputs, per input dtype; outputs, states and gradients alike.
TOL = {
    torch.float32: (3e-5, 1e-4),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (4e-2, 4e-2),
}

# NOTE: inputs of magnitude ~1e4 put ~1e4 * eps(fp32) ~ 1e-3 of rounding into every pre-activation; the gates
# that are not saturated pass it on, so fp32 results agree only to ~1e-3 of each tensor's scale there. That is
# the problem's conditioning, not a kernel error: a wrong gradient is off by the order of the scale, and a
# planted 1% error fails (test_extreme_tolerance_catches_a_planted_error).
EXTREME_TOL = (3e-5, 2e-3)

# The kernels on a GPU against torch.nn (cuDNN) in fp32, over longer sequences than the CPU cases (more rounding
# accumulates): outputs, and the gradients, which sum over every step.
GPU_FP32_TOL = (1e-4, 1e-3)
GPU_FP32_GRAD_TOL = (1e-3, 1e-2)

# The fp32 kernels' cell state after ten thousand steps against the float64 reference: an fp32 state carries
# rounding of its own magnitude, not one that accumulates along time.
LONG_SEQUENCE_TOL = (1e-4, 1e-4)

# A bf16 autocast forward against torch.nn's fp32 forward: bf16's own rounding (8 mantissa bits) per operand.
AUTOCAST_BF16_TOL = (5e-2, 5e-2)

# A sum of fp32 partials in the kernel's order against torch's order of the same fp32 values.
PARTIAL_SUM_TOL = (1e-4, 1e-5)

# The same computation on the same weights in the same order: bitwise equal.
EXACT = (0.0, 0.0)

# Plain fp32 torch against plain fp32 torch in another order of operations: the modules' layer composition on
# the reference cells against torch.nn's own layers.
COMPOSITION_TOL = (1e-5, 1e-5)

# An exported graph in onnxruntime against the torch module it came from, fp32.
ORT_TOL = (1e-5, 1e-5)
