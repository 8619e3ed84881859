"""The "attribute rewards" step: train the reward model and write its attribution tables.

Per impression: each element's Shapley credit, summing exactly to the creative part of the
logit (the logit minus appeal). Per element: mean credit where it was shown, its average
marginal effect (defined for never-shown elements too), traffic, and a confidence interval.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import pandas as pd

from genco.data import storage
from genco.data.contract import AD, CLICK, TIMESTAMP, Catalog, Constraints
from genco.data.ingest import IngestConfig, validated_inputs
from genco.data.space import legal_combinations
from genco.errors import ConfigError
from genco.evaluation.heldout import evaluate_reward, holdout_split
from genco.models.checkpoint import (
    ELEMENT_FILE,
    IMPRESSION_FILE,
    METRICS_FILE,
    save_reward_model,
)
from genco.models.reward import BoundModel, RewardModel, RewardModelConfig
from genco.models.vocab import Encoded, encode
from genco.training.reward_fit import TrainReport, train_reward_model


def impression_attributions(bound: BoundModel, enc: Encoded) -> pd.DataFrame:
    """One row per impression: ids, click, predicted CTR, appeal, creative logit, credits."""
    cat = bound.catalog
    base, credit = bound.credit(enc.ads, enc.combos, enc.ctx)  # (n,), (n, K)
    creative = credit.sum(1)
    df = pd.DataFrame({AD: cat.ads.take(enc.ads)})
    for k, comp in enumerate(cat.components):
        df[comp] = cat.elements[k].take(enc.combos[:, k])
    df[CLICK] = enc.click.astype(np.int8)
    if enc.timestamp is not None:
        df[TIMESTAMP] = enc.timestamp
    df["predicted_ctr"] = 1.0 / (1.0 + np.exp(-(base + creative)))
    df["appeal_logit"] = base
    df["creative_logit"] = creative
    for k, comp in enumerate(cat.components):
        df[f"credit_{comp}"] = credit[:, k]
    return df


# Per ad, its element effects average over at most this many of its legal combinations (all
# of them when it has fewer; else a uniform sample) and this many logged contexts.
EFFECT_COMBINATIONS = 4096
EFFECT_CONTEXTS = 8


def legal_sample(
    catalog: Catalog, constraints: Constraints, ad: int, n: int, rng: np.random.Generator
) -> np.ndarray:
    """Every legal combination of the ad when it has at most ``n``, else ``n`` uniform legal
    draws (rejection: each component uniform among the ad's candidates, illegal redrawn)."""
    if catalog.n_combinations(ad) <= n:
        return legal_combinations(catalog, constraints, ad)
    cands = catalog.candidates[ad]
    out = np.zeros((0, len(cands)), np.int64)
    for _ in range(100):
        draw = np.stack([c[rng.integers(len(c), size=n)] for c in cands], 1)
        if len(constraints):
            draw = draw[constraints.violations(np.full(n, ad), draw) < 0]
        out = np.concatenate([out, draw])[:n]
        if len(out) == n:
            break
    return out


def ad_effects(
    logit,
    catalog: Catalog,
    constraints: Constraints,
    contexts: np.ndarray | None,
    seed: int = 0,
) -> list[list[np.ndarray]]:
    """effects[a][k]: for each candidate of ad a's component k (``catalog.candidates[a][k]``
    order), its average marginal effect on the logit over the ad's own legal combinations:
    E[logit | e_k = e] - E[logit], averaged over ``contexts`` (rows (R, C); None = none).
    A candidate no legal combination uses gets NaN. ``logit(ads, combos, ctx)`` scores
    combinations: a ``BoundModel``'s, or a ground truth's to compare with."""
    cat = catalog
    rng = np.random.default_rng(seed)
    out = []
    for a in range(cat.n_ads):
        combos = legal_sample(cat, constraints, a, EFFECT_COMBINATIONS, rng)
        R = 1 if contexts is None else len(contexts)
        rows = np.repeat(combos, R, 0)
        X = None if contexts is None else np.tile(contexts, (len(combos), 1))
        z = logit(np.full(len(rows), a), rows, X).reshape(len(combos), R).mean(1)
        per = []
        for k, cands in enumerate(cat.candidates[a]):
            pos = np.searchsorted(cands, combos[:, k])
            total = np.bincount(pos, z, len(cands))
            count = np.bincount(pos, minlength=len(cands))
            with np.errstate(invalid="ignore", divide="ignore"):
                per.append(np.where(count > 0, total / count, np.nan) - z.mean())
        out.append(per)
    return out


def context_mix(enc: Encoded) -> np.ndarray | None:
    """EFFECT_CONTEXTS logged context rows (drawn with a fixed seed): the log's context mix."""
    if not enc.ctx.shape[1]:
        return None
    pick = np.random.default_rng(0).choice(len(enc), min(EFFECT_CONTEXTS, len(enc)), False)
    return enc.ctx[np.sort(pick)]


def element_table(
    bound: BoundModel, enc: Encoded, constraints: Constraints | None = None
) -> pd.DataFrame:
    """One row per catalog row (ad, component, candidate), never-shown ones included (cold:
    effect from features).

    effect: average marginal effect over the ad's own legal combinations (``ad_effects``) in
    the log's context mix; effect_se: 1/sqrt(sum p(1-p)) over the ad's impressions that
    showed the element, the Laplace standard error of an additive logit coefficient with that
    much traffic.
    """
    cat = bound.catalog
    constraints = constraints if constraints is not None else Constraints.empty()
    _, credit = bound.credit(enc.ads, enc.combos, enc.ctx)
    p = bound.ctr(enc.ads, enc.combos, enc.ctx)
    info = p * (1 - p)
    effects = ad_effects(bound.logit, cat, constraints, context_mix(enc))
    seen = bound.model.seen.numpy()
    frames = []
    for k, comp in enumerate(cat.components):
        n_el = len(cat.elements[k])
        # Per catalog row (ad, element) sums over the log, rows found by their sorted keys
        # ad * n_el + element (an ads x elements table would not fit at catalog scale).
        ads, elems = cat.candidates.component(k)  # ad-major, elements sorted: keys sorted
        keys = ads * n_el + elems
        key = enc.ads * n_el + enc.combos[:, k]
        row = np.minimum(np.searchsorted(keys, key), len(keys) - 1)
        hit = keys[row] == key  # a validated log shows candidates only
        row, size = row[hit], len(keys)
        n = np.bincount(row, minlength=size)
        c = np.bincount(row, weights=enc.click[hit], minlength=size)
        credit_sum = np.bincount(row, weights=credit[hit, k], minlength=size)
        i = np.bincount(row, weights=info[hit], minlength=size)
        effect = np.concatenate([effects[a][k] for a in range(cat.n_ads)])
        with np.errstate(divide="ignore", invalid="ignore"):
            se = np.where(i > 0, 1.0 / np.sqrt(i), np.nan)
            frame = pd.DataFrame(
                {
                    AD: cat.ads.take(ads),
                    "component": comp,
                    "element_id": cat.elements[k].take(elems),
                    "impressions": n,
                    "clicks": c.astype(np.int64),
                    "observed_ctr": np.where(n > 0, c / n, np.nan),
                    "mean_credit": np.where(n > 0, credit_sum / n, np.nan),
                    "effect": effect,
                    "effect_se": se,
                    "ci_low": effect - 1.96 * se,
                    "ci_high": effect + 1.96 * se,
                    "cold": ~seen[bound.elem_map[bound.cat_offsets[k] + elems].numpy()],
                }
            )
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def fit_and_attribute(
    catalog: Catalog,
    impressions: pd.DataFrame,
    out_dir: str,
    config: RewardModelConfig | None = None,
    test_fraction: float = 0.1,
    init: RewardModel | None = None,
    progress: bool = False,
    client=None,
    constraints: Constraints | None = None,
    trained: Callable[[pd.DataFrame], tuple[RewardModel, TrainReport]] | None = None,
) -> dict:
    """Train on all but the latest test_fraction, evaluate on it, write model and tables
    (element effects over each ad's combinations that ``constraints`` leave legal).

    trained: fits the reward model on the training rows elsewhere (a distributed job)."""
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in [0, 1), got {test_fraction}")
    config = config or RewardModelConfig()
    enc = encode(impressions, catalog)
    train_idx, test_idx = holdout_split(enc, test_fraction, config.seed)
    train = enc.take(train_idx)
    if trained is not None:
        model, report = trained(impressions.iloc[train_idx].reset_index(drop=True))
    else:
        model, report = train_reward_model(catalog, train, config, progress=progress, init=init)
    bound = BoundModel(model, catalog)
    metrics: dict = {"train": asdict(report)}
    if len(test_idx) and 0 < enc.click[test_idx].sum() < len(test_idx):
        metrics["test"] = evaluate_reward(bound, enc.take(test_idx))
    save_reward_model(model, out_dir, extra={"train_rows": report.train_rows}, client=client)
    storage.write_table(
        impression_attributions(bound, enc), storage.join(out_dir, IMPRESSION_FILE), client=client
    )
    storage.write_table(
        element_table(bound, enc, constraints),
        storage.join(out_dir, ELEMENT_FILE),
        client=client,
    )
    storage.write_json(storage.join(out_dir, METRICS_FILE), metrics, client=client)
    return metrics


def run_attribute(
    catalog_path: str,
    impressions_path: str,
    out_dir: str,
    constraints_path: str | None = None,
    config: RewardModelConfig | None = None,
    ingest_config: IngestConfig | None = None,
    progress: bool = False,
    client=None,
) -> dict:
    """``genco attribute``: validate the log, then train, evaluate and attribute."""
    catalog, constraints, summary, valid = validated_inputs(
        catalog_path,
        impressions_path,
        constraints_path,
        storage.join(out_dir, "ingest"),
        ingest_config,
        progress,
        client,
    )
    metrics = fit_and_attribute(
        catalog, valid, out_dir, config, progress=progress, client=client, constraints=constraints
    )
    return {"ingest": summary.to_dict(), **metrics}
