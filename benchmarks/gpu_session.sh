#!/usr/bin/env bash
# The one GPU command for the persistent kernels (issue 9): <= 8 minutes on an H200 from a bare machine.
#
#   bash benchmarks/gpu_session.sh          # from anywhere; OUT=<folder> (default benchmarks/results/gpu-session)
#
# Stages, in this order, each under its own `timeout` (a hung grid barrier ends as a timeout, not a stuck
# machine), each line printed and flushed as it exists:
#   1. install (pip editable, offline; without setuptools the tree itself is imported through a shim)
#   2. headline: LSTM, GRU, RNN bf16 B=16 T=1024 H=768, outputs and every gradient against cuDNN, then
#      forward and forward+backward timings against cuDNN; once with every split grid on the grid barrier,
#      once on tagged words (RNNDEPLOY_HANDOFF), each in its own process and timeout: a hand-off that hangs
#      costs its own stage only
#   3. every launch strategy's GPU test (barrier, then tagged)      4. the rest of the GPU tests
#   5. the benchmark grid while time lasts (one JSON line per case as it finishes)
# A summary table prints last. Files, flat in $OUT (8): env.txt headline.txt tests.txt bench.txt
# kernels.jsonl kernels.json kernels.csv kernels.png (the last two need matplotlib).
# Works with Python 3.12, torch 2.11, triton 3.6, no network, possibly no setuptools.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
ROOT="$(pwd)"
OUT="${OUT:-benchmarks/results/gpu-session}"
mkdir -p "$OUT"
BUDGET_S="${RNNDEPLOY_SESSION_S:-470}"
T0=$(date +%s)
export PYTHONUNBUFFERED=1
declare -a SUMMARY=()

left() { echo $((BUDGET_S - ($(date +%s) - T0))); }
note() { SUMMARY+=("$(printf '%-16s rc=%-4s %5ss  %s' "$1" "$2" "$3" "$4")"); }

