"""What a log of n uniform impressions can identify at best: ceilings for the quality targets.
Prints JSON.

Per-product worlds. Each element's main effect is a function of its features plus an
idiosyncratic part no feature explains (``World.idiosyncratic``); only the element's own clicks
tell that part. The *structure oracle* knows everything else exactly (the feature functions,
pairwise and three-way terms, appeal) and estimates each idiosyncratic part as well as its
traffic allows: the Bayes posterior mean s_e (d_e + se_e z), with d_e the true part, se_e =
1 / sqrt(n_e p (1 - p)) from the element's impressions n_e in the log and the world's CTR p,
s_e = tau^2 / (tau^2 + se_e^2) and tau the parts' true SD. That is more than any model can know
(it is handed the structure and the prior), so its gap closed and attribution Spearman are upper
bounds on what a reward model fitted to that log can reach, up to the noise of the draws.

AES table (no features): the picks by observed CTR over simulated uniform logs, the
nonparametric reference (its mean gap closed, and how often it picks a combination closing less
than 0.85).

    python bench/ceiling.py --worlds per_product per_product_contextual --seeds 5
    python bench/ceiling.py --aes --sizes 500000 2000000
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from genco.data.space import legal_combinations
from genco.evaluation.metrics import spearman
from genco.training.attribution import ad_effects
from genco.worlds.simulate import WORLDS, contexts_frame, log_impressions, make_world

DRAWS = 3  # noise draws of the oracle's idiosyncratic estimates per seed


def _flip(truth, X: np.ndarray | None, n: int) -> np.ndarray:
    if not truth.n_context:
        return np.ones(n)
    return 1.0 + truth.config.context_flip * np.where(X[:, 0] > 0.5, 1.0, -1.0)


def structure_oracle(name: str, seed: int, n: int) -> dict:
    w = make_world(WORLDS[name], seed)
    truth, cat, K = w.truth, w.catalog, w.catalog.n_components
    log = log_impressions(w, n, seed)
    p = float(log["click"].mean())
    tau2 = float(np.mean([d.var() for d in w.idiosyncratic]))
    counts = [
        log[comp].map({e: i for i, e in enumerate(cat.elements[k])}).value_counts()
        for k, comp in enumerate(cat.components)
    ]
    n_e = [
        np.bincount(c.index.to_numpy(), c.to_numpy(), len(cat.elements[k]))
        for k, c in enumerate(counts)
    ]
    se2 = [1.0 / np.maximum(m * p * (1 - p), 1e-12) for m in n_e]
    shrink = [tau2 / (tau2 + s) for s in se2]
    frame = contexts_frame(w)
    ctx_cols = [c for c in frame.columns if c.startswith("ctx_")]
    points = [
        (cat.ad_code(r["ad_id"]), np.array([r[c] for c in ctx_cols]) if ctx_cols else None)
        for r in frame.to_dict("records")
    ]
    ctx_mix = np.array([[1.0, 0.0], [0.0, 0.0]]) if truth.n_context else None
    true_effects = ad_effects(truth.logit, cat, w.constraints, ctx_mix)
    idio = w.idiosyncratic
    gaps, no_idio, spear = [], [], []
    for draw in range(DRAWS):
        rng = np.random.default_rng([seed, draw])
        est = [s * (d + np.sqrt(v) * rng.normal(size=len(d))) for s, d, v in zip(shrink, idio, se2)]

        def logit(a, c, X, est=est):
            f = _flip(truth, X, len(a))
            return truth.logit(a, c, X) + sum(
                (est[k][c[:, k]] - idio[k][c[:, k]]) * f for k in range(K)
            )

        g = []
        for ad, x in points:
            legal = legal_combinations(cat, w.constraints, ad)
            X = None if x is None else np.tile(x, (len(legal), 1))
            ads = np.full(len(legal), ad)
            z = truth.logit(ads, legal, X)
            ctr = 1 / (1 + np.exp(-z))
            uni, best = ctr.mean(), ctr.max()
            g.append((ctr[np.argmax(logit(ads, legal, X))] - uni) / (best - uni))
            if draw == 0:
                f = _flip(truth, X, len(ads))
                without = z - sum(idio[k][legal[:, k]] * f for k in range(K))
                no_idio.append((ctr[np.argmax(without)] - uni) / (best - uni))
        gaps.append(float(np.mean(g)))
        effects = ad_effects(logit, cat, w.constraints, ctx_mix)
        rho = []
        for a in range(cat.n_ads):
            for k in range(K):
                t, e = true_effects[a][k], effects[a][k]
                ok = np.isfinite(t) & np.isfinite(e)
                if ok.sum() >= 3:
                    rho.append(spearman(e[ok], t[ok]))
        spear.append(float(np.nanmean(rho)))
    return {
        "world": name,
        "seed": seed,
        "impressions": n,
        "idiosyncratic_sd": round(float(np.sqrt(tau2)), 4),
        "median_impressions_per_element": float(np.median(np.concatenate(n_e))),
        "median_shrink": round(float(np.median(np.concatenate(shrink))), 3),
        "gap_closed_without_idiosyncratic": round(float(np.mean(no_idio)), 4),
        "gap_closed_oracle": round(float(np.mean(gaps)), 4),
        "attribution_spearman_oracle": round(float(np.mean(spear)), 4),
    }


def aes_empirical(n: int, logs: int) -> dict:
    from genco.worlds.aes import load_aes_world

    w = load_aes_world()
    legal = legal_combinations(w.catalog, w.constraints, 0)
    ctr = w.truth.ctr(np.zeros(len(legal), np.int64), legal, None)
    uni, best = ctr.mean(), ctr.max()
    rng = np.random.default_rng(0)
    per = rng.multinomial(n, np.full(len(legal), 1 / len(legal)), size=logs)
    clicks = rng.binomial(per, ctr)
    picks = np.argmax(clicks / np.maximum(per, 1), 1)
    g = (ctr[picks] - uni) / (best - uni)
    top = np.sort(ctr)[::-1]
    return {
        "world": "aes",
        "impressions": n,
        "simulated_logs": logs,
        "best_ctrs": [round(float(c), 5) for c in top[:3]],
        "observed_best_gap_closed_mean": round(float(g.mean()), 4),
        "share_of_logs_below_0.85": round(float((g < 0.85).mean()), 4),
        "prob_5_seeds_all_at_least_0.85": round(float((g >= 0.85).mean() ** 5), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--worlds", nargs="*", default=[], choices=[w for w in WORLDS if "product" in w]
    )
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--n", type=int, default=None, help="log size (default: the world's)")
    ap.add_argument("--aes", action="store_true")
    ap.add_argument("--sizes", type=int, nargs="+", default=[500_000, 1_000_000, 2_000_000])
    ap.add_argument("--logs", type=int, default=2000, help="simulated AES logs per size")
    args = ap.parse_args()
    out: dict = {"benchmark": "ceiling", "date": time.strftime("%Y-%m-%d %H:%M"), "results": []}
    for name in args.worlds:
        n = args.n or WORLDS[name].n_impressions
        runs = [structure_oracle(name, s, n) for s in range(args.seeds)]
        summary = {
            key: {
                "mean": round(float(np.mean([r[key] for r in runs])), 4),
                "min": round(float(np.min([r[key] for r in runs])), 4),
            }
            for key in (
                "gap_closed_without_idiosyncratic",
                "gap_closed_oracle",
                "attribution_spearman_oracle",
            )
        }
        out["results"].append({"world": name, "impressions": n, "summary": summary, "runs": runs})
    if args.aes:
        out["results"] += [aes_empirical(n, args.logs) for n in args.sizes]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
