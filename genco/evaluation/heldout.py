"""Held-out scoring of a reward model: the train/test split and the metrics on the test part.

Training reports these next to the model (``reward_metrics.json``); the gate scores a
candidate and production on the same split.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from genco.evaluation.metrics import auc, ece, log_loss, reliability, spearman
from genco.models.vocab import Encoded

if TYPE_CHECKING:
    from genco.models.reward import BoundModel


def evaluate_reward(bound: BoundModel, enc: Encoded, truth=None, n_bins: int = 10) -> dict:
    """Held-out AUC, log loss, ECE and reliability curve; with a ground truth, the same for
    the true CTR (the ceiling) and the learned-vs-true element-effect rank correlation."""
    p = bound.ctr(enc.ads, enc.combos, enc.ctx)
    out: dict = {
        "rows": len(enc),
        "clicks": int(enc.click.sum()),
        "auc": auc(enc.click, p),
        "log_loss": log_loss(enc.click, p),
        "ece": ece(enc.click, p, n_bins),
        "reliability": reliability(enc.click, p, n_bins).to_dict("records"),
    }
    if truth is not None:
        ctx = enc.ctx if truth.n_context else None
        pt = truth.ctr(enc.ads, enc.combos, ctx)
        out["truth_auc"] = auc(enc.click, pt)
        out["truth_log_loss"] = log_loss(enc.click, pt)
        if hasattr(truth, "element_effects"):
            learned, true = bound.element_effects(), truth.element_effects()
            per = [spearman(a, b) for a, b in zip(learned, true)]
            out["effect_spearman_per_component"] = per
            out["effect_spearman"] = float(np.mean(per))
    return out


def holdout_split(enc: Encoded, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Latest impressions by timestamp (random when there is none) as the test set."""
    n = len(enc)
    n_test = round(fraction * n)
    if enc.timestamp is not None:
        order = np.argsort(enc.timestamp, kind="stable")
    else:
        order = np.random.default_rng(seed).permutation(n)
    return order[: n - n_test], order[n - n_test :]
