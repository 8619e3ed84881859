"""Off-policy estimates on a logged click log: SNIPS of one deterministic policy, and the
paired SNIPS difference of two on the same rows (what the evaluation gate compares)."""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np


@dataclass
class PolicyValue:
    """SNIPS estimate of a policy's CTR on the logged rows."""

    value: float | None  # None when no logged impression matches the policy
    ci_low: float | None
    ci_high: float | None
    matched: int  # logged impressions whose combination is the policy's choice
    effective_n: float  # (sum w)^2 / sum w^2
    rows: int


@dataclass
class Difference:
    """Paired SNIPS estimate of V(candidate) - V(production) on the same logged rows."""

    value: float
    se: float
    ci_low: float  # two-sided ``confidence`` interval
    ci_high: float
    lower_bound: float  # one-sided ``confidence`` lower bound: what the "lcb" gate compares
    confidence: float


def snips(
    match: np.ndarray, click: np.ndarray, propensity: np.ndarray, confidence: float
) -> PolicyValue:
    w = match / propensity
    total = w.sum()
    if total <= 0:
        return PolicyValue(None, None, None, 0, 0.0, len(match))
    v = float((w * click).sum() / total)
    se = float(np.sqrt((w**2 * (click - v) ** 2).sum()) / total)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    return PolicyValue(
        v, v - z * se, v + z * se, int(match.sum()), float(total**2 / (w**2).sum()), len(match)
    )


def snips_difference(
    match_c: np.ndarray,
    match_p: np.ndarray,
    click: np.ndarray,
    propensity: np.ndarray,
    confidence: float,
) -> Difference | None:
    """SNIPS(candidate) - SNIPS(production) with a delta-method se from paired influence terms:
    psi_i = w_c,i (y_i - V_c) / sum w_c - w_p,i (y_i - V_p) / sum w_p, se = sqrt(sum psi^2)."""
    wc, wp = match_c / propensity, match_p / propensity
    if wc.sum() <= 0 or wp.sum() <= 0:
        return None
    vc = (wc * click).sum() / wc.sum()
    vp = (wp * click).sum() / wp.sum()
    psi = wc * (click - vc) / wc.sum() - wp * (click - vp) / wp.sum()
    se = float(np.sqrt((psi**2).sum()))
    d = float(vc - vp)
    z2 = NormalDist().inv_cdf(0.5 + confidence / 2)
    z1 = NormalDist().inv_cdf(confidence)
    return Difference(d, se, d - z2 * se, d + z2 * se, d - z1 * se, confidence)
