"""GenCO against the baselines on worlds none of its defaults were tuned on. Prints JSON.

Each world departs from ``per_product`` in one way a real catalog might: five components
(7,776 combinations per ad: the generator's beam decodes, not exact scoring), wide components,
features that explain little, strong pairwise effects, skewed traffic and appeal, a
non-uniform confounded logging policy, constraints that forbid the best combinations, a
higher-rank interaction structure. Scored like ``bench/quality.py`` (``run_world``: the
TRUE CTR of each method's top-1 pick at every ad, gap closed), mean / sd / min over seeds.

    python bench/unseen.py --seeds 3 --n 300000 [--worlds pp_k5 ...] [--set feature_hidden=8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(__file__))

import quality  # bench/quality.py: run_world, summarise

from genco.worlds.config import WORLDS

BASE = "per_product"
UNSEEN = {
    "pp_k5": {"n_components": 5, "n_candidates": 6},
    "pp_wide": {"n_components": 3, "n_candidates": 14},
    "pp_weak_features": {"feature_share": 0.4},
    "pp_strong_pairs": {"interaction_scale": 0.3, "main_scale": 0.15},
    "pp_skewed": {"popularity_skew": 1.0, "appeal_scale": 1.0},
    "pp_confounded": {"epsilon": 0.3, "greedy": "confounded"},
    "pp_constrained": {"forbid_best_share": 0.5, "n_global_forbidden": 3},
    "pp_rank4": {"style_rank": 4, "n_features": 10},
}


def register(name: str, n: int) -> None:
    """Make ``name`` a world ``quality.run_world`` can load (named per_product_* so that it
    also scores attribution)."""
    key = f"per_product_{name}"
    WORLDS[key] = replace(WORLDS[BASE], name=key, n_impressions=n, **UNSEEN[name])
    quality.SIZES[key] = n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--worlds", nargs="*", default=list(UNSEEN), choices=list(UNSEEN))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=300_000)
    ap.add_argument("--genco-only", action="store_true")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    reward = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    out = {"benchmark": "unseen", "date": time.strftime("%Y-%m-%d %H:%M"), "n": args.n,
           "reward_model_overrides": reward, "results": []}  # fmt: skip
    for name in args.worlds:
        register(name, args.n)
        runs = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            r = quality.run_world(f"per_product_{name}", args.n, seed, False, not args.genco_only,
                                  reward)  # fmt: skip
            r["overrides"] = UNSEEN[name]
            runs.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
        out["results"].append({"world": name, "overrides": UNSEEN[name],
                               "gap_closed": quality.summarise(runs), "runs": runs})  # fmt: skip
        if args.out:
            with open(args.out, "w") as f:
                json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
