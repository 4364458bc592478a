#!/usr/bin/env bash
# The CUDA checks of issue 9 in one go, on a machine with an NVIDIA GPU:
#   1. the CUDA tests (pytest -m gpu),
#   2. bench_update.py --device cuda        (update throughput, V = 50,257, d = 768 and 4,096),
#   3. bench_evaluate.py --device cuda      (incl. exact metrics at K = 50,000, d = 4,096;
#                                            goal under 2 s on one H100),
#   4. bench_mmd.py --device cuda           (RFF vs exact MMD, exact up to N = 100,000),
#   5. bench_scale_eval.py --device cuda    (exact metrics at LLM scale: K = 128,256, d = 4,096),
# each under `timeout`, about 10 minutes at most in all; then one table (step, exit status,
# seconds, headline) followed by each benchmark's own tables. Everything is also written to
# build/gpu-bench.md (or $GPU_BENCH_OUT).
#
#   bash benchmarks/gpu.sh            # on the GPU machine
#   bash benchmarks/gpu.sh --dry-run  # anywhere: the same steps at tiny sizes on the CPU
#
# --dry-run exercises the plumbing (arguments, timeouts, the summary) without a GPU: the
# benchmarks run with --device cpu --quick and pytest only collects the gpu-marked tests.
# Exit status: 0 when every step succeeded, 1 otherwise (the table says which).
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  -h | --help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

OUT="${GPU_BENCH_OUT:-build/gpu-bench.md}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$(dirname "$OUT")"

if [[ $DRY -eq 1 ]]; then
  DEVICE=cpu
  CARD="none (dry run on the CPU)"
  PYTEST=("$PY" -m pytest -q -m gpu --collect-only tests/unit)
  UPDATE=("$PY" benchmarks/bench_update.py --device cpu --quick)
  # Explicit tiny sizes (--quick would replace them): one compute_metrics row.
  EVALUATE=("$PY" benchmarks/bench_evaluate.py --device cpu --ks 300 --dim 32 --large-ks ""
    --sampled-ks "" --pairs-max-k 0 --direct-max-k 0 --pair-samples 2000 --eval-samples 500
    --json "$WORK/evaluate.json")
  MMD=("$PY" benchmarks/bench_mmd.py --device cpu --quick --json "$WORK/mmd.json")
  SCALE=("$PY" benchmarks/bench_scale_eval.py --quick --steps metrics --max-exact 10000
    --device cpu)
  LIMITS=(60 60 60 60 60)
else
  if ! command -v nvidia-smi > /dev/null || ! nvidia-smi -L > /dev/null 2>&1; then
    echo "gpu.sh: no NVIDIA GPU here (nvidia-smi fails); use --dry-run to check the script" >&2
    exit 1
  fi
  DEVICE=cuda
  CARD="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
  PYTEST=("$PY" -m pytest -q -m gpu tests/unit)
  UPDATE=("$PY" benchmarks/bench_update.py --device cuda)
  # K = 50,000 at d = 4,096 (the < 2 s goal) and the d = 768 series; direct K x K up to 10k.
  EVALUATE=("$PY" benchmarks/bench_evaluate.py --device cuda --ks 1000,10000,50000
    --large-ks 10000,50000 --large-full-max-k 50000 --pairs-max-k 10000 --direct-max-k 10000
    --sampled-ks 50000 --timeout 120 --json "$WORK/evaluate.json")
  MMD=("$PY" benchmarks/bench_mmd.py --device cuda --exact-max-n 100000 --max-rff-work 1e13
    --tile 8192 --json "$WORK/mmd.json")
  # Every pair of K = 128,256 classes exact (8.2e9 pairs) plus NC4 on 4,000 features.
  SCALE=("$PY" benchmarks/bench_scale_eval.py --steps metrics --max-exact 200000 --nc4-eval 4000
    --nc4-max 4000 --device cuda --timeout 170)
  LIMITS=(60 90 210 90 180)
fi

echo "gpu.sh: card: $CARD" >&2
NAMES=("pytest -m gpu" "bench_update" "bench_evaluate" "bench_mmd" "bench_scale_eval")
STATUS=()
SECONDS_TAKEN=()
run_step() {  # index, command...: run with its time limit, keep stdout, pass stderr through
  local i=$1
  shift
  local start=$SECONDS rc=0
  echo "gpu.sh: [${NAMES[$i]}] $* (limit ${LIMITS[$i]} s)" >&2
  timeout --kill-after=10 "${LIMITS[$i]}" "$@" > "$WORK/step$i.md" || rc=$?
  STATUS[i]=$rc
  SECONDS_TAKEN[i]=$((SECONDS - start))
}
run_step 0 "${PYTEST[@]}"
run_step 1 "${UPDATE[@]}"
run_step 2 "${EVALUATE[@]}"
run_step 3 "${MMD[@]}"
run_step 4 "${SCALE[@]}"

headline() {  # one line per step for the summary table, from the step's output
  case $1 in
    0) tail -n 1 "$WORK/step0.md" | tr '|' '/' ;;
    1) grep -m 2 '^- d = ' "$WORK/step1.md" | tr '\n' ' ' | tr '|' '/' ;;
    2) "$PY" - "$WORK/evaluate.json" << 'EOF' || true
import json, sys
rows = [r for r in json.load(open(sys.argv[1])) if "error" not in r and r["step"] == "full"]
big = max(rows, key=lambda r: (r["k"] * r["dim"], r["mode"] == "exact"), default=None)
if big:
    print(f"compute_metrics ({big['mode']} pairs) K = {big['k']:,}, d = {big['dim']:,}: "
          f"{big['seconds']:.2f} s (goal < 2 s on an H100 at K = 50,000, d = 4,096)")
EOF
      ;;
    3) "$PY" - "$WORK/mmd.json" << 'EOF' || true
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
ex = {(r["n"], r["case"]): r for r in rows if r["method"] == "exact" and r["mmd2"] is not None}
rff = [r for r in rows if r["method"] == "rff" and (r["n"], "shifted") in ex and r["case"] == "shifted"]
if rff:
    top = max(r["features"] for r in rff)
    errs = [abs(r["mmd2"] - ex[(r["n"], "shifted")]["mmd2"]) / abs(ex[(r["n"], "shifted")]["mmd2"])
            for r in rff if r["features"] == top]
    print(f"shifted case, D = {top}: RFF within {max(errs):.1%} of exact up to N = "
          f"{max(n for n, _ in ex):,}")
EOF
      ;;
    4) grep -m 1 '^- metrics, K = ' "$WORK/step4.md" | tr '|' '/' ;;
  esac
}

{
  echo "## benchmarks/gpu.sh"
  echo
  echo "Card: $CARD; device $DEVICE; $(date -u '+%Y-%m-%d %H:%M UTC')."
  echo
  echo "| step | exit | seconds | limit s | headline |"
  echo "|---|---:|---:|---:|---|"
  for i in 0 1 2 3 4; do
    echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${SECONDS_TAKEN[$i]} | ${LIMITS[$i]} | $(headline "$i") |"
  done
  echo
  for i in 1 2 3 4; do
    echo "### ${NAMES[$i]}"
    echo
    cat "$WORK/step$i.md"
    echo
  done
} | tee "$OUT"
echo "gpu.sh: wrote $OUT" >&2

for rc in "${STATUS[@]}"; do
  [[ $rc -eq 0 ]] || exit 1
done
exit 0
