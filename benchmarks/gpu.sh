#!/usr/bin/env bash
# One command for a CUDA machine (`make gpu-bench`): the GPU tests, then the attention /
# tensor-attention / LoRA benchmarks (polynomial vs SDPA on the GPU) in float32 and bfloat16,
# every table and log into one folder. Each step has a time limit and the whole run stays under
# 10 minutes (TOTAL_S). On a machine without CUDA it says so and runs the CPU smoke versions
# (--quick), exiting 0 unless something actually fails.
#
#   bash benchmarks/gpu.sh                 # tables in benchmarks/out/gpu/
#   OUT=/tmp/run1 bash benchmarks/gpu.sh
#
# Exit status: 0 when every step passed or hit its time limit (reported as TIMEOUT in the
# summary), 1 when a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python3}
OUT=${OUT:-benchmarks/out/gpu}
TOTAL_S=${TOTAL_S:-570}        # whole run, seconds (under 10 minutes with start-up)
TEST_S=${TEST_S:-150}          # pytest -m gpu
BENCH_S=${BENCH_S:-0}          # cap per benchmark x dtype; 0: a fair share of the time left
BENCHES=(attention tensor_attention lora_gradient)
DTYPES=(float32 bfloat16)

mkdir -p "$OUT"
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
failed=0

log() { echo "[gpu.sh] $*" | tee -a "$SUMMARY"; }

# run NAME LIMIT_S CMD...: run CMD with its output in $OUT/NAME.log, limited to LIMIT_S and to
# what is left of TOTAL_S; records PASS / TIMEOUT / FAIL / SKIP in the summary.
run() {
  local name=$1 limit=$2
  shift 2
  local left=$((TOTAL_S - ($(date +%s) - START)))
  if ((left < 10)); then
    log "SKIP    $name (time budget of ${TOTAL_S}s spent)"
    return 0
  fi
  ((limit > left)) && limit=$left
  local t0 rc
  t0=$(date +%s)
  echo "[gpu.sh] >>> $name: $* (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  local dt=$(($(date +%s) - t0))
  case $rc in
    0) log "PASS    $name (${dt}s)" ;;
    5) log "PASS    $name (${dt}s; no tests selected)" ;;   # pytest: nothing collected
    124 | 137) log "TIMEOUT $name after ${limit}s (partial output in $OUT/$name.log)" ;;
    *) log "FAIL    $name (rc=$rc, ${dt}s; see $OUT/$name.log)"; failed=1 ;;
  esac
}

# flags NAME: the subset of --device/--dtype/--quick/--out that benchmarks/NAME.py accepts
has_flag() { grep -q -- "$2" <<<"$1"; }

if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  DEVICE=cuda
  log "CUDA found: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)')"
else
  DEVICE=cpu
  log "no GPU found: running CPU smoke versions (--quick) of the benchmarks"
fi

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  uname -a
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
  command -v nvidia-smi >/dev/null && nvidia-smi
} >"$OUT/env.txt" 2>&1

# 1. GPU tests (on a CPU machine they are collected and skipped, which checks the markers).
run pytest-gpu "$TEST_S" "$PY" -m pytest -q -m gpu tests

# 2. benchmarks: device x dtype, tables under $OUT/<bench>-<device>-<dtype>/
runs_left=$((${#BENCHES[@]} * ${#DTYPES[@]}))
for bench in "${BENCHES[@]}"; do
  script=benchmarks/$bench.py
  if [[ ! -f $script ]]; then
    log "SKIP    $bench ($script not found)"
    runs_left=$((runs_left - ${#DTYPES[@]}))
    continue
  fi
  help=$("$PY" "$script" --help 2>&1) || true
  for dtype in "${DTYPES[@]}"; do
    name=$bench-$DEVICE-$dtype
    # this run's share of what is left of the budget
    limit=$(((TOTAL_S - ($(date +%s) - START)) / runs_left))
    ((BENCH_S > 0 && BENCH_S < limit)) && limit=$BENCH_S
    runs_left=$((runs_left - 1))
    args=()
    has_flag "$help" --device && args+=(--device "$DEVICE")
    if has_flag "$help" --dtype; then
      args+=(--dtype "$dtype")
    elif [[ $dtype != float32 ]]; then
      log "SKIP    $name ($script has no --dtype)"
      continue
    fi
    if has_flag "$help" --out; then
      mkdir -p "$OUT/$name"
      args+=(--out "$OUT/$name")
    fi
    [[ $DEVICE == cpu ]] && has_flag "$help" --quick && args+=(--quick)
    run "$name" "$limit" "$PY" "$script" "${args[@]}"
  done
done

# every table in one file, by run
{
  echo "# benchmarks/gpu.sh on $DEVICE, $(date -u +%Y-%m-%d)"
  echo
  sed 's/^/    /' "$SUMMARY"
  for table in "$OUT"/*/*.md; do
    [[ -f $table ]] || continue
    echo
    echo "## $(basename "$(dirname "$table")"): $(basename "$table")"
    echo
    cat "$table"
  done
} >"$OUT/tables.md"

log "done in $(($(date +%s) - START))s; tables in $OUT/tables.md, logs in $OUT/"
if ((failed)); then
  log "some steps FAILED"
  exit 1
fi
exit 0
