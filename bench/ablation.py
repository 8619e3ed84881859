"""Generator ablations against one frozen reward model. Prints JSON.

One reward model is trained on the `interactions` world; each generator variant is trained
against it and judged by how often its decoded top-1 equals the reward model's exhaustive
argmax (greedy = beam width 1; beam = width 32 re-ranked by the reward model), and by the mean
regret in reward-model logit. Variants: credit level (combination / element reward-to-go /
counterfactual), behaviour-cloning warm start, group size.

    .venv/bin/python bench/ablation.py [--n 300000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict

import numpy as np

from genco.data.space import legal_combinations
from genco.models.generator import BoundGenerator, GeneratorConfig, train_generator
from genco.models.reward import BoundModel, RewardModelConfig
from genco.models.vocab import encode
from genco.training.bundle import clicked_for_warm_start
from genco.training.reward_fit import train_reward_model
from genco.worlds.simulate import WORLDS, log_impressions, make_world

VARIANTS = {
    "combination (default)": {},
    "element reward-to-go": {"credit": "element"},
    "counterfactual": {"credit": "counterfactual"},
    "combination + warm start 200": {"warm_start_steps": 200},
    "element + warm start 200": {"credit": "element", "warm_start_steps": 200},
    "group size 8": {"group_size": 8, "prompts": 128},
    "group size 64": {"group_size": 64, "prompts": 16},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=300_000)
    ap.add_argument("--world", default="interactions")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    world = make_world(WORLDS[args.world], 0)
    enc = encode(log_impressions(world, args.n, 0), world.catalog)
    reward, _ = train_reward_model(world.catalog, enc, RewardModelConfig())
    bound = BoundModel(reward, world.catalog)
    pool = enc.ctx if enc.ctx.shape[1] else None
    best = []
    for a in range(world.catalog.n_ads):
        legal = legal_combinations(world.catalog, world.constraints, a)
        best.append((legal, bound.logit(np.full(len(legal), a), legal)))
    results = []
    for label in args.variants:
        kw = VARIANTS[label]
        cfg = GeneratorConfig(**kw)
        t = time.perf_counter()
        clicked = clicked_for_warm_start(enc) if cfg.warm_start_steps else None
        model, report = train_generator(
            bound, world.catalog, world.constraints, pool, cfg, clicked=clicked
        )
        secs = time.perf_counter() - t
        gen = BoundGenerator(model, world.catalog, world.constraints)
        greedy = beam = 0
        regret = []
        for a, (legal, m) in enumerate(best):
            top = legal[np.argmax(m)]
            g1, _ = gen.beam(a, None, 1)
            codes, _ = gen.beam(a, None, 32)
            s = bound.logit(np.full(len(codes), a), codes)
            greedy += bool(np.array_equal(g1[0], top))
            beam += bool(np.array_equal(codes[np.argmax(s)], top))
            regret.append(float(m.max() - s.max()))
        curve = [round(h["reward"], 3) for h in report.history[:: max(1, len(report.history) // 6)]]
        results.append(
            {
                "variant": label,
                "config": {k: v for k, v in asdict(cfg).items() if k in kw},
                "greedy_equals_exhaustive": round(greedy / len(best), 3),
                "beam32_equals_exhaustive": round(beam / len(best), 3),
                "mean_regret_logit": round(float(np.mean(regret)), 4),
                "seconds": round(secs, 1),
                "reward_curve": curve,
            }
        )
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(
        json.dumps(
            {
                "benchmark": "generator ablation",
                "world": args.world,
                "impressions": args.n,
                "machine": f"{platform.machine()} {os.cpu_count()} cores",
                "date": time.strftime("%Y-%m-%d"),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
