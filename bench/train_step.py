"""CPU time of one reward-model training step, by phase, on the synthetic per-product catalog
of ``bench/scale.py`` (4 components x 10 own candidates per ad). Prints JSON.

Two ways to update the sparse id tables: ``sparse`` (the tables' sparse gradients, coalesced
in RowAdam.step: what DDP still uses) and ``rows`` (RowStep: the batch's rows as small dense
leaves; what one process uses). Rounds alternate between the two so the machine's load
falls on both alike.

    python bench/train_step.py --ads 1000 --steps 60 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))


def setup(n_ads: int, batch: int):
    from scale import build

    from genco.models.optim import Optimizers
    from genco.models.reward import BoundModel, RewardModel, RewardModelConfig
    from genco.models.vocab import Vocab

    catalog, _, _ = build(n_ads)
    config = RewardModelConfig(l2_id=0.01)
    model = RewardModel(Vocab.from_catalog(catalog, ("ctx_0", "ctx_1")), config)
    bound = BoundModel(model, catalog)
    rng = np.random.default_rng(0)
    ads = rng.integers(n_ads, size=batch)
    slot = np.where(rng.random((batch, 1)) < 0.1, rng.integers(10, size=(batch, 4)), 0)
    combos = ads[:, None] * 10 + slot
    ctx = rng.random((batch, 2)).astype(np.float32)
    y = torch.as_tensor((rng.random(batch) < 0.05).astype(np.float32))
    return model, bound, config, Optimizers(model, 0.005), (ads, combos, ctx, y)


def step(model, bound, config, opt, data, mode: str) -> dict[str, float]:
    from genco.models.optim import RowStep
    from genco.training.reward_fit import l2_penalty

    ads, combos, ctx, y = data
    t: dict[str, float] = {}
    c = time.process_time()
    ad, elem, feats, x = bound._inputs(ads, combos, ctx)
    rows = RowStep(model, ad, elem) if mode == "rows" else None
    if rows is not None:
        ad, elem = rows.ad, rows.elem
    t["inputs"], c = time.process_time() - c, time.process_time()
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    loss = bce(model(ad, elem, feats, x), y) + l2_penalty(model, ad, elem, config)
    t["forward"], c = time.process_time() - c, time.process_time()
    opt.zero_grad()
    loss.backward()
    t["backward"], c = time.process_time() - c, time.process_time()
    opt.step(rows)
    t["optimizer"] = time.process_time() - c
    model.row_tables = None
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ads", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, bound, config, opt, data = setup(args.ads, args.batch)
    sums = {m: {} for m in ("sparse", "rows")}
    for _ in range(args.rounds):
        for mode in sums:
            for _ in range(5):  # warm-up
                step(model, bound, config, opt, data, mode)
            for _ in range(args.steps):
                for k, v in step(model, bound, config, opt, data, mode).items():
                    sums[mode][k] = sums[mode].get(k, 0.0) + v
    n = args.steps * args.rounds
    per = {m: {k: round(1e3 * v / n, 2) for k, v in s.items()} for m, s in sums.items()}
    for p in per.values():
        p["total"] = round(sum(p.values()), 2)
    us = {m: round(1e3 * p["total"] / args.batch, 3) for m, p in per.items()}
    print(json.dumps({
        "benchmark": "train_step",
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "ads": args.ads, "batch": args.batch, "steps": n,
        "cpu_ms_per_step": per,
        "cpu_us_per_impression": us,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
