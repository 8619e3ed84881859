"""Ingest throughput and memory: validate 1M and 10M simulated rows, CSV and Parquet.

Each validation runs in a fresh child process so its peak RSS (VmHWM) is its own.
Memory is flat when the 10M-row peak is close to the 1M-row peak. Prints JSON.

    .venv/bin/python bench/ingest.py [--rows 1000000 10000000] [--work /tmp/genco-bench-ingest]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from genco.worlds.simulate import WORLDS, log_impressions, make_world

CHUNK = 1_000_000


def make_logs(work: str, rows: list[int]) -> dict[tuple[int, str], str]:
    """Write the default world's log at each size, 1M rows at a time (bounded memory)."""
    world = make_world(WORLDS["default"], seed=0)
    world.catalog.to_frame().to_csv(os.path.join(work, "catalog.csv"), index=False)
    world.constraints.to_frame(world.catalog).to_csv(
        os.path.join(work, "constraints.csv"), index=False
    )
    paths = {}
    for n in rows:
        csv_path = os.path.join(work, f"impressions_{n}.csv")
        pq_path = os.path.join(work, f"impressions_{n}.parquet")
        paths[(n, "csv")], paths[(n, "parquet")] = csv_path, pq_path
        if os.path.exists(csv_path) and os.path.exists(pq_path):
            continue
        pw = None
        with open(csv_path, "wb") as f:
            for i, start in enumerate(range(0, n, CHUNK)):
                t = pa.Table.from_pandas(
                    log_impressions(world, min(CHUNK, n - start), seed=i), preserve_index=False
                )
                # Distinct timestamps per chunk keep rows unique across chunks.
                pacsv.write_csv(t, f, pacsv.WriteOptions(include_header=i == 0))
                pw = pw or pq.ParquetWriter(pq_path, t.schema)
                pw.write_table(t)
        pw.close()
    return paths


CHILD = """
import json, sys, time
from genco.data.contract import load_catalog, load_constraints
from genco.data.ingest import IngestConfig, ingest

def hwm_mb(key):
    # VmHWM/VmRSS are per address space: unlike ru_maxrss they do not inherit the parent's peak.
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

work, path, dups = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
cat = load_catalog(work + "/catalog.csv")
cons = load_constraints(work + "/constraints.csv", cat)
base = hwm_mb("VmRSS:")
t = time.perf_counter()
s = ingest(path, cat, cons, work + "/out", IngestConfig(check_duplicates=dups))
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "rows": s.rows_in, "valid": s.rows_valid,
                  "rss_before_mb": base, "peak_rss_mb": hwm_mb("VmHWM:")}))
"""


def run_child(work: str, path: str, dups: bool) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, work, path, "1" if dups else "0"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--work", default="/tmp/genco-bench-ingest")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    t = time.perf_counter()
    paths = make_logs(args.work, args.rows)
    results = []
    for (n, fmt), path in sorted(paths.items()):
        for dups in (False, True):
            r = run_child(args.work, path, dups)
            results.append(
                {
                    "rows": n,
                    "format": fmt,
                    "duplicate_check": dups,
                    "file_mb": round(os.path.getsize(path) / 2**20, 1),
                    "seconds": round(r["seconds"], 2),
                    "rows_per_s": round(r["rows"] / r["seconds"]),
                    "peak_rss_mb": round(r["peak_rss_mb"]),
                    "rss_before_mb": round(r["rss_before_mb"]),
                    "all_valid": r["valid"] == r["rows"] == n,
                }
            )
            print(json.dumps(results[-1]), file=sys.stderr)
    print(
        json.dumps(
            {
                "benchmark": "ingest",
                "machine": f"{platform.machine()} {os.cpu_count()} cores, "
                f"python {platform.python_version()}",
                "date": time.strftime("%Y-%m-%d"),
                "generate_seconds": round(
                    time.perf_counter() - t - sum(r["seconds"] for r in results), 1
                ),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
