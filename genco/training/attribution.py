"""The "attribute rewards" step: train the reward model and write its attribution tables.

Per impression: each element's Shapley credit, summing exactly to the creative part of the
logit (the logit minus appeal). Per element: mean credit where it was shown, its average
marginal effect (defined for never-shown elements too), traffic, and a confidence interval.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pandas as pd

from genco.data import storage
from genco.data.contract import AD, CLICK, TIMESTAMP, Catalog
from genco.data.ingest import IngestConfig, validated_inputs
from genco.errors import ConfigError
from genco.evaluation.heldout import evaluate_reward, holdout_split
from genco.models.checkpoint import (
    ELEMENT_FILE,
    IMPRESSION_FILE,
    METRICS_FILE,
    save_reward_model,
)
from genco.models.reward import BoundModel, RewardModel, RewardModelConfig, train_reward_model
from genco.models.vocab import Encoded, encode


def impression_attributions(bound: BoundModel, enc: Encoded) -> pd.DataFrame:
    """One row per impression: ids, click, predicted CTR, appeal, creative logit, credits."""
    cat = bound.catalog
    base, credit = bound.credit(enc.ads, enc.combos, enc.ctx)  # (n,), (n, K)
    creative = credit.sum(1)
    df = pd.DataFrame({AD: np.asarray(cat.ads, dtype=object)[enc.ads]})
    for k, comp in enumerate(cat.components):
        df[comp] = np.asarray(cat.elements[k], dtype=object)[enc.combos[:, k]]
    df[CLICK] = enc.click.astype(np.int8)
    if enc.timestamp is not None:
        df[TIMESTAMP] = enc.timestamp
    df["predicted_ctr"] = 1.0 / (1.0 + np.exp(-(base + creative)))
    df["appeal_logit"] = base
    df["creative_logit"] = creative
    for k, comp in enumerate(cat.components):
        df[f"credit_{comp}"] = credit[:, k]
    return df


def element_table(bound: BoundModel, enc: Encoded) -> pd.DataFrame:
    """One row per catalog element, including never-shown ones (cold: effect from features).

    effect_se: 1/sqrt(sum p(1-p)) over the impressions that showed the element, the Laplace
    standard error of an additive logit coefficient with that much traffic.
    """
    cat = bound.catalog
    _, credit = bound.credit(enc.ads, enc.combos, enc.ctx)
    p = bound.ctr(enc.ads, enc.combos, enc.ctx)
    info = p * (1 - p)
    effects = bound.element_effects()
    seen = bound.model.seen.numpy()
    frames = []
    for k, comp in enumerate(cat.components):
        n_el = len(cat.elements[k])
        e = enc.combos[:, k]
        shows = np.bincount(e, minlength=n_el)
        clicks = np.bincount(e, weights=enc.click, minlength=n_el)
        credit_sum = np.bincount(e, weights=credit[:, k], minlength=n_el)
        info_sum = np.bincount(e, weights=info, minlength=n_el)
        with np.errstate(divide="ignore", invalid="ignore"):
            se = np.where(info_sum > 0, 1.0 / np.sqrt(info_sum), np.nan)
            frame = pd.DataFrame(
                {
                    "component": comp,
                    "element_id": list(cat.elements[k]),
                    "impressions": shows,
                    "clicks": clicks.astype(np.int64),
                    "observed_ctr": np.where(shows > 0, clicks / shows, np.nan),
                    "mean_credit": np.where(shows > 0, credit_sum / shows, np.nan),
                    "effect": effects[k],
                    "effect_se": se,
                    "ci_low": effects[k] - 1.96 * se,
                    "ci_high": effects[k] + 1.96 * se,
                    "cold": ~seen[
                        bound.elem_map[bound.cat_offsets[k] : bound.cat_offsets[k] + n_el].numpy()
                    ],
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
) -> dict:
    """Train on all but the latest test_fraction, evaluate on it, write model and tables."""
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in [0, 1), got {test_fraction}")
    config = config or RewardModelConfig()
    enc = encode(impressions, catalog)
    train_idx, test_idx = holdout_split(enc, test_fraction, config.seed)
    train = enc.take(train_idx)
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
        element_table(bound, enc), storage.join(out_dir, ELEMENT_FILE), client=client
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
    catalog, _, summary, valid = validated_inputs(
        catalog_path,
        impressions_path,
        constraints_path,
        storage.join(out_dir, "ingest"),
        ingest_config,
        progress,
        client,
    )
    metrics = fit_and_attribute(catalog, valid, out_dir, config, progress=progress, client=client)
    return {"ingest": summary.to_dict(), **metrics}
