"""Issue 15, data half: ingest and batch recommendation at catalog scale. Prints JSON.

ingest: the ``catalog`` world (``--ads`` products, 5 components, 10-50 own candidates each)
logged as a date-partitioned Parquet dataset at each ``--rows`` size, validated by
``genco.data.ingest.ingest`` in a fresh child process so its peak RSS (VmHWM) is its own;
the catalog's load is timed and measured apart from the log's validation. A linear cost model
(seconds and peak RSS = a + b x rows, fitted on the two largest sizes measured) extrapolates to
``--extrapolate`` rows, marked as extrapolated.

recommend: decoding throughput on one thread, in ads per CPU-second of the process (ads/s per
core, robust to other jobs sharing the machine), the models bound and every ad's tables built
in the run, untrained models on catalog-world blocks with a fixed number of candidates per
component: ads/s vs candidates per component and vs components, for the generator's beam
(refine none; refine pairs, ``genco recommend``'s default) decoded a chunk of ads at a time
(``chunked``, what ``genco recommend`` runs) and one ad at a time (``beam``, what serving
runs), and for exhaustive scoring of every combination (where the space has at most
``--exhaustive-max``), chunked and per ad.
Throughput does not depend on the weights' values, only on the sizes.

    .venv/bin/python bench/scale_data.py [--ads 100000] [--rows 1000000 10000000]
        [--work /tmp/genco-bench-scale] [--skip ingest|recommend]
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

import numpy as np
import torch

from genco.data.contract import Catalog, Constraints
from genco.inference.chunked import decode_rows
from genco.inference.predictor import Predictor
from genco.models.generator import Generator, GeneratorConfig
from genco.models.reward import RewardModel, RewardModelConfig
from genco.models.vocab import Vocab
from genco.worlds.catalog import CatalogWorld, CatalogWorldConfig, simulate_catalog

CHILD = """
import json, sys, time
from genco.data.contract import load_catalog, load_constraints
from genco.data.ingest import ingest

def kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])

world, out = sys.argv[1], sys.argv[2]
t, cpu = time.perf_counter(), time.process_time()
cat = load_catalog(world + "/catalog.parquet")
nbytes = cat.nbytes  # before any hash index
cons = load_constraints(world + "/constraints.csv", cat)
load_s, load_cpu = time.perf_counter() - t, time.process_time() - cpu
base, base_peak = kb("VmRSS:"), kb("VmHWM:")
with open("/proc/self/clear_refs", "w") as f:  # peak RSS from here on: the log's own
    f.write("5")
t, cpu = time.perf_counter(), time.process_time()
s = ingest(world + "/impressions", cat, cons, out)
print(json.dumps({"catalog_load_s": load_s, "catalog_load_cpu_s": load_cpu,
                  "seconds": time.perf_counter() - t, "cpu_s": time.process_time() - cpu,
                  "rows": s.rows_in, "valid": s.rows_valid, "rss_after_catalog_kb": base,
                  "peak_after_catalog_load_kb": base_peak, "peak_rss_kb": kb("VmHWM:"),
                  "catalog_nbytes": nbytes, "catalog_nbytes_with_indexes": cat.nbytes}))
