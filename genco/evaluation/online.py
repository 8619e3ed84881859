"""The online gate: promote a canary or roll it back on the A/B difference of its arm.

A candidate the offline gate cannot approve (``genco.evaluation.evaluate``: too little
evidence where it differs from production, at a low exploration rate) is served to a share
of live traffic beside production (KServe's ``canaryTrafficPercent`` on a cluster; the closed
loop splits its requests the same way). Every served-log row names the ``model_version`` that
served it, so the next round compares the two arms' own clicks, both with their exploration:
``genco.evaluation.ope.ab_difference``. The canary is promoted only when the one-sided
``confidence`` lower bound of CTR(canary) - CTR(production) lies above ``margin`` x
CTR(production); otherwise it is rolled back (dropped) and production keeps serving.

Triggered. Where the two policies serve the same (both serve their greedy pick with the same
exploration floor, and the picks agree) the two arms draw from one distribution: those
requests add noise to the A/B and no difference. Given ``triggered`` (per request: the two
policies differ there, ``policies_differ``, which looks at the request alone, never at its
arm) the A/B counts only those requests and scales their difference by their share: the
same quantity, unbiased, with s times the variance at a triggered share s.

The result is a gate record that ``genco.store.promote`` accepts: it names the canary
bundle's digest and the production version it was judged against.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from genco.errors import ContractError
from genco.evaluation.ope import ABDifference, ab_difference
from genco.inference.predictor import Predictor


def greedy_picks(pred: Predictor, ads: np.ndarray, ctx: np.ndarray | None) -> np.ndarray:
    """Each request's greedy pick (beam mode's top-1) as catalog codes (n, K), decoded once
    per distinct (ad, context). ads (n,) catalog ad codes; ctx (n, C) raw context or None."""
    table = ads[:, None].astype(np.float64)
    if ctx is not None:
        table = np.column_stack([table, np.asarray(ctx, np.float64)])
    keys, first, inverse = np.unique(table, axis=0, return_index=True, return_inverse=True)
    picks = np.zeros((len(keys), pred.catalog.n_components), dtype=np.int64)
    for j, r in enumerate(first):
        x = None if ctx is None else pred.context_vector(ctx[r])
        picks[j] = pred.greedy(int(ads[r]), x)
    return picks[inverse.reshape(-1)]


def policies_differ(
    a: Predictor, b: Predictor, ads: np.ndarray, ctx: np.ndarray | None
) -> np.ndarray:
    """Per request (n,): True where two policies that serve their greedy pick with the same
    exploration floor (beam mode, or sampling at temperature 0) serve differently, i.e.
    where their greedy picks differ. Policies that sample (temperature > 0, Thompson) differ
    on every request: do not trigger them."""
    return np.any(greedy_picks(a, ads, ctx) != greedy_picks(b, ads, ctx), axis=1)


def _arms_ab(
    click: np.ndarray,
    canary: np.ndarray,
    prod: np.ndarray,
    confidence: float,
    triggered: np.ndarray | None,
) -> ABDifference:
    """ab_difference of the rows ``canary`` against the rows ``prod`` (masks over one log),
    on the triggered rows when ``triggered`` is given."""
    if triggered is None:
        return ab_difference(click[canary], click[prod], confidence)
    if len(triggered) != len(click):
        raise ContractError(f"triggered has {len(triggered)} rows, click has {len(click)}")
    trig = np.asarray(triggered, bool)
    return ab_difference(click[canary], click[prod], confidence, trig[canary], trig[prod])


def canary_gate(
    model_version: np.ndarray,
    click: np.ndarray,
    canary_version: str,
    production_version: str,
    canary_digest: str,
    margin: float = 0.0,
    confidence: float = 0.95,
    triggered: np.ndarray | None = None,
) -> dict:
    """The promote/roll-back decision from one period's served log joined to its clicks.

    model_version, click: (n,) per impression. Rows of other versions are not counted.
    triggered (n,): where the two policies serve differently (module docstring); with fewer
    than two such rows in an arm the two cannot be told apart and the canary is rolled back."""
    if len(model_version) != len(click):
        raise ContractError(f"model_version has {len(model_version)} rows, click has {len(click)}")
    bad = np.flatnonzero((np.asarray(click) != 0) & (np.asarray(click) != 1))
    if len(bad):
        raise ContractError(f"click must be 0 or 1, row {bad[0] + 1} is {click[bad[0]]:g}")
    canary = np.asarray(model_version) == canary_version
    prod = np.asarray(model_version) == production_version
    for name, version, arm in (
        ("canary", canary_version, canary),
        ("production", production_version, prod),
    ):
        if arm.sum() < 2:
            raise ContractError(
                f"model_version: {int(arm.sum())} rows of the {name} arm '{version}'; the "
                "online gate needs both arms served"
            )
    click = np.asarray(click)
    if triggered is not None:
        trig = np.asarray(triggered, bool)
        few = [int(trig[arm].sum()) for arm in (canary, prod)]
        if min(few) < 2:
            return _record(
                False,
                f"online A/B: the two policies serve alike on all but {few[0]} canary and "
                f"{few[1]} production impressions, too few to tell them apart: roll back",
                margin, canary_digest, production_version,
                ab_difference(click[canary], click[prod], confidence), triggered=True,
            )  # fmt: skip
    ab = _arms_ab(click, canary, prod, confidence, triggered)
    need = margin * ab.production_ctr
    passed = ab.lower_bound > need
    head = (
        f"online A/B: canary CTR {ab.canary_ctr:.5f} ({ab.canary_n} impressions) - production "
        f"{ab.production_ctr:.5f} ({ab.production_n})"
    )
    if triggered is not None:
        head += (
            f"; on the {ab.triggered_share:.1%} of requests where the two serve differently: "
            f"canary {ab.canary_triggered_ctr:.5f} ({ab.canary_triggered_n}) - production "
            f"{ab.production_triggered_ctr:.5f} ({ab.production_triggered_n}), scaled to all"
        )
    reason = (
        f"{head} = {ab.value:+.5f}; its {confidence:.0%} lower bound {ab.lower_bound:+.5f} "
        f"{'>' if passed else '<='} margin x production = {need:+.5f}: "
        f"{'promote' if passed else 'roll back'}"
    )
    return _record(
        passed, reason, margin, canary_digest, production_version, ab, triggered is not None
    )


def _record(
    passed: bool,
    reason: str,
    margin: float,
    digest: str,
    production: str,
    ab: ABDifference,
    triggered: bool,
) -> dict:
    return {
        "passed": bool(passed),
        "reason": reason,
        "margin": margin,
        "candidate_digest": digest,
        "production_version": production,
        "candidate_value": ab.canary_ctr,
        "production_value": ab.production_ctr,
        "online": asdict(ab),
        "rule": "online_ab_triggered" if triggered else "online_ab",
    }


def canary_clearly_worse(
    clicks_canary: np.ndarray,
    clicks_production: np.ndarray,
    confidence: float = 0.99,
    triggered_canary: np.ndarray | None = None,
    triggered_production: np.ndarray | None = None,
) -> bool:
    """True when the canary arm's CTR is below production's beyond doubt: the one-sided
    ``confidence`` lower bound of CTR(production) - CTR(canary) above zero. The closed loop
    stops a canary mid-round on it (rolling back early cannot deploy anything); fewer than
    two (triggered) impressions or no click at all in both arms is no evidence (False).
    triggered_*: per row of each arm, where the two policies serve differently."""
    ab = _early_ab(
        clicks_production, clicks_canary, confidence, triggered_production, triggered_canary
    )
    return bool(ab is not None and ab.lower_bound > 0)


def canary_clearly_better(
    clicks_canary: np.ndarray,
    clicks_production: np.ndarray,
    margin: float = 0.0,
    confidence: float = 0.99,
    triggered_canary: np.ndarray | None = None,
    triggered_production: np.ndarray | None = None,
) -> bool:
    """True when the canary would pass ``canary_gate`` at ``confidence``: the one-sided lower
    bound of CTR(canary) - CTR(production) above ``margin`` x CTR(production). The closed
    loop promotes a canary mid-round on it, at a stricter confidence than the end-of-round
    gate's because it looks up to ``canary_checks`` times."""
    ab = _early_ab(
        clicks_canary, clicks_production, confidence, triggered_canary, triggered_production
    )
    return bool(ab is not None and ab.lower_bound > margin * ab.production_ctr)


def _early_ab(first, second, confidence, trig_first, trig_second) -> ABDifference | None:
    """ab_difference(first, second) for a mid-round look, or None where there is no
    evidence yet (fewer than two (triggered) rows in an arm, or no click at all)."""
    first, second = np.asarray(first), np.asarray(second)
    if len(first) < 2 or len(second) < 2 or not (np.any(first) or np.any(second)):
        return None
    triggered = trig_first is not None and trig_second is not None
    if triggered and min(np.sum(trig_first), np.sum(trig_second)) < 2:
        return None
    return ab_difference(first, second, confidence, trig_first, trig_second)
