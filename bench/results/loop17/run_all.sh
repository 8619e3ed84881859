#!/bin/bash
# The runs of BENCHMARKS.md "Closed loop" (2026-11-30, branch loop17), one at a time, from a
# snapshot of the commit under test (SRC) so that edits to the checkout do not leak in.
# Arguments: "WORLD SEED [WARMUP]" each; a WARMUP writes under OUT/warmupWARMUP.
#   SRC=/tmp/snap OUT=/tmp/runs WAIT_PID=123 run_all.sh "aes 0" "per_product 0" "aes 0 0"
SRC=${SRC:-/tmp/loop17_src} OUT=${OUT:-/tmp/loop17_runs}
while [ -n "$WAIT_PID" ] && kill -0 "$WAIT_PID" 2>/dev/null; do sleep 5; done  # one run at a time
cd "$SRC" || exit 1
export PYTHONPATH=$SRC OMP_NUM_THREADS=1 GENCO_AES_CSV=${GENCO_AES_CSV:-/work/shared/data/aes_online_ctr.csv}
PY=/work/main/.venv/bin/python
for spec in "$@"; do
  set -- $spec
  out=$OUT extra=()
  if [ -n "$3" ]; then out=$OUT/warmup$3 extra=(--warmup "$3"); fi
  mkdir -p "$out"
  echo "=== $spec start $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
  $PY bench/loop.py --worlds "$1" --seeds "$2" --rounds 5 --impressions 100000 --explore 0.05 \
    --rl-steps 30 "${extra[@]}" --out "$out" > "$out/$1_s$2.json" 2> "$out/$1_s$2.log"
  echo "=== $spec end $(date -u +%H:%M:%S) rc $? load $(cut -d' ' -f1-3 /proc/loadavg)"
done
