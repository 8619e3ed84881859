"""Time to fail: `genco pipeline run` with a misspelt catalog path, on the real KFP local
runner. Before issue 13 every task had a KFP retry policy (2 retries, 30 s then 60 s), so a
contract error took minutes; now the ingest step runs once. Prints JSON: wall seconds per
run, attempts of the ingest step (from the run's log), exit status and the stderr line.

    .venv/bin/python bench/pipeline_failure.py [--runs 3] [--work /tmp/genco-bench-fail]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time


def one_run(work: str) -> dict:
    out = os.path.join(work, "run")
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "genco.cli", "pipeline", "run", "--out", out,
         "--catalog", os.path.join(work, "catalgo.csv"),
         "--impressions", os.path.join(work, "impressions.csv")],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    with open(os.path.join(out, "pipeline.log"), encoding="utf-8") as f:
        attempts = f.read().count("Executing task")
    return {
        "seconds": round(seconds, 2),
        "attempts": attempts,
        "exit_status": r.returncode,
        "stderr_last_line": r.stderr.splitlines()[-1] if r.stderr else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", default="/tmp/genco-bench-fail")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    runs = [one_run(args.work) for _ in range(args.runs)]
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "load_average_1m": round(os.getloadavg()[0], 2),
                "runs": runs,
                "median_seconds": sorted(r["seconds"] for r in runs)[len(runs) // 2],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
