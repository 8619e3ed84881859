"""Quality of GenCO against what a practitioner tries first, over several log seeds. Prints JSON.

Every method learns from the same log and is scored by the TRUE CTR of its top-1 pick at every
evaluation point (each ad, and each ctx_0 value in a contextual world; the AES table has one ad,
so there the log seed is what varies):

  per_element  each component's best smoothed observed CTR chosen independently ("existing
               methods"); repaired to the best legal combination by summed element scores
  empirical    the best observed CTR per (ad, context bucket), shrunk toward the bucket's CTR
               with a prior of 20 impressions
  fm           a plain factorization machine over ad id, element ids, element features and
               context (genco.evaluation.baselines.FactorizationMachine), argmax over legal
               combinations
  vw           Vowpal Wabbit (genco.evaluation.baselines_vw), on at most VW_MAX_ROWS rows (time)
  exhaustive   argmax of GenCO's reward model over every legal combination (its own optimum)
  genco        GenCO as served and recommended: ``Predictor.decode`` (exact on spaces of at
               most EXACT_MAX combinations; else the generator's beam plus the ad's
               best-evidenced combinations, refined on the reward model)

gap closed = (ctr(pick) - ctr(uniform)) / (ctr(best legal) - ctr(uniform)); per seed, its mean
over evaluation points; reported as mean, sd and min over seeds.

    python bench/quality.py --worlds aes per_product --seeds 5
    python bench/quality.py --learning-curve aes --sizes 50000 200000 2000000 --seeds 5
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

from genco.data.space import legal_combinations
from genco.evaluation.baselines import (
    EmpiricalBest,
    FactorizationMachine,
    per_element_pick,
    per_element_scores,
)
from genco.inference.predictor import EXACT_MAX, Predictor
from genco.models.generator import Generator, GeneratorConfig, train_generator
from genco.models.reward import BoundModel, RewardModelConfig
from genco.models.vocab import Vocab, encode
from genco.training.reward_fit import train_reward_model
from genco.worlds.simulate import WORLDS, contexts_frame, log_impressions, make_world

SIZES = {
    "interactions": 1_000_000,
    "contextual": 1_000_000,
    "large": 1_000_000,
    "aes": 2_000_000,
    "per_product": 500_000,
    "per_product_contextual": 500_000,
    "per_product_3way": 500_000,
}
VW_MAX_ROWS = 500_000
METHODS = ("per_element", "empirical", "fm", "vw", "exhaustive", "genco")


def load(name: str, n: int, seed: int):
    """(catalog, constraints, truth, log, eval points [(ad, ctx)]): world and log from seed."""
    if name == "aes":
        from genco.worlds.aes import load_aes_world, log_uniform

        w = load_aes_world()
        return w.catalog, w.constraints, w.truth, log_uniform(w, n, seed), [(0, None)]
    w = make_world(WORLDS[name], seed)
    frame = contexts_frame(w)
    ctx_cols = [c for c in frame.columns if c.startswith("ctx_")]
    points = [
        (w.catalog.ad_code(r["ad_id"]), np.array([r[c] for c in ctx_cols]) if ctx_cols else None)
        for r in frame.to_dict("records")
    ]
    return w.catalog, w.constraints, w.truth, log_impressions(w, n, seed), points


def run_world(
    name: str, n: int, seed: int, with_vw: bool, baselines: bool = True, reward: dict | None = None
) -> dict:
    """reward: RewardModelConfig fields to override (e.g. {"feature_hidden": 8})."""
    catalog, constraints, truth, log, points = load(name, n, seed)
    enc = encode(log, catalog)
    seconds: dict[str, float] = {}
    t, cpu = time.perf_counter(), time.process_time()
    rm, rep = train_reward_model(catalog, enc, RewardModelConfig(seed=seed, **(reward or {})))
    seconds["reward_model"] = time.perf_counter() - t
    fit_cpu = time.process_time() - cpu  # all threads of this process: comparable under load
    bound = BoundModel(rm, catalog)
    big = any(catalog.n_combinations(a) > EXACT_MAX for a in range(catalog.n_ads))
    t = time.perf_counter()
    if big:  # the generator decodes only spaces too large to score exactly
        pool = enc.ctx if enc.ctx.shape[1] else None
        gen, _ = train_generator(bound, catalog, constraints, pool, GeneratorConfig(seed=seed))
    else:
        gen = Generator(Vocab.from_catalog(catalog, enc.context_columns), GeneratorConfig())
    seconds["generator"] = time.perf_counter() - t
    predictor = Predictor(rm, gen, catalog, constraints, refine="pairs")
    fm = empirical = element_scores = vw = None
    if baselines:
        t = time.perf_counter()
        fm = FactorizationMachine(catalog).fit(enc)
        seconds["fm"] = time.perf_counter() - t
        empirical = EmpiricalBest(enc)
        element_scores = per_element_scores(enc, catalog)
    if with_vw and baselines:
        from genco.evaluation.baselines_vw import VWRecommender

        t = time.perf_counter()
        vw = VWRecommender(catalog, constraints).fit(log.iloc[:VW_MAX_ROWS])
        seconds["vw"] = time.perf_counter() - t

    methods = METHODS if baselines else ("exhaustive", "genco")
    gaps: dict[str, list[float]] = {m: [] for m in methods if m != "vw" or vw}
    for ad, x in points:
        legal = legal_combinations(catalog, constraints, ad)
        X = None if x is None else np.tile(x, (len(legal), 1))
        ads = np.full(len(legal), ad)
        true = truth.ctr(ads, legal, X)
        uni, best = true.mean(), true.max()
        xf = None if x is None else np.asarray(x, np.float32)
        with torch.inference_mode():
            picks = {
                "exhaustive": legal[np.argmax(bound.logit(ads, legal, X))],
                "genco": predictor.decode(ad, xf, top_k=1).codes[0],
            }
            if baselines:
                picks["fm"] = legal[np.argmax(fm.scores(ad, legal, xf))]
        if baselines:
            picks["per_element"] = per_element_pick(element_scores, catalog, constraints, ad, legal)
            picks["empirical"] = empirical.pick(ad, x, legal)
        if vw:
            picks["vw"] = vw.best(ad, x)
        for m, combo in picks.items():
            c = float(truth.ctr(np.array([ad]), combo[None], None if x is None else x[None])[0])
            gaps[m].append((c - uni) / max(best - uni, 1e-12))
    out = {
        "world": name,
        "seed": seed,
        "impressions": n,
        "eval_points": len(points),
        "gap_closed": {m: float(np.mean(v)) for m, v in gaps.items()},
        "tuning": rep.tuning,
        "reward_model_epochs": rep.epochs,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "reward_model_cpu_seconds": round(fit_cpu, 1),
    }
    if name.startswith("per_product"):
        out["attribution"] = attribution_quality(bound, enc, catalog, constraints, truth)
    return out


def attribution_quality(bound, enc, catalog, constraints, truth) -> dict:
    """Within each (ad, component), the Spearman correlation with the true per-ad marginal
    effects (over the ad's legal combinations, in the log's context mix) of GenCO's
    ``element_attribution.csv`` effect and of the raw observed CTR; averaged over groups."""
    from genco.evaluation.metrics import spearman
    from genco.training.attribution import ad_effects, context_mix, element_table

    table = element_table(bound, enc, constraints)
    ctx = context_mix(enc)
    true = ad_effects(lambda a, c, x: truth.logit(a, c, x), catalog, constraints, ctx)
    rows = {"effect": [], "observed_ctr": []}
    for k, comp in enumerate(catalog.components):
        part = table[table.component == comp]
        for a, ad_id in enumerate(catalog.ads):
            block = part[part.ad_id == ad_id]  # in catalog.candidates[a][k] order
            t = true[a][k]
            for col in rows:
                v = block[col].to_numpy(np.float64)
                ok = np.isfinite(v) & np.isfinite(t)
                if ok.sum() >= 3:
                    rows[col].append(spearman(v[ok], t[ok]))
    return {f"spearman_{c}": round(float(np.nanmean(v)), 4) for c, v in rows.items()}


def summarise(runs: list[dict]) -> dict:
    """Per method: mean, sd and min over seeds of the per-seed gap closed."""
    out = {}
    for m in runs[0]["gap_closed"]:
        v = np.array([r["gap_closed"][m] for r in runs])
        out[m] = {
            "mean": round(float(v.mean()), 4),
            "sd": round(float(v.std(ddof=1)) if len(v) > 1 else 0.0, 4),
            "min": round(float(v.min()), 4),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--worlds", nargs="*", default=[], choices=list(SIZES))
    ap.add_argument("--learning-curve", nargs="*", default=[], choices=list(SIZES))
    ap.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000, 500_000, 1_000_000])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--n", type=int, default=None, help="override the log size")
    ap.add_argument("--vw", action="store_true", help="also Vowpal Wabbit (slow)")
    ap.add_argument(
        "--genco-only",
        action="store_true",
        help="GenCO alone (the baselines do not depend on GenCO's code: reuse their runs)",
    )
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. + seeds - 1")
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="override GenCO's RewardModelConfig fields (JSON values), e.g. feature_hidden=8",
    )
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    reward = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    out: dict = {
        "benchmark": "quality",
        "machine": f"{platform.machine()} {os.cpu_count()} cores, "
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "seeds": list(range(args.first_seed, args.first_seed + args.seeds)),
        "reward_model_overrides": reward,
        "results": [],
        "learning_curves": [],
    }

    def series(name: str, n: int) -> dict:
        runs = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            runs.append(run_world(name, n, seed, args.vw, not args.genco_only, reward))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
        return {"world": name, "impressions": n, "gap_closed": summarise(runs), "runs": runs}

    for w in args.worlds:
        out["results"].append(series(w, args.n or SIZES[w]))
    for w in args.learning_curve:
        out["learning_curves"].append({"world": w, "curve": [series(w, n) for n in args.sizes]})
    text = json.dumps(out, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
