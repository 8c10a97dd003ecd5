#!/usr/bin/env bash
# Every GPU check of this repository in one prepared run, for a fresh CUDA machine.
#
#   bash bench/gpu_suite.sh            (from anywhere; it works in the repository root)
#
# 1. Python: .venv if its torch sees CUDA; else a venv over the system python's packages when
#    the system torch sees CUDA (nothing big to download); else a fresh venv with
#    torch==2.13.0 and triton==3.9.0 from PyPI; then `pip install -e '.[dev]'` (a failure
#    there is reported and the suite goes on with what imports).
# 2. The kernel tests natively (tests/test_moe_kernels.py -m gpu), then every other test
#    marked gpu, each as JUnit XML; bench/sync_audit.py; bench/moe_layer.py --device cuda
#    --dtype bfloat16; bench/similarity.py --device cuda. Results land in bench/results/ with
#    the GPU's prefix (h200_, h100_, else gpu_), with a summary of every step in
#    bench/results/<prefix>gpu_suite.json.
#
# Each step runs under its own timeout and a failing or hung one does not stop the others;
# the whole suite stays inside SUITE_BUDGET_S seconds (default 570: later steps get what is
# left, and a step with under 30 s left is skipped and recorded so).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=bench/results
mkdir -p "$OUT"
START=$(date +%s)
BUDGET=${SUITE_BUDGET_S:-570}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
case "$gpu_name" in
  *H200*) P=h200_ ;;
  *H100*) P=h100_ ;;
  *) P=gpu_ ;;
esac
echo "[gpu_suite] GPU: ${gpu_name:-none found}; results: $OUT/${P}*"

SUMMARY=()  # "name rc seconds" per step

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

step() {  # step NAME TIMEOUT_S CMD...: run CMD under min(TIMEOUT_S, what the budget leaves)
  local name=$1 limit=$2 rc t0 remaining
  shift 2
  remaining=$(( $(left) - 10 ))
  if (( remaining < 30 )); then
    echo "[gpu_suite] skip $name: the suite's budget is spent"
    SUMMARY+=("$name skipped 0")
    return
  fi
  (( limit > remaining )) && limit=$remaining
  echo "[gpu_suite] === $name (timeout ${limit}s, $(left)s left) ==="
  t0=$(date +%s)
  ( set -x; timeout -k 10 "$limit" "$@" )
  rc=$?
  (( rc == 124 || rc == 137 )) && echo "[gpu_suite] $name timed out after ${limit}s"
  SUMMARY+=("$name $rc $(( $(date +%s) - t0 ))")
}

cuda_torch() {  # cuda_torch PYTHON: does this python's torch see a GPU?
  "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
}

setup() {
  set -x
  if [[ -x .venv/bin/python ]] && cuda_torch .venv/bin/python; then
    VENV=.venv
  elif cuda_torch python3; then
    # The system torch sees the GPU: a venv over the system packages reuses it.
    VENV=.venv
    [[ -x .venv/bin/python ]] && VENV=.venv-gpu  # .venv holds a CPU-only torch
    [[ -x $VENV/bin/python ]] || python3 -m venv --system-site-packages "$VENV"
  else
    VENV=.venv
    [[ -x .venv/bin/python ]] && VENV=.venv-gpu
    [[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.13.0 triton==3.9.0
  fi
  "$VENV/bin/python" -c "import triton" 2>/dev/null || "$VENV/bin/pip" install -q triton==3.9.0
  "$VENV/bin/pip" install -q -e '.[dev]' || echo "[gpu_suite] pip install -e '.[dev]' failed; going on"
  set +x
  echo "$VENV" > "$OUT/.gpu_suite_venv"
}

export -f setup cuda_torch
step setup 300 bash -c 'cd "$0" && OUT="$1" setup' "$ROOT" "$OUT"
VENV=$(cat "$OUT/.gpu_suite_venv" 2>/dev/null || echo .venv)
rm -f "$OUT/.gpu_suite_venv"
PY="$ROOT/$VENV/bin/python"
[[ -x $PY ]] || PY=python3
"$PY" -c "import torch, triton; print('[gpu_suite] torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(0))" || true

step kernel_tests 180 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_moe_kernels.py \
  --junitxml "$OUT/${P}kernel_tests.xml"
step moe_layer_bench 360 bash -c '"$0" bench/moe_layer.py --device cuda --dtype bfloat16 > "$1"' \
  "$PY" "$OUT/${P}moe_layer_bf16.json"
step sync_audit 150 "$PY" bench/sync_audit.py "$OUT/${P}sync_audit.json"
step gpu_tests 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests \
  --ignore tests/test_moe_kernels.py --junitxml "$OUT/${P}gpu_tests.xml"
step similarity_bench 120 bash -c '"$0" bench/similarity.py --device cuda > "$1"' \
  "$PY" "$OUT/${P}similarity.json"

{
  echo "{\"gpu\": \"${gpu_name}\", \"python\": \"$PY\", \"seconds\": $(( $(date +%s) - START )), \"steps\": ["
  sep=""
  for s in "${SUMMARY[@]}"; do
    read -r name rc secs <<< "$s"
    echo "  $sep{\"step\": \"$name\", \"rc\": \"$rc\", \"seconds\": $secs}"
    sep=","
  done
  echo "]}"
} > "$OUT/${P}gpu_suite.json"
cat "$OUT/${P}gpu_suite.json"
