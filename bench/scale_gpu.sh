#!/usr/bin/env bash
# Issue 15's GPU training figures, in one short run (about 5 minutes) on a bare GPU machine
# with this repository copied and nothing installed: its own python3 must hold torch (CUDA),
# numpy, pandas, pyarrow, fsspec and tqdm (the device image does; nothing is pip-installed).
#
#   bash bench/scale_gpu.sh                 # writes into $OUT (default /tmp/scale_gpu)
#
# Through the device tool: run(command="bash bench/scale_gpu.sh", timeout_s=420). Writes
# env.txt (GPU, driver, versions), one JSON line per measured point in points.jsonl (so a
# point that finished survives a later timeout) and scale_gpu_*.json per series.
set -uo pipefail
OUT=${OUT:-/tmp/scale_gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD OMP_NUM_THREADS=4 SCALE_TMP=${SCALE_TMP:-/tmp}
PY=$(command -v python3)
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  nproc
  "$PY" -c "import torch, numpy, pandas, pyarrow; print('torch', torch.__version__, 'cuda',
torch.cuda.is_available(), 'numpy', numpy.__version__, 'pandas', pandas.__version__,
'pyarrow', pyarrow.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA torch here: nothing measured" | tee -a "$OUT/env.txt"
  exit 2
fi
# Series in order of cost; each has its own time limit so one slow point leaves the rest.
series() {  # name, limit (s), bench flags...
  local name=$1 limit=$2
  shift 2
  timeout "$limit" "$PY" bench/scale.py --device cuda --epochs 2 "$@" \
    --out "$OUT/scale_gpu_$name.json" 2>> "$OUT/points.jsonl"
  echo "series $name: exit $?" >> "$OUT/env.txt"
}
series impressions_1M_1k_ads 50 --impressions 1000000 --ads 1000
series impressions_10M_1k_ads 180 --impressions 10000000 --ads 1000
series ads_100k_1M_impressions 80 --impressions 1000000 --ads 100000
cat "$OUT/points.jsonl"