"""


def bench_ingest(ads: int, sizes: list[int], work: str, extrapolate: int) -> dict:
    config = CatalogWorldConfig(n_ads=ads)
    runs = []
    for n in sizes:
        world = os.path.join(work, f"world_{ads}_{n}")
        t = time.perf_counter()
        if not os.path.exists(os.path.join(world, "world.json")):
            shutil.rmtree(world, ignore_errors=True)
            simulate_catalog(config, seed=0, out_dir=world, n_impressions=n)
        gen_s = time.perf_counter() - t
        out = os.path.join(work, f"valid_{ads}_{n}")
        shutil.rmtree(out, ignore_errors=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        p = subprocess.run(
            [sys.executable, "-c", CHILD, world, out],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        r = json.loads(p.stdout)
        with open(os.path.join(world, "world.json"), encoding="utf-8") as f:
            stats = json.load(f)
        runs.append(
            {
                "rows": n,
                "catalog_rows": stats["catalog_rows"],
                "files": sum(len(fs) for _, _, fs in os.walk(os.path.join(world, "impressions"))),
                "generate_s": round(gen_s, 1),
                "catalog_load_s": round(r["catalog_load_s"], 1),
                "catalog_load_cpu_s": round(r["catalog_load_cpu_s"], 1),
                "ingest_s": round(r["seconds"], 1),
                "ingest_cpu_s": round(r["cpu_s"], 1),
                "rows_per_s": round(n / r["seconds"]),
                "rows_per_cpu_s": round(n / r["cpu_s"]),
                "all_valid": r["valid"] == r["rows"] == n,
                "rss_after_catalog_mb": round(r["rss_after_catalog_kb"] / 1024),
                "peak_rss_mb": round(max(r["peak_rss_kb"], r["peak_after_catalog_load_kb"]) / 1024),
                "peak_rss_of_catalog_load_mb": round(r["peak_after_catalog_load_kb"] / 1024),
                "peak_rss_of_ingest_mb": round(r["peak_rss_kb"] / 1024),
                "catalog_arrays_mb": round(r["catalog_nbytes"] / 2**20),
                "catalog_arrays_with_indexes_mb": round(r["catalog_nbytes_with_indexes"] / 2**20),
            }
        )
        print(json.dumps(runs[-1]), file=sys.stderr)
    model = None
    if len(runs) >= 2:
        a, b = runs[-2], runs[-1]
        dn = b["rows"] - a["rows"]
        sec_per_row = (b["ingest_s"] - a["ingest_s"]) / dn
        mb_per_row = (b["peak_rss_mb"] - a["peak_rss_mb"]) / dn
        n = extrapolate
        model = {
            "fitted_on_rows": [a["rows"], b["rows"]],
            "seconds_per_million_rows": round(sec_per_row * 1e6, 2),
            "peak_rss_mb_per_million_rows": round(mb_per_row * 1e6, 2),
            "extrapolated_rows": n,
            "extrapolated_ingest_s": round(b["ingest_s"] + sec_per_row * (n - b["rows"])),
            "extrapolated_peak_rss_mb": round(b["peak_rss_mb"] + mb_per_row * (n - b["rows"])),
            "note": "extrapolated from the measured linear cost model, not measured",
        }
    return {"ads": ads, "runs": runs, "linear_model": model}


def _predictor(K: int, C: int, n_ads: int) -> Predictor:
    config = CatalogWorldConfig(
        n_ads=n_ads, n_components=K, min_candidates=C, max_candidates=C, ad_block=n_ads
    )
    world = CatalogWorld(config, seed=0)
    blk = world.block(0)
    catalog = Catalog.from_arrow(world.catalog_block(blk)[0])
    cons = Constraints.from_frame(world.constraint_rows(blk).to_pandas(), catalog)
    torch.manual_seed(0)
    vocab = Vocab.from_catalog(catalog, ())
    reward = RewardModel(vocab, RewardModelConfig()).eval()
    return Predictor(reward, Generator(vocab, GeneratorConfig()).eval(), catalog, cons)


def _rate(predictor: Predictor, n_ads: int, mode: str) -> float:
    predictor.exact_max = 10**9 if mode.endswith("exhaustive") else 0
    refine = "pairs" if mode.endswith("+pairs") else "none"
    predictor._bound = None  # fresh per-ad table caches: every ad's tables built in the run
    predictor._reward_tables.clear()
    # CPU seconds of this (single-threaded) process: ads per core, whatever else shares it.
    t = time.process_time()
    if mode.startswith("chunked"):  # genco recommend's path: a block of ads at a time
        decode_rows(predictor, np.arange(n_ads), None, 1, refine)
    else:  # one ad at a time, as serving decodes a request
        for ad in range(n_ads):
            predictor.decode(ad, None, top_k=1, refine=refine)
    return n_ads / (time.process_time() - t)


# chunked: ``genco recommend``'s path (``decode_rows``; it decodes spaces of at most
# ``Predictor.exact_max`` combinations exhaustively, others by beam + pairs); the others one ad
# at a time (``Predictor.decode``, serving's path).
MODES = ("chunked", "chunked+pairs", "chunked exhaustive", "beam", "beam+pairs", "exhaustive")


def bench_recommend(n_ads: int, exhaustive_max: int) -> list[dict]:
    torch.set_num_threads(1)
    grid = [(4, c) for c in (10, 20, 50)] + [(k, 10) for k in (3, 5, 6)]
    out = []
    for K, C in grid:
        predictor = _predictor(K, C, n_ads)
        row = {"components": K, "candidates": C, "combinations": C**K, "ads": n_ads}
        t = time.perf_counter()
        predictor.bound()
        row["bind_s"] = round(time.perf_counter() - t, 2)
        for mode in MODES:
            if mode.endswith("exhaustive") and row["combinations"] > exhaustive_max:
                row[f"{mode}_ads_per_s"] = None
                continue
            n = n_ads if mode != "exhaustive" else max(20, min(n_ads, 2 * 10**7 // C**K))
            if mode == "chunked exhaustive":
                n = max(20, min(n_ads, 2 * 10**8 // C**K))
            row[f"{mode}_ads_per_s"] = round(_rate(predictor, n, mode), 1)
        out.append(row)
        print(json.dumps(row), file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ads", type=int, default=100_000)
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--extrapolate", type=int, default=100_000_000)
    ap.add_argument("--recommend-ads", type=int, default=300)
    ap.add_argument("--exhaustive-max", type=int, default=100_000)
    ap.add_argument("--work", default="/tmp/genco-bench-scale")
    ap.add_argument("--skip", choices=("ingest", "recommend"), default=None)
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    result: dict = {
        "benchmark": "scale_data",
        "machine": f"{platform.machine()} {os.cpu_count()} cores, "
        f"python {platform.python_version()}, torch {torch.__version__}, 1 thread",
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.skip != "ingest":
        result["ingest"] = bench_ingest(args.ads, sorted(args.rows), args.work, args.extrapolate)
    if args.skip != "recommend":
        result["recommend"] = bench_recommend(args.recommend_ads, args.exhaustive_max)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
