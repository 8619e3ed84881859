"""Quality of GenCO against its peers on the same logs and the same ground truth. Prints JSON.

Methods (top-1 per ad and context, scored by the TRUE CTR):
  uniform      uniform over legal combinations (expected CTR; the gap's zero)
  logging      the logging policy (expected CTR)
  per_element  best observed CTR per component chosen independently ("existing methods");
               when that combination is illegal, the best legal one by summed element logits
  vw           Vowpal Wabbit (genco.evaluation.baselines_vw), trained on the same log
  exhaustive   argmax of GenCO's reward model over every legal combination (the search limit)
  genco        GenCO (Predictor.decode, genco recommend's default): beam search (width 32)
               re-ranked by the reward model, the best improved by local search on the
               reward model (swaps of one component, then of two: refine="pairs")
  genco_single the same with swaps of one component only (refine="single")
  genco_beam   the same without the refinement (beam + re-rank only; Predictor's and REST's
               default)

gap closed = (ctr(pick) - ctr(uniform)) / (ctr(best legal) - ctr(uniform)), averaged.

    .venv/bin/python bench/quality.py --worlds interactions contextual aes large
    .venv/bin/python bench/quality.py --learning-curve interactions
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
from genco.evaluation.baselines_vw import VWRecommender
from genco.inference.predictor import Predictor
from genco.models.generator import BoundGenerator, GeneratorConfig, train_generator
from genco.models.reward import BoundModel, RewardModelConfig, train_reward_model
from genco.models.vocab import encode
from genco.worlds.simulate import (
    WORLDS,
    contexts_frame,
    log_impressions,
    make_world,
    policy_propensity,
)

SIZES = {
    "interactions": 1_000_000,
    "contextual": 1_000_000,
    "additive": 200_000,
    "constrained": 500_000,
    "confounded": 500_000,
    "cold_start": 200_000,
    "large": 1_000_000,
    "aes": 2_000_000,
}
VW_MAX_ROWS = 500_000  # VW trains on at most this many rows (time); recorded in the output


def load(name: str, n: int, seed: int = 0):
    """(catalog, constraints, truth, log, eval points [(ad, ctx)], logging propensity fn)."""
    if name == "aes":
        from genco.worlds.aes import load_aes_world, log_uniform

        w = load_aes_world()
        log = log_uniform(w, n, seed)
        points = [(0, None)]
        n_legal = w.n_legal
        return (
            w.catalog,
            w.constraints,
            w.truth,
            log,
            points,
            lambda a, c: np.full(len(c), 1.0 / n_legal),
        )
    w = make_world(WORLDS[name], seed)
    log = log_impressions(w, n, seed)
    frame = contexts_frame(w)
    ctx_cols = [c for c in frame.columns if c.startswith("ctx_")]
    points = [
        (w.catalog.ad_code(r["ad_id"]), np.array([r[c] for c in ctx_cols]) if ctx_cols else None)
        for r in frame.to_dict("records")
    ]
    return w.catalog, w.constraints, w.truth, log, points, lambda a, c: policy_propensity(w, a, c)


def per_element_pick(enc, catalog, constraints, ad: int, legal: np.ndarray) -> np.ndarray:
    """Independent best-CTR element per component (smoothed), repaired to a legal combo."""
    scores = []
    for k in range(catalog.n_components):
        n = len(catalog.elements[k])
        shows = np.bincount(enc.combos[:, k], minlength=n)
        clicks = np.bincount(enc.combos[:, k], weights=enc.click, minlength=n)
        rate = (clicks + 1) / (shows + 30)
        scores.append(np.log(rate))
    pick = np.array(
        [
            catalog.candidates[ad][k][np.argmax(scores[k][catalog.candidates[ad][k]])]
            for k in range(catalog.n_components)
        ]
    )
    if constraints.violations(np.array([ad]), pick[None])[0] < 0:
        return pick
    total = sum(scores[k][legal[:, k]] for k in range(catalog.n_components))
    return legal[np.argmax(total)]


def run_world(name: str, n: int, seed: int = 0, with_vw: bool = True) -> dict:
    t_all = time.perf_counter()
    catalog, constraints, truth, log, points, logging_p = load(name, n, seed)
    enc = encode(log, catalog)
    t = time.perf_counter()
    rm, rep = train_reward_model(catalog, enc, RewardModelConfig(seed=seed))
    rm_s = time.perf_counter() - t
    bound = BoundModel(rm, catalog)
    pool = enc.ctx if enc.ctx.shape[1] else None
    t = time.perf_counter()
    gen_model, _ = train_generator(bound, catalog, constraints, pool, GeneratorConfig(seed=seed))
    gen_s = time.perf_counter() - t
    gen = BoundGenerator(gen_model, catalog, constraints)
    predictor = Predictor(rm, gen_model, catalog, constraints)
    vw = None
    vw_s = None
    if with_vw:
        t = time.perf_counter()
        vw = VWRecommender(catalog, constraints).fit(log.iloc[:VW_MAX_ROWS])
        vw_s = time.perf_counter() - t

    methods = ["logging", "per_element", "exhaustive", "genco", "genco_single", "genco_beam"]
    methods += ["vw"] if vw else []
    gaps = {m: [] for m in methods}
    lifts = {m: [] for m in methods}
    agree, agree_single, agree_beam, scored_exh, exh_seconds = [], [], [], [], 0.0
    scored_genco, scored_single, scored_beam = [], [], []
    for ad, x in points:
        legal = legal_combinations(catalog, constraints, ad)
        X = None if x is None else np.tile(x, (len(legal), 1))
        ads = np.full(len(legal), ad)
        true = truth.ctr(ads, legal, X)
        uni, best = true.mean(), true.max()
        denom = max(best - uni, 1e-12)

        def ctr_of(combo, ad=ad, x=x):
            return float(truth.ctr(np.array([ad]), combo[None], None if x is None else x[None])[0])

        picks = {}
        with torch.inference_mode():
            t = time.perf_counter()
            m = bound.logit(ads, legal, X)
            exh_seconds += time.perf_counter() - t
            picks["exhaustive"] = legal[np.argmax(m)]
            scored_exh.append(len(legal))
            xf = None if x is None else np.asarray(x, np.float32)
            for method, refine, counts in (
                ("genco", "pairs", scored_genco),
                ("genco_single", "single", scored_single),
                ("genco_beam", "none", scored_beam),
            ):
                decoded = predictor.decode(ad, xf, top_k=1, refine=refine)
                picks[method] = decoded.codes[0]
                counts.append(decoded.scored)
        picks["per_element"] = per_element_pick(enc, catalog, constraints, ad, legal)
        if vw:
            picks["vw"] = vw.best(ad, x)
        for mth, combo in picks.items():
            c = ctr_of(combo)
            gaps[mth].append((c - uni) / denom)
            lifts[mth].append(c / uni - 1)
        lp = float(np.sum(logging_p(ad, legal) * true))
        gaps["logging"].append((lp - uni) / denom)
        lifts["logging"].append(lp / uni - 1)
        agree.append(bool(np.array_equal(picks["genco"], picks["exhaustive"])))
        agree_single.append(bool(np.array_equal(picks["genco_single"], picks["exhaustive"])))
        agree_beam.append(bool(np.array_equal(picks["genco_beam"], picks["exhaustive"])))

    out = {
        "world": name,
        "impressions": n,
        "eval_points": len(points),
        "gap_closed": {m: round(float(np.mean(v)), 4) for m, v in gaps.items()},
        "ctr_lift_vs_uniform": {m: round(float(np.mean(v)), 4) for m, v in lifts.items()},
        "genco_equals_exhaustive": round(float(np.mean(agree)), 4),
        "genco_single_equals_exhaustive": round(float(np.mean(agree_single)), 4),
        "genco_beam_equals_exhaustive": round(float(np.mean(agree_beam)), 4),
        "combinations_scored_per_point": {
            "genco": float(np.mean(scored_genco)),
            "genco_single": float(np.mean(scored_single)),
            "genco_beam": float(np.mean(scored_beam)),
            "exhaustive": float(np.mean(scored_exh)),
        },
        "seconds": {
            "reward_model": round(rm_s, 1),
            "generator": round(gen_s, 1),
            "train_total": round(rm_s + gen_s, 1),
            "vw": None if vw_s is None else round(vw_s, 1),
            "exhaustive_scoring": round(exh_seconds, 2),
            "all": round(time.perf_counter() - t_all, 1),
        },
        "reward_model_epochs": rep.epochs,
    }
    if vw:
        out["vw"] = {"mode": vw.mode_used, "train_rows": min(n, VW_MAX_ROWS)}
    if name not in ("aes", "large"):
        out["off_policy"] = off_policy(catalog, constraints, truth, log, enc, gen, points)
    return out


def off_policy(catalog, constraints, truth, log, enc, gen, points) -> dict:
    """IPS, SNIPS and slate pseudo-inverse estimates of the generator's SAMPLING policy value
    from the logs, with 95% normal CIs, against its true value on the logged ad/context mix."""
    n = min(len(enc), 50_000)
    e = enc.take(np.arange(n))
    mu = e.propensity
    slots = gen.masks.to_slots(e.ads, e.combos)
    ctx = e.ctx if e.ctx.shape[1] else None
    with torch.no_grad():
        logp = gen.log_prob(e.ads, ctx, slots)  # (n, K)
    pi = np.exp(logp.sum(1).numpy())
    w = pi / mu
    r = e.click
    ips = w * r
    snips = ips.sum() / w.sum()
    snips_terms = w * (r - snips) / w.mean()
    out = {"ips": _ci(ips), "snips": {"value": float(snips), "ci95": _half(snips_terms)}}
    # Pseudo-inverse (Swaminathan et al. 2017) for per-slot logging: uniform logging without
    # constraints is a product of per-slot uniforms; needs the target's per-slot marginals.
    if len(constraints) == 0 and np.allclose(mu, mu[0]):
        marg = _slot_marginals(gen, e.ads, ctx)
        terms = np.zeros(n)
        for k in range(catalog.n_components):
            n_k = np.array([len(catalog.candidates[a][k]) for a in e.ads])
            terms += marg[k][np.arange(n), slots[:, k].numpy()] * n_k
        pi_w = terms - (catalog.n_components - 1)
        out["pseudo_inverse"] = _ci(pi_w * r)
    # Truth: the sampling policy's expected true CTR on the same ad/context draws.
    with torch.no_grad():
        s = gen.sample(
            e.ads[:50_000],
            None if ctx is None else ctx[:50_000],
            generator=torch.Generator().manual_seed(1),
        ).slots
    codes = gen.masks.to_codes(torch.as_tensor(e.ads[:50_000]), s)
    true = truth.ctr(e.ads[:50_000], codes, None if ctx is None else ctx[:50_000])
    out["true_value"] = {"value": float(true.mean()), "ci95": _half(true)}
    out["logged_ctr"] = float(r.mean())
    return out


def _slot_marginals(gen, ads, ctx, draws: int = 32) -> list[np.ndarray]:
    """Per-slot marginal probabilities of the sampling policy, by Monte Carlo per row."""
    n = len(ads)
    marg = [np.zeros((n, m)) for m in gen.masks.M]
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _ in range(draws):
            s = gen.sample(ads, ctx, generator=g).slots
            for k in range(len(marg)):
                marg[k][np.arange(n), s[:, k].numpy()] += 1.0 / draws
    return marg


def _ci(x: np.ndarray) -> dict:
    return {"value": float(x.mean()), "ci95": _half(x)}


def _half(x: np.ndarray) -> float:
    return float(1.96 * x.std() / np.sqrt(len(x)))


def learning_curve(name: str, sizes: list[int]) -> dict:
    rows = []
    for n in sizes:
        r = run_world(name, n, with_vw=n <= VW_MAX_ROWS)
        rows.append({"impressions": n, **r["gap_closed"]})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    first = {
        m: next((row["impressions"] for row in rows if row.get(m, 0) >= 0.8), None)
        for m in ("genco", "exhaustive", "per_element", "vw")
    }
    return {"world": name, "curve": rows, "impressions_to_0.8_gap": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--worlds", nargs="*", default=[], choices=list(SIZES))
    ap.add_argument("--learning-curve", default=None, choices=list(SIZES))
    ap.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[25_000, 50_000, 100_000, 200_000, 500_000, 1_000_000],
    )
    ap.add_argument("--n", type=int, default=None, help="override the log size")
    ap.add_argument("--no-vw", action="store_true")
    args = ap.parse_args()
    out: dict = {
        "benchmark": "quality",
        "machine": f"{platform.machine()} {os.cpu_count()} cores, "
        f"python {platform.python_version()}, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "results": [],
    }
    for w in args.worlds:
        out["results"].append(run_world(w, args.n or SIZES[w], with_vw=not args.no_vw))
        print(json.dumps(out["results"][-1]), file=sys.stderr, flush=True)
    if args.learning_curve:
        out["learning_curve"] = learning_curve(args.learning_curve, args.sizes)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
