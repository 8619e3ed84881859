"""Training cost at scale: time and peak memory of the streamed reward fit vs impressions and
vs ads. Prints JSON.

Each point runs in its own process (so its peak RSS is its own) on a synthetic per-product
catalog: A ads, 4 components, 10 own candidates per ad and component (4 x 10 x A elements),
two element features, two discrete context columns (2 x 24 values: device, hour); the
log comes from an epsilon-greedy policy like the simulator's (each ad's greedy combination,
10% of impressions uniform over its combinations); clicks from a logistic truth (appeal +
element effects + context). The log is Parquet written in row groups, the fit
``genco.training.stream_fit.train_reward_model_stream`` with ``--epochs`` streamed epochs (a
fixed count, so points compare; a real fit stops early, at patience 3).

The cost model: fit = scan + sample fit (fixed: at most SAMPLE_ROWS impressions) +
epochs x (per-impression epoch cost x impressions) + residual pass; the per-impression
costs are measured at each size (linear if they agree), and 100M is extrapolated from them
with the epochs a real fit takes unless ``--impressions 100000000`` is run.

    python bench/scale.py          # 1M, 10M at 1k ads; 1k, 10k, 100k ads at 1M
    python bench/scale.py --impressions 1000000 --ads 1000  # one series
    python bench/scale.py --device cuda --impressions 10000000 --ads 1000 100000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

K, M, F, C = 4, 10, 2, 2
EPSILON = 0.1


def build(n_ads: int, seed: int = 0):
    """(catalog, truth effects) of the synthetic per-product catalog."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from genco.data.contract import Catalog
    from genco.data.ids import Candidates, Ids

    def ids(prefix: str, n: int) -> Ids:  # Arrow strings, no Python str per id
        return Ids(
            pc.binary_join_element_wise(prefix, pc.cast(pa.array(np.arange(n)), pa.string()), "")
        )

    rng = np.random.default_rng(seed)
    n_el = n_ads * M
    effects = [rng.normal(0, 0.4, n_el) for _ in range(K)]
    feats = [
        np.column_stack([e + rng.normal(0, 0.3, n_el), rng.normal(0, 1, n_el)]) for e in effects
    ]
    # ad a's candidates of every component: elements a * M .. a * M + M - 1
    values = (np.arange(n_ads)[:, None, None] * M + np.arange(M)[None, None, :]).repeat(K, 1)
    catalog = Catalog(
        components=tuple(f"c{k}" for k in range(K)),
        ads=ids("a", n_ads),
        elements=tuple(ids(f"e{k}_", n_el) for k in range(K)),
        feature_names=("feat_0", "feat_1"),
        features=tuple(feats),
        candidates=Candidates(np.arange(0, n_ads * K * M + 1, M), values.ravel(), K),
    )
    return catalog, effects, rng.normal(0, 0.3, n_ads)


