"""Off-policy estimates on a logged click log: SNIPS of one deterministic policy, the paired
SNIPS difference of two on the same rows with a normal (delta-method) bound, the same
difference with a clipped-weight empirical-Bernstein lower bound that holds for
heavy-tailed importance weights (what the evaluation gate compares), and the online A/B
difference of two arms' own clicks (what promotes or rolls back a canary)."""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from genco.errors import ContractError


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
    lower_bound: float  # one-sided ``confidence`` lower bound: what the gate compares
    confidence: float
    method: str = "normal"  # "normal" (delta method) or "bernstein" (clipped, empirical Bernstein)
    clip: float | None = None  # the candidate's weight cap ("bernstein")
    rows: int = 0
    rows_differ: int = 0  # rows where the two policies choose differently
    ess_differ: float = 0.0  # candidate's matched effective sample size on those rows


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


def bernstein_difference(
    match_c: np.ndarray,
    match_p: np.ndarray,
    click: np.ndarray,
    propensity: np.ndarray,
    confidence: float,
    clip: float,
) -> Difference | None:
    """A lower bound of V(candidate) - V(production) that holds for heavy-tailed weights.

    Per row z_i = min(w_i, clip) m_c,i y_i - w_i m_p,i y_i with w_i = 1 / p_i: clipping only
    lowers the candidate's term (clicks are >= 0) and production's is unbiased, so
    E[z] <= V(candidate) - V(production) (Thomas et al. 2015, high-confidence off-policy
    evaluation, on the paired difference). The bound on E[z] is Maurer & Pontil's (2009,
    Thm. 4) empirical Bernstein, for z in [a, b]:
    mean - sqrt(2 var ln(2/delta) / n) - 7 (b - a) ln(2/delta) / (3 (n - 1)), delta = 1 -
    confidence, var the unbiased sample variance; b = clip and a = -max_i w_i m_p,i (production
    is served on most gated rows, so its weights stay near 1; one huge production weight
    widens the range and fails the gate closed). A few exploration impressions with weights
    of 10^4 can no longer make the bound tight: past ``clip`` they count as ``clip``.
    ``value``, ``se`` and the two-sided interval are ``snips_difference``'s, for information."""
    n = len(click)
    if n < 2 or match_c.sum() <= 0 or match_p.sum() <= 0:
        return None
    w = 1.0 / propensity
    z = np.minimum(w, clip) * match_c * click - w * match_p * click
    low = float(-(w * match_p).max())
    span = clip - low
    log_term = np.log(2.0 / (1.0 - confidence))
    var = float(z.var(ddof=1))
    lb = float(z.mean() - np.sqrt(2 * var * log_term / n) - 7 * span * log_term / (3 * (n - 1)))
    normal = snips_difference(match_c, match_p, click, propensity, confidence)
    differ = match_c != match_p
    wd = w[differ] * match_c[differ]
    ess = float(wd.sum() ** 2 / (wd**2).sum()) if wd.sum() > 0 else 0.0
    return Difference(
        normal.value, normal.se, normal.ci_low, normal.ci_high, lb, confidence, "bernstein",
        clip, n, int(differ.sum()), ess,
    )  # fmt: skip


@dataclass
class ABDifference:
    """Online A/B: CTR(canary arm) - CTR(production arm), each arm's own served clicks.

    Triggered (``triggered_share`` < 1): estimated on the requests where the two policies
    differ only, and scaled to all traffic by their share (``ab_difference``)."""

    value: float
    se: float
    lower_bound: float  # one-sided ``confidence`` lower bound
    confidence: float
    canary_ctr: float
    production_ctr: float
    canary_n: int
    production_n: int
    triggered_share: float = 1.0  # share of both arms' requests counted
    canary_triggered_ctr: float | None = None
    production_triggered_ctr: float | None = None
    canary_triggered_n: int | None = None
    production_triggered_n: int | None = None


def ab_difference(
    clicks_canary: np.ndarray,
    clicks_production: np.ndarray,
    confidence: float,
    triggered_canary: np.ndarray | None = None,
    triggered_production: np.ndarray | None = None,
) -> ABDifference:
    """Two-proportion lower bound of the CTR difference of two randomly assigned arms.

    Each arm's clicks are Bernoulli draws of its own served policy (exploration included),
    so the difference of the two means is unbiased, its weights are all 1 and the normal
    bound ``d - z sqrt(p_c (1 - p_c) / n_c + p_p (1 - p_p) / n_p)`` is accurate at the
    thousands of impressions an arm gets.

    triggered_canary, triggered_production: per row of each arm, whether the two policies
    serve differently on that request (a function of the request alone, not of its arm:
    ``genco.evaluation.online.policies_differ``). Where they serve alike both arms draw
    from the same distribution, so those rows add noise and no difference: the A/B is then
    the difference on the triggered rows times their share s of all rows (a "triggered
    analysis"). Its variance is s times the plain one: at s = 0.3 it settles as fast as
    3.3 times the traffic would."""
    for name, arm in (("canary", clicks_canary), ("production", clicks_production)):
        if len(arm) < 2:
            raise ContractError(f"{name} arm: {len(arm)} impressions, need at least 2")
        bad = np.flatnonzero((arm != 0) & (arm != 1))
        if len(bad):
            raise ContractError(f"{name} arm: click must be 0 or 1, row {bad[0]} is {arm[bad[0]]}")
    pc, pp = float(clicks_canary.mean()), float(clicks_production.mean())
    nc, npr = len(clicks_canary), len(clicks_production)
    z1 = NormalDist().inv_cdf(confidence)
    if triggered_canary is None and triggered_production is None:
        se = float(np.sqrt(pc * (1 - pc) / nc + pp * (1 - pp) / npr))
        return ABDifference(pc - pp, se, pc - pp - z1 * se, confidence, pc, pp, nc, npr)
    if triggered_canary is None or triggered_production is None:
        raise ContractError("triggered: give it for both arms or for neither")
    tc, tp = np.asarray(triggered_canary, bool), np.asarray(triggered_production, bool)
    for name, mask, n in (("canary", tc, nc), ("production", tp, npr)):
        if len(mask) != n:
            raise ContractError(f"triggered: {len(mask)} rows for the {name} arm's {n}")
        if mask.sum() < 2:
            raise ContractError(
                f"{name} arm: {int(mask.sum())} impressions where the two policies differ, "
                "need at least 2"
            )
    share = float(tc.sum() + tp.sum()) / (nc + npr)
    qc, qp = float(clicks_canary[tc].mean()), float(clicks_production[tp].mean())
    mc, mp = int(tc.sum()), int(tp.sum())
    se = share * float(np.sqrt(qc * (1 - qc) / mc + qp * (1 - qp) / mp))
    value = share * (qc - qp)
    return ABDifference(
        value, se, value - z1 * se, confidence, pc, pp, nc, npr, share, qc, qp, mc, mp
    )
