#!/usr/bin/env bash
# Everything WMTP needs to learn from a lent GPU, in one run of at most ~8 minutes:
#
#   bash bench/gpu_suite.sh OUT_DIR
#
# Every result lands under OUT_DIR (suite.log, env.json, nvidia-smi.txt, pytest-gpu.xml,
# mtp_step.json, profile/, plan.json, measured.json.rank0, speculative.json, summary.txt), so
# the run comes back in one piece. Stages run cheapest and most informative first, each under
# its own timeout, so one hang cannot eat the budget; a failed stage is logged and the next one
# runs. It uses the machine's own python3 and torch (PYTHON=... to choose), needs no MLflow and
# no network. Without CUDA it runs to the end with the GPU parts skipped and the benchmarks
# shrunk to a smoke-test shape (that is how it is tested on the CPU: tests/test_gpu_suite.py).
set -uo pipefail

OUT=${1:?usage: bash bench/gpu_suite.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1   # nothing here tracks to MLflow or reaches a network
exec > >(tee -a "$OUT/suite.log") 2>&1

PEAK_TFLOPS=${PEAK_TFLOPS:-790}   # an H200's measured bf16 peak
STATUS=()

stage() {  # stage NAME SECONDS CMD...: runs CMD under a timeout, records the outcome
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    local took=$((SECONDS - start))
    case $rc in
        0) STATUS+=("$name: ok (${took}s)") ;;
        124 | 137) STATUS+=("$name: TIMED OUT after ${limit}s") ;;
        *) STATUS+=("$name: failed, exit $rc (${took}s)") ;;
    esac
    echo "=== $name: exit $rc after ${took}s"
}

HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [[ $HAS_CUDA == 1 ]]; then
    DIM=4096 HEADS_N=32 VOCAB=32000 SEQ=2048 LAYERS=${LAYERS:-8} STEPS=5 DEVICE=cuda DTYPE=bfloat16
else
    echo "no CUDA: GPU tests skip, benchmarks run a smoke-test shape on the CPU"
    DIM=128 HEADS_N=4 VOCAB=1000 SEQ=128 LAYERS=5 STEPS=1 DEVICE=cpu DTYPE=float32
fi

# 1. the machine
stage nvidia-smi 30 bash -c "nvidia-smi > '$OUT/nvidia-smi.txt' 2>&1 || echo 'no nvidia-smi' > '$OUT/nvidia-smi.txt'"
stage environment 60 "$PY" - "$OUT/env.json" <<'EOF'
import json, platform, sys, torch
info = {"python": sys.version.split()[0], "torch": torch.__version__,
        "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "platform": platform.platform()}
if torch.cuda.is_available():
    info |= {"gpu": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
             "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
print(json.dumps(info, indent=2))
open(sys.argv[1], "w").write(json.dumps(info, indent=2) + "\n")
EOF

# 2. CUDA correctness
stage pytest-gpu 240 "$PY" -m pytest -m gpu tests/test_gpu.py -q -rs -s -p no:cacheprovider \
    --junitxml="$OUT/pytest-gpu.xml"

# 3. the MTP step at 7B width: MTP vs next-token, tokens/s, MFU, a profile of one step
stage mtp-step 200 bash -c "'$PY' -m bench.mtp_step --dim $DIM --layers $LAYERS --vocab $VOCAB \
    --seq $SEQ --batch 1 --steps $STEPS --dtype $DTYPE --variants ntp-naive,mtp-naive,mtp-sequential \
    --peak-tflops $PEAK_TFLOPS --profile-dir '$OUT/profile' > '$OUT/mtp_step.json'"

# 4. the plan for this shape on one GPU of this memory, then the same step measured
mkdir -p "$OUT/shape"
cat > "$OUT/shape/params.json" <<EOF
{"dim": $DIM, "n_layers": $LAYERS, "n_heads": $HEADS_N, "vocab_size": $VOCAB, "n_future_tokens": 4,
 "multiple_of": 256, "norm_eps": 1e-05}
EOF
SHAPE=(recipes/baseline.yaml "model.base=$OUT/shape" "data.seq_len=$SEQ" "data.micro_batch_size=1"
       "run.device=$DEVICE" "model.dtype=$DTYPE")
GPU_MEMORY=$("$PY" -c "import torch; print(round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if torch.cuda.is_available() else 141)")
stage plan 150 "$PY" train_wmtp.py "${SHAPE[@]}" --plan --nproc-per-node 1 --gpu h200 \
    --gpu-memory-gib "$GPU_MEMORY" --plan-json "$OUT/plan.json"
stage measure 150 "$PY" train_wmtp.py "${SHAPE[@]}" --measure --plan-json "$OUT/measured.json"

# 5. self-speculative decoding's cost at 7B block shapes
stage speculative 120 bash -c "'$PY' -m bench.speculative --cost-model --dtype $DTYPE \
    --dim $DIM --n-heads $HEADS_N --vocab $VOCAB --repeats 5 > '$OUT/speculative.json'"

# 6. one summary of the figures the issue asks for
stage summary 30 "$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None
lines = []
env = load("env.json") or {}
lines.append(f"machine: {env.get('gpu', 'no GPU')}, torch {env.get('torch')}, CUDA {env.get('cuda')}")
step = load("mtp_step.json")
if step:
    for r in step["results"]:
        lines.append(f"{r['variant']}: {r['tokens_per_s']} tokens/s, {r['step_s']} s/step, "
                     f"peak {r['peak_mib']} MiB, MFU {r['mfu']}")
    lines.append(f"MTP step / next-token step: {step['mtp_over_ntp_step']} (target <= 1.10)")
plan, measured = load("plan.json"), load("measured.json.rank0")
if plan and measured:
    planned = plan["peak_gib"]
    tracked = measured["peak_bytes"] / 2**30
    allocator = measured.get("cuda_max_memory_allocated")
    lines.append(f"peak memory: planned {planned:.2f} GiB, measured (tracked) {tracked:.2f} GiB "
                 f"({(tracked - planned) / planned:+.1%})")
    if allocator:
        allocator /= 2**30
        lines.append(f"  torch.cuda.max_memory_allocated {allocator:.2f} GiB "
                     f"({(allocator - planned) / planned:+.1%}; target within 10%)")
spec = load("speculative.json")
if spec:
    lines.append("speculative cost model: " + json.dumps({k: v for k, v in spec.items()
                                                       if "ratio" in k or "verify" in k}))
text = "\n".join(lines)
print(text)
(out / "summary.txt").write_text(text + "\n")
EOF

echo
echo "=== stages"
printf '  %s\n' "${STATUS[@]}"
printf '%s\n' "${STATUS[@]}" > "$OUT/stages.txt"
if printf '%s\n' "${STATUS[@]}" | grep -qv ': ok'; then
    exit 1
fi
