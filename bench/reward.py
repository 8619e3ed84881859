"""Reward model quality and speed against ground truth. Prints JSON.

For each world: train on a simulated log, evaluate on a fresh held-out log from the same
policy: AUC vs the true CTR's AUC, log loss, ECE, and the Spearman correlation of learned
element effects with the true ones, next to (a) per-element marginal CTR and (b) the same
model without the appeal term (the confounded world is where (b) should break).

    .venv/bin/python bench/reward.py [--worlds interactions confounded ...] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace

import numpy as np

from genco.evaluation.heldout import evaluate_reward
from genco.evaluation.metrics import spearman
from genco.models.reward import BoundModel, RewardModelConfig
from genco.models.vocab import encode
from genco.training.reward_fit import train_reward_model
from genco.worlds.simulate import WORLDS, log_impressions, make_world

SIZES = {
    "interactions": 1_000_000,
    "confounded": 300_000,
    "cold_start": 200_000,
    "additive": 200_000,
    "contextual": 300_000,
}


def marginal_effects(enc, catalog) -> list[np.ndarray]:
    """Per-element logit of the observed CTR where shown (the naive 'existing method')."""
    out = []
    for k in range(catalog.n_components):
        n = len(catalog.elements[k])
        shows = np.bincount(enc.combos[:, k], minlength=n)
        clicks = np.bincount(enc.combos[:, k], weights=enc.click, minlength=n)
        ctr = (clicks + 0.5) / (shows + 1.0)
        out.append(np.log(ctr / (1 - ctr)))
    return out


def per_component_spearman(learned, true, mask=None) -> float:
    vals = []
    for k, (a, b) in enumerate(zip(learned, true)):
        m = np.ones(len(a), bool) if mask is None else mask[k]
        if m.sum() >= 3:
            vals.append(spearman(a[m], b[m]))
    return float(np.mean(vals))


def run_world(name: str, n: int, seed: int = 0) -> dict:
    world = make_world(WORLDS[name], seed)
    log = log_impressions(world, n, seed)
    test = encode(log_impressions(world, 200_000, seed + 1000), world.catalog)
    enc = encode(log, world.catalog)
    true = world.truth.element_effects()
    shown = [
        np.bincount(enc.combos[:, k], minlength=len(e)) > 0
        for k, e in enumerate(world.catalog.elements)
    ]
    out: dict = {"world": name, "impressions": n}
    variants = {"genco": RewardModelConfig()}
    if name == "confounded":
        variants["no_appeal"] = replace(RewardModelConfig(), use_appeal=False)
    for label, cfg in variants.items():
        t = time.perf_counter()
        model, report = train_reward_model(world.catalog, enc, cfg)
        secs = time.perf_counter() - t
        bound = BoundModel(model, world.catalog)
        ev = evaluate_reward(bound, test, world.truth)
        learned = bound.element_effects()
        res = {
            "train_seconds": round(secs, 1),
            "epochs": report.epochs,
            "auc": round(ev["auc"], 4),
            "truth_auc": round(ev["truth_auc"], 4),
            "auc_gap": round(ev["truth_auc"] - ev["auc"], 4),
            "log_loss": round(ev["log_loss"], 5),
            "truth_log_loss": round(ev["truth_log_loss"], 5),
            "ece": round(ev["ece"], 5),
            "effect_spearman": round(per_component_spearman(learned, true), 3),
        }
        if name == "cold_start":
            cold = world.truth.cold
            res["cold_effect_spearman"] = round(per_component_spearman(learned, true, cold), 3)
        out[label] = res
    out["marginal_ctr_effect_spearman"] = round(
        per_component_spearman(marginal_effects(enc, world.catalog), true, shown), 3
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--worlds", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--quick", action="store_true", help="a tenth of the log sizes")
    args = ap.parse_args()
    results = []
    for w in args.worlds:
        n = SIZES[w] // (10 if args.quick else 1)
        results.append(run_world(w, n))
        print(json.dumps(results[-1]), flush=True, file=__import__("sys").stderr)
    print(
        json.dumps(
            {
                "benchmark": "reward",
                "machine": f"{platform.machine()} {os.cpu_count()} cores, "
                f"python {platform.python_version()}",
                "date": time.strftime("%Y-%m-%d"),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