# 1. install -----------------------------------------------------------------------------------------------
s=$(date +%s)
{
    date -u
    echo "commit ${RNNDEPLOY_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
    nvidia-smi || true
    if [ -z "${RNNDEPLOY_NO_PIP:-}" ] && timeout 60 python -m pip install --no-deps --no-build-isolation --no-index -e . 2>&1; then
        echo "install: pip editable"
    else
        # kernels/ and export/ install as rnndeploy.kernels and rnndeploy.export (package-dir mapping): a
        # folder of links gives the same import names straight from the tree
        SHIM="$(mktemp -d)"
        mkdir -p "$SHIM/rnndeploy"
        for f in "$ROOT"/rnndeploy/*; do ln -s "$f" "$SHIM/rnndeploy/"; done
        ln -s "$ROOT/kernels" "$SHIM/rnndeploy/kernels"
        ln -s "$ROOT/export" "$SHIM/rnndeploy/export"
        echo "install: pip failed, importing the tree through $SHIM"
    fi
} >"$OUT/env.txt" 2>&1
if [ -n "${SHIM:-}" ]; then  # set inside the braces above (they run in this shell)
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi
python -c "import numpy, torch, triton, rnndeploy.kernels.common as c; print('python', __import__('sys').version.split()[0],
'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, 'cuda', torch.version.cuda,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO GPU', 'kernels from', c.__file__)" >>"$OUT/env.txt" 2>&1
rc=$?
note install "$rc" $(($(date +%s) - s)) "$(tail -n 1 "$OUT/env.txt")"
if [ "$rc" != 0 ]; then
    cat "$OUT/env.txt"
    echo "rnndeploy cannot be imported: see $OUT/env.txt" >&2
    exit 1
fi

# 2. headline, each hand-off -------------------------------------------------------------------------------
: >"$OUT/headline.txt"
for handoff in barrier tagged; do
    s=$(date +%s)
    echo "== headline, RNNDEPLOY_HANDOFF=$handoff" | tee -a "$OUT/headline.txt"
    RNNDEPLOY_HANDOFF=$handoff timeout $([ "$handoff" = barrier ] && echo 100 || echo 90) python -c "
from rnndeploy.bench.kernels import headline
headline(echo=lambda line: print(line, flush=True))
" 2>&1 | tee "$OUT/headline.$handoff.tmp"
    rc=${PIPESTATUS[0]}
    cat "$OUT/headline.$handoff.tmp" >>"$OUT/headline.txt" && rm -f "$OUT/headline.$handoff.tmp"
    part=$(sed -n "/RNNDEPLOY_HANDOFF=$handoff\$/,\$p" "$OUT/headline.txt")
    note "headline-$handoff" "$rc" $(($(date +%s) - s)) \
        "$(grep -c 'result=ok' <<<"$part") ok, $(grep -c 'result=FAIL\|result=ERROR' <<<"$part") failed, $(grep -c '^time=' <<<"$part") timings"
done

# 3-4. GPU tests -------------------------------------------------------------------------------------------
: >"$OUT/tests.txt"
# gpu_tests NAME TIMEOUT TITLE PYTEST-ARGS...: one stage of GPU tests, appended to tests.txt, noted as NAME
gpu_tests() {
    local name=$1 limit=$2 title=$3
    shift 3
    s=$(date +%s)
    echo "== $title" | tee -a "$OUT/tests.txt"
    timeout "$limit" python -m pytest -q -rs -p no:cacheprovider "$@" 2>&1 | tee -a "$OUT/tests.txt"
    rc=${PIPESTATUS[0]}
    note "$name" "$rc" $(($(date +%s) - s)) "$(tail -n 1 "$OUT/tests.txt")"
}
gpu_tests strategies 100 "every strategy's GPU test (grid barrier and one-program strategies)" \
    tests/kernels/test_kernels_gpu.py -k "(strategy or hand_off) and not tagged"
gpu_tests tagged 70 "every strategy's GPU test (tagged hand-off)" \
    tests/kernels/test_kernels_gpu.py -k "(strategy or hand_off) and tagged"
# the image lacks the server's packages: modules that cannot be imported are collection errors, the rest runs
gpu_tests gpu-tests 60 "the rest of the GPU tests" -m gpu --continue-on-collection-errors tests \
    -k "not strategy and not hand_off and not headline"

# 5. benchmark grid while time lasts -----------------------------------------------------------------------
s=$(date +%s)
budget=$(($(left) - 25))
if [ "$budget" -gt 20 ]; then
    timeout $((budget + 15)) python - "$OUT" "$budget" <<'EOF' 2>&1 | tee "$OUT/bench.txt"
import sys
from pathlib import Path

from rnndeploy.bench.kernels import environment, run_logged, table, write_results

out, budget = Path(sys.argv[1]), float(sys.argv[2])
env = environment()
# the headline shape first, then the grid that decides the dispatch table
rows, failures, _ = run_logged(out / "kernels.jsonl", env, ["lstm", "gru", "rnn"], ["full", "forward"],
                               ["triton", "cudnn"], ["bf16", "fp32"], [16, 1, 64, 256], [768, 256, 1024], [1024],
                               rep_ms=50, time_budget_s=budget, progress=lambda s: print(" ", s, flush=True))
if rows:
    print(table(rows), flush=True)
    write_results(rows, env, {"session": "benchmarks/gpu_session.sh", "time_budget_s": budget}, out, failures)
print(f"{len(rows)} rows, {len(failures)} failures", flush=True)
EOF
    rc=${PIPESTATUS[0]}
    note bench "$rc" $(($(date +%s) - s)) "$(tail -n 1 "$OUT/bench.txt")"
else
    note bench skipped 0 "no time left"
fi

# summary --------------------------------------------------------------------------------------------------
echo
echo "== summary ($(($(date +%s) - T0)) s in all; files in $OUT)"
printf '%s\n' "${SUMMARY[@]}"
echo "-- headline timings"
grep '^time=' "$OUT/headline.txt" || echo "(none)"
grep 'result=FAIL\|result=ERROR' "$OUT/headline.txt" || true
echo "-- kernels vs cuDNN (speedup = cuDNN ms / Triton ms)"
python - "$OUT" <<'EOF' || true
import json, sys
from pathlib import Path

p = Path(sys.argv[1]) / "kernels.json"
for s in json.loads(p.read_text())["speedups"] if p.exists() else []:
    print(f"{s['cell']:5} {s['mode']:8} {s['dtype']:5} B={s['batch']:<4} H={s['hidden']:<5} T={s['seq_len']:<5} "
          f"triton {s['ms']:8.3f} ms  cudnn {s['cudnn_ms']:8.3f} ms  x{s['speedup']:.2f}  {s['strategy']}")
EOF
