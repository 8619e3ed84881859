"""Does 1/propensity weighting help the reward model on the loop's own logs? Prints JSON.

Takes the training logs a ``genco loop`` run wrote (``OUT/round_NN/train_log.parquet``: every
round so far, each row with the propensity of the policy that served it) and fits the reward
model twice on each, unweighted (the direct method, the default) and weighted by
1/propensity normalised to mean 1 and clipped at ``max_weight`` (``RewardModelConfig``,
``propensity_weighting=True``). Each model is scored against the world's truth on every
legal combination of every ad (contexts: ctx_0 in {0, 1}, ctx_1 = 0):

  greedy_over_oracle   true CTR of the model's argmax / the oracle's, mean over (ad, ctx_0)
  rmse_all             RMSE of predicted vs true CTR over all legal combinations (uniform)
  rmse_top             the same over each (ad, ctx_0)'s 10 truly best combinations

    python bench/loop_weighting.py --runs bench/results/loop/interactions_s0 --logs 1 2
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pandas as pd
import torch

from genco.models.reward import BoundModel, RewardModelConfig
from genco.training.reward_fit import train_reward_model
from genco.worlds.traffic import load_traffic


def score(model, t) -> dict:
    bound = BoundModel(model, t.catalog)
    greedy, rmse_all, rmse_top = [], [], []
    flips = (0, 1) if t.context_columns else (None,)
    for a, legal in enumerate(t.legal):
        ads = np.full(len(legal), a)
        for f in flips:
            ctx = None if f is None else np.tile([float(f), 0.0], (len(legal), 1))
            true = t.ctr(ads, legal, ctx)
            with torch.inference_mode():
                pred = np.asarray(bound.ctr(ads, legal, ctx), dtype=np.float64)
            greedy.append(true[np.argmax(pred)] / true.max())
            rmse_all.append(np.mean((pred - true) ** 2))
            top = np.argsort(-true)[:10]
            rmse_top.append(np.mean((pred[top] - true[top]) ** 2))
    return {
        "greedy_over_oracle": float(np.mean(greedy)),
        "rmse_all": float(np.sqrt(np.mean(rmse_all))),
        "rmse_top": float(np.sqrt(np.mean(rmse_top))),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="genco loop output directories")
    p.add_argument("--logs", nargs="+", type=int, default=[1], help="round_NN train logs")
    p.add_argument("--epochs", type=int, default=RewardModelConfig.epochs)
    args = p.parse_args()
    torch.set_num_threads(1)
    out = []
    for run in args.runs:
        with open(os.path.join(run, "rounds.json")) as f:
            cfg = json.load(f)["config"]
        t = load_traffic(cfg["world"], cfg["seed"])
        for r in args.logs:
            log = pd.read_parquet(os.path.join(run, f"round_{r:02d}", "train_log.parquet"))
            row = {"run": run, "log_round": r, "rows": len(log),
                   "propensity_min": float(log["propensity"].min()),
                   "propensity_max": float(log["propensity"].max())}  # fmt: skip
            for weighted in (False, True):
                config = RewardModelConfig(epochs=args.epochs, propensity_weighting=weighted)
                model, _ = train_reward_model(t.catalog, log, config)
                row["weighted" if weighted else "direct"] = score(model, t)
            out.append(row)
            print(json.dumps(row))
    print(json.dumps({"args": vars(args), "results": out}, indent=1))


if __name__ == "__main__":
    main()
