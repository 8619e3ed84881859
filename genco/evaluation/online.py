"""The online gate: promote a canary or roll it back on the A/B difference of its arm.

A candidate the offline gate cannot approve (``genco.evaluation.evaluate``: too little
evidence where it differs from production, at a low exploration rate) is served to a share
of live traffic beside production (KServe's ``canaryTrafficPercent`` on a cluster; the closed
loop splits its requests the same way). Every served-log row names the ``model_version`` that
served it, so the next round compares the two arms' own clicks, both with their exploration:
``genco.evaluation.ope.ab_difference``. The canary is promoted only when the one-sided
``confidence`` lower bound of CTR(canary) - CTR(production) lies above ``margin`` x
CTR(production); otherwise it is rolled back (dropped) and production keeps serving.

The result is a gate record that ``genco.store.promote`` accepts: it names the canary
bundle's digest and the production version it was judged against.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from genco.errors import ContractError
from genco.evaluation.ope import ab_difference


def canary_gate(
    model_version: np.ndarray,
    click: np.ndarray,
    canary_version: str,
    production_version: str,
    canary_digest: str,
    margin: float = 0.0,
    confidence: float = 0.95,
) -> dict:
    """The promote/roll-back decision from one period's served log joined to its clicks.

    model_version, click: (n,) per impression. Rows of other versions are not counted."""
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
    ab = ab_difference(np.asarray(click)[canary], np.asarray(click)[prod], confidence)
    need = margin * ab.production_ctr
    passed = ab.lower_bound > need
    reason = (
        f"online A/B: canary CTR {ab.canary_ctr:.5f} ({ab.canary_n} impressions) - production "
        f"{ab.production_ctr:.5f} ({ab.production_n}) = {ab.value:+.5f}; its "
        f"{confidence:.0%} lower bound {ab.lower_bound:+.5f} {'>' if passed else '<='} margin "
        f"x production = {need:+.5f}: {'promote' if passed else 'roll back'}"
    )
    return {
        "passed": bool(passed),
        "reason": reason,
        "margin": margin,
        "candidate_digest": canary_digest,
        "production_version": production_version,
        "candidate_value": ab.canary_ctr,
        "production_value": ab.production_ctr,
        "online": asdict(ab),
        "rule": "online_ab",
    }


def canary_clearly_worse(
    clicks_canary: np.ndarray, clicks_production: np.ndarray, confidence: float = 0.99
) -> bool:
    """True when the canary arm's CTR is below production's beyond doubt: the one-sided
    ``confidence`` lower bound of CTR(production) - CTR(canary) above zero. The closed loop
    stops a canary mid-round on it (rolling back early cannot deploy anything); fewer than
    two impressions or no click at all in both arms is no evidence (False)."""
    if len(clicks_canary) < 2 or len(clicks_production) < 2:
        return False
    if not (np.any(clicks_canary) or np.any(clicks_production)):
        return False
    ab = ab_difference(np.asarray(clicks_production), np.asarray(clicks_canary), confidence)
    return bool(ab.lower_bound > 0)


def canary_clearly_better(
    clicks_canary: np.ndarray,
    clicks_production: np.ndarray,
    margin: float = 0.0,
    confidence: float = 0.99,
) -> bool:
    """True when the canary would pass ``canary_gate`` at ``confidence``: the one-sided lower
    bound of CTR(canary) - CTR(production) above ``margin`` x CTR(production). The closed
    loop promotes a canary mid-round on it, at a stricter confidence than the end-of-round
    gate's because it looks up to ``canary_checks`` times."""
    if len(clicks_canary) < 2 or len(clicks_production) < 2:
        return False
    if not (np.any(clicks_canary) or np.any(clicks_production)):
        return False
    ab = ab_difference(np.asarray(clicks_canary), np.asarray(clicks_production), confidence)
    return bool(ab.lower_bound > margin * ab.production_ctr)
