#!/usr/bin/env bash
# One GPU session for the persistent kernels (issue 3): install, GPU tests, kernel tests on the GPU, benchmark.
#
# On the device machine (torch >= 2.11, triton >= 3.6, no network), from the repository root:
#   RNNDEPLOY_COMMIT=<sha> bash benchmarks/gpu_session.sh [all|tests|bench]
#     tests: install + `pytest -m gpu` + tests/kernels compiled on the GPU  (about 8 minutes at most)
#     bench: install + `rnndeploy bench kernels` on a subset                 (about 8 minutes at most)
#     all:   both (run the two stages as separate calls where one call is limited to 10 minutes)
# Everything lands flat in $OUT (default benchmarks/results/gpu-session), 8 files at most:
#   env.txt install.txt pytest-gpu.txt pytest-kernels.txt bench.txt kernels.json kernels.csv kernels.png
# Every stage runs under `timeout`: a hung grid barrier ends as a timeout in the logs, not a stuck machine.
set -uo pipefail

stage="${1:-all}"
case "$stage" in all | tests | bench) ;; *) echo "usage: $0 [all|tests|bench]" >&2; exit 2 ;; esac
OUT="${OUT:-benchmarks/results/gpu-session}"
mkdir -p "$OUT"

if ! python -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.txt" 2>&1; then
    echo "install failed: see $OUT/install.txt" >&2
    exit 1
fi
{
    date -u
    echo "commit ${RNNDEPLOY_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
    nvidia-smi || true
    python -c "import numpy, torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
'numpy', numpy.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} >"$OUT/env.txt" 2>&1

status=0
if [ "$stage" != bench ]; then
    # the device image lacks the server's packages (starlette, uvicorn, tritonclient): modules that cannot be
    # imported there are reported as collection errors, and the GPU tests of all the others still run
    timeout 330 python -m pytest -q -rs -m gpu --continue-on-collection-errors tests \
        >"$OUT/pytest-gpu.txt" 2>&1 || status=1
    timeout 200 python -m pytest -q -rs -m "not gpu" tests/kernels >"$OUT/pytest-kernels.txt" 2>&1 || status=1
fi
if [ "$stage" != tests ]; then
    # the headline case first (LSTM bf16 B=16 H=768 T=1024, forward + backward), then the rest while time lasts
    timeout 540 python -m rnndeploy bench kernels --cells lstm,gru,rnn --modes full,forward \
        --providers triton,cudnn --dtypes bf16,fp32 --batch 16,1,64,256 --hidden 768,256,1024 --seq-len 1024 \
        --rep-ms 50 --time-budget-s 400 --out "$OUT" >"$OUT/bench.txt" 2>&1 || status=1
fi
exit "$status"
