"""Does scaling the reward model's training cost quality? Prints JSON.

Per world and seed: train the reward model on a simulated log, then report its log loss on a
fresh held-out log from the same policy and the gap it closes when its argmax over every legal
combination is scored by the TRUE CTR (gap closed = (ctr(pick) - ctr(uniform)) /
(ctr(best legal) - ctr(uniform)), averaged over evaluation points). Run it on two checkouts
(PYTHONPATH) to compare training loops before and after. ``--sparse`` gives every id table
sparse gradients (SparseAdam), whatever its size; ``--stream`` writes the log to Parquet and
fits it with the streaming trainer, its in-memory sample a tenth of the log.

    python bench/scale_quality.py --worlds interactions per_product --seeds 0 1 --n 200000
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time

import numpy as np
import torch

from genco.data.space import legal_combinations
from genco.evaluation.metrics import log_loss
from genco.models.reward import BoundModel, RewardModelConfig
from genco.models.vocab import encode
from genco.training.reward_fit import train_reward_model
from genco.worlds.simulate import WORLDS, contexts_frame, log_impressions, make_world


def run(name: str, seed: int, n: int, stream: bool) -> dict:
    world = make_world(WORLDS[name], seed)
    cat, cons, truth = world.catalog, world.constraints, world.truth
    log = log_impressions(world, n, seed)
    test = encode(log_impressions(world, 100_000, seed + 1000), cat)
    t = time.perf_counter()
    if stream:
        from genco.training.stream_fit import train_reward_model_stream

        with tempfile.TemporaryDirectory() as tmp:
            log.to_parquet(f"{tmp}/impressions.parquet")
            model, report = train_reward_model_stream(
                cat, f"{tmp}/impressions.parquet", RewardModelConfig(seed=seed),
                sample_rows=n // 10, chunk_rows=32_768, shuffle_rows=262_144,
            )  # fmt: skip
    else:
        model, report = train_reward_model(cat, encode(log, cat), RewardModelConfig(seed=seed))
    secs = time.perf_counter() - t
    bound = BoundModel(model, cat)
    p = bound.ctr(test.ads, test.combos, test.ctx)
    frame = contexts_frame(world)
    ctx_cols = [c for c in frame.columns if c.startswith("ctx_")]
    gaps = []
    for r in frame.to_dict("records"):
        ad = cat.ad_code(r["ad_id"])
        x = np.array([r[c] for c in ctx_cols], np.float32) if ctx_cols else None
        legal = legal_combinations(cat, cons, ad)
        X = None if x is None else np.tile(x, (len(legal), 1))
        ads = np.full(len(legal), ad)
        true = truth.ctr(ads, legal, X)
        with torch.inference_mode():
            pick = int(np.argmax(bound.logit(ads, legal, X)))
        gaps.append((true[pick] - true.mean()) / max(true.max() - true.mean(), 1e-12))
    return {
        "world": name,
        "seed": seed,
        "impressions": n,
        "heldout_log_loss": round(float(log_loss(test.click, p)), 6),
        "gap_closed": round(float(np.mean(gaps)), 4),
        "epochs": report.epochs,
        "train_seconds": round(secs, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--worlds", nargs="+", default=["interactions", "per_product"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--sparse", action="store_true", help="sparse gradients on every id table")
    ap.add_argument("--stream", action="store_true", help="the streaming trainer")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.sparse:
        import genco.models.optim

        genco.models.optim.SPARSE_MIN_ROWS = 0
    results = []
    for w in args.worlds:
        for s in args.seeds:
            results.append(run(w, s, args.n, args.stream))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(
        json.dumps(
            {
                "benchmark": "scale_quality",
                "machine": f"{platform.machine()} {torch.get_num_threads()} thread",
                "date": time.strftime("%Y-%m-%d"),
                "sparse": args.sparse,
                "stream": args.stream,
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
