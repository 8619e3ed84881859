#!/bin/bash
# usage: run18.sh OUT EXTRA_ARGS... -- "world seed" ...
SRC=/tmp/snap18
export PYTHONPATH=$SRC OMP_NUM_THREADS=1 GENCO_AES_CSV=/work/shared/data/aes_online_ctr.csv
OUT=$1; shift
extra=()
while [ "$1" != "--" ]; do extra+=("$1"); shift; done; shift
mkdir -p "$OUT"; cd $SRC
for spec in "$@"; do
  set -- $spec
  echo "=== $spec start $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
  /work/main/.venv/bin/python bench/loop.py --worlds "$1" --seeds "$2" --rounds 5 --impressions 100000 --explore 0.05 \
    --rl-steps 30 "${extra[@]}" --out "$OUT" > "$OUT/$1_s$2.json" 2> "$OUT/$1_s$2.log"
  echo "=== $spec end $(date -u +%H:%M:%S) rc $? load $(cut -d' ' -f1-3 /proc/loadavg)"
done