def write_log(path: str, n: int, n_ads: int, effects, appeal, seed: int = 0) -> float:
    """n impressions in row groups of 1M; returns seconds."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t = time.perf_counter()
    rng = np.random.default_rng(seed + 1)
    writer = None
    for start in range(0, n, 1_000_000):
        b = min(1_000_000, n - start)
        ads = rng.integers(n_ads, size=b)
        slot = np.where(rng.random((b, 1)) < EPSILON, rng.integers(M, size=(b, K)), 0)
        el = ads[:, None] * M + slot  # slot 0: the ad's greedy combination
        ctx = np.column_stack([rng.integers(2, size=b), rng.integers(24, size=b) / 23.0])
        ctx = ctx.astype(np.float32)
        z = -3.0 + appeal[ads] + sum(effects[k][el[:, k]] for k in range(K)) + 0.3 * ctx[:, 0]
        click = (rng.random(b) < 1 / (1 + np.exp(-z))).astype(np.int8)

        def ids(prefix: str, codes: np.ndarray) -> pa.Array:
            return pc.binary_join_element_wise(prefix, pc.cast(pa.array(codes), pa.string()), "")

        cols = {"ad_id": ids("a", ads)}
        for k in range(K):
            cols[f"c{k}"] = ids(f"e{k}_", el[:, k])
        cols["click"] = pa.array(click)
        cols["timestamp"] = pa.array(1.7e9 + (start + np.arange(b)) * 0.01)
        for j in range(C):
            cols[f"ctx_{j}"] = pa.array(ctx[:, j])
        table = pa.table(cols)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()
    return time.perf_counter() - t


def one(n: int, n_ads: int, epochs: int, device: str, sample_rows: int) -> dict:
    """One point, in this process."""
    import torch

    from genco.models.reward import RewardModelConfig
    from genco.training.stream_fit import train_reward_model_stream

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t = time.perf_counter()
    catalog, effects, appeal = build(n_ads)
    catalog_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory(dir=os.environ.get("SCALE_TMP")) as tmp:
        path = f"{tmp}/impressions.parquet"
        write_s = write_log(path, n, n_ads, effects, appeal)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        config = RewardModelConfig(epochs=epochs, patience=epochs, device=device)
        t = time.perf_counter()
        _, report = train_reward_model_stream(catalog, path, config, sample_rows=sample_rows)
        fit_s = time.perf_counter() - t
    if device != "cpu" and torch.cuda.is_available():
        gpu_peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        gpu_peak = None
    secs, cpu = report.tuning["seconds"], report.tuning["cpu_seconds"]
    epoch_s = [h["seconds"] for h in report.history]
    epoch_cpu = [h["cpu_seconds"] for h in report.history]
    return {
        "impressions": n,
        "ads": n_ads,
        "elements": K * M * n_ads,
        "device": device,
        "threads": torch.get_num_threads(),
        "catalog_build_s": round(catalog_s, 1),
        "log_write_s": round(write_s, 1),
        "fit_s": round(fit_s, 1),
        "phases_s": secs,
        "phases_cpu_s": cpu,
        "epoch_s": epoch_s,
        "epoch_cpu_s": epoch_cpu,
        # Per impression, in CPU time of this process (wall time on a shared machine
        # counts the other jobs too):
        "epoch_us_per_impression": round(1e6 * float(np.mean(epoch_cpu)) / n, 3),
        "scan_us_per_impression": round(1e6 * cpu["scan"] / n, 3),
        "residual_us_per_impression": round(1e6 * cpu["residuals"] / n, 3),
        "sample_rows": report.tuning["sample_rows"],
        "val_loss": [round(h["val_loss"], 5) for h in report.history],
        "peak_rss_gib_before_fit": round(rss_before, 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "gpu_peak_gib": None if gpu_peak is None else round(gpu_peak, 2),
    }


def extrapolate(points: list[dict], n: int, epochs: int) -> dict:
    """The cost model at n impressions from the measured per-impression costs (the largest
    log measured at the same catalog) plus the fixed sample fit."""
    p = max(points, key=lambda q: q["impressions"])
    per = p["epoch_us_per_impression"] * epochs + p["scan_us_per_impression"]
    per += p["residual_us_per_impression"]
    fixed = p["phases_cpu_s"]["sample_fit"]
    total = fixed + per * n / 1e6
    return {
        "impressions": n,
        "ads": p["ads"],
        "from_impressions": p["impressions"],
        "epochs": epochs,
        "cpu_hours_one_process": round(total / 3600, 2),
        "workers_for_one_hour": int(np.ceil(total / 3600)),
        "model": f"{fixed:.0f} s + {per:.2f} us x impressions",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--impressions", type=int, nargs="*", default=None)
    ap.add_argument("--ads", type=int, nargs="*", default=None)
    ap.add_argument("--epochs", type=int, default=2, help="streamed epochs per point")
    ap.add_argument("--real-epochs", type=int, default=5, help="epochs a real fit takes (model)")
    ap.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--sample-rows", type=int, default=200_000)
    ap.add_argument("--one", nargs=2, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.epochs, args.device, args.sample_rows)))
        return
    if args.impressions is None and args.ads is None:
        grid = [(1_000_000, 1000), (10_000_000, 1000), (1_000_000, 10_000), (1_000_000, 100_000)]
    else:
        grid = [(n, a) for n in args.impressions or [1_000_000] for a in args.ads or [1000]]
    points = []
    for n, a in grid:
        cmd = [sys.executable, __file__, "--one", str(n), str(a), "--epochs", str(args.epochs)]
        cmd += ["--device", args.device, "--sample-rows", str(args.sample_rows)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            points.append({"impressions": n, "ads": a, "error": done.stderr[-2000:]})
        else:
            points.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(points[-1]), file=sys.stderr, flush=True)
    ok = [p for p in points if "error" not in p]
    by_ads = {a: [p for p in ok if p["ads"] == a] for a in {p["ads"] for p in ok}}
    out = {
        "benchmark": "scale",
        "machine": f"{platform.machine()} {os.cpu_count()} cores, python "
        f"{platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "points": points,
        "extrapolated_100M": [
            extrapolate(ps, 100_000_000, args.real_epochs) for ps in by_ads.values() if ps
        ],
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
