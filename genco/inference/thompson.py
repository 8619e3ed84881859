"""Posterior draws (``mode: thompson``): Thompson sampling over an ad's combinations, served
with exact propensities by probability matching.

Each candidate combination's logit is uncertain: each element's main effect by the width
its own clicks leave (``RewardModel.elem_width``, shared by every combination showing it),
and the combination's residual: a combination the log has seen by its residual's posterior
(``RewardModel.residual_width``: the clicks it got and the prior), one never seen by the
residual prior itself (Student-t with the fitted scale). Thompson
sampling shows the argmax of one posterior draw per impression; the probability that a
combination wins that draw is not known in closed form, so the propensity of a per-request
draw could only be estimated. Instead the policy *is* the win frequencies over ``DRAWS``
posterior draws, made once per (ad, context) from a fixed seed: a distribution over the
candidates that is then sampled from as is, so every logged propensity is exact, and the
same request always meets the same policy.

The candidates are the ad's whole legal space when it is small enough to decode exactly
(``Predictor.exact_max``); otherwise the generator's beam and the ad's best-evidenced
combinations. The exploration floor is mixed in by the caller, as in the other modes.
"""

from __future__ import annotations

import zlib

import numpy as np

from genco.inference.candidates import beam_candidates
from genco.models.policy_tables import PolicyTables
from genco.models.reward_config import RESIDUAL_DOF
from genco.models.tables import RewardTables

# Posterior draws behind each (ad, context)'s policy: win frequencies in steps of 1/DRAWS.
DRAWS = 1000
# Rows of draws scored at once (bounds memory on a 4,096-combination space at ~16 MB).
_DRAW_BLOCK = 500


def win_frequencies(
    z: np.ndarray, width: np.ndarray, prior_sd: float, draws: int, rng: np.random.Generator,
    slots: np.ndarray | None = None, elem_width: list[np.ndarray] | None = None,
) -> np.ndarray:  # fmt: skip
    """(N,) the share of ``draws`` posterior draws each candidate wins (sums to 1).

    z (N,): posterior-mode logits; width (N,): each one's residual posterior SD, NaN where
    the combination was never seen (then a Student-t(RESIDUAL_DOF) of scale ``prior_sd``).
    With ``elem_width`` (per component (M_k,), over the slots of ``slots`` (N, K)) each draw
    also shifts every element's main effect by N(0, its width^2), shared by every candidate
    that shows the element: the structure's doubt, not only each combination's own.
    """
    n = len(z)
    unseen = np.isnan(width)
    wins = np.zeros(n, np.int64)
    left = draws
    while left > 0:
        b = min(left, _DRAW_BLOCK)
        noise = rng.standard_normal((b, n)) * np.where(unseen, 0.0, width)
        if unseen.any() and prior_sd > 0:
            noise[:, unseen] = prior_sd * rng.standard_t(RESIDUAL_DOF, (b, int(unseen.sum())))
        for k, wk in enumerate(elem_width or []):
            noise += (rng.standard_normal((b, len(wk))) * wk)[:, slots[:, k]]
        wins += np.bincount(np.argmax(z + noise, axis=1), minlength=n)
        left -= b
    return wins / draws


def thompson_policy(
    policy: PolicyTables,
    reward: RewardTables,
    x: np.ndarray | None,
    ad: int,
    exact_max: int,
    beam_width: int,
    prior_sd: float,
    draws: int = DRAWS,
) -> tuple[np.ndarray, np.ndarray]:
    """The candidates (slots (N, K)) with a positive win frequency and those frequencies
    (N,): the posterior-draw policy of catalog ad ``ad`` in context ``x``."""
    exhaustive = reward.exhaustive(policy.masks, exact_max)
    if exhaustive is not None and len(exhaustive.slots):
        slots, z = exhaustive.slots, exhaustive.logits(reward, x)
    else:
        slots = beam_candidates(policy, reward, x, beam_width)
        base, credit = reward.credit(slots, x)
        z = base + credit.sum(1, dtype=np.float64)
    width = reward.residual_width(slots)
    ctx = b"" if x is None else np.ascontiguousarray(x, np.float32).tobytes()
    rng = np.random.default_rng([ad, zlib.crc32(ctx)])
    share = win_frequencies(z, width, prior_sd, draws, rng, slots, reward.elem_width)
    keep = share > 0
    return slots[keep], share[keep]


def mixed_draws(
    policy: PolicyTables, reward: RewardTables, cand: np.ndarray, share: np.ndarray, n: int,
    rng: np.random.Generator, explore: float,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """n draws (slots (n, K)), each from the exploration draw with probability ``explore``,
    else from the policy (candidates ``cand`` with probabilities ``share``), and the exact
    propensities of the mixture."""
    slots = cand[rng.choice(len(cand), size=n, p=share)]
    wide = rng.random(n) < explore
    if wide.any():
        slots[wide] = policy.uniform(int(wide.sum()), rng)
    propensity = (1 - explore) * share_of(slots, cand, share, reward.stride)
    if explore:
        propensity = propensity + explore * np.exp(policy.log_uniform(slots))
    return slots, propensity


def share_of(slots: np.ndarray, cand: np.ndarray, share: np.ndarray, stride) -> np.ndarray:
    """(B,) each slot row's probability under the policy: its candidate's share, 0 for a
    combination outside the candidates (or with a slot < 0: not one of the ad's elements)."""
    keys, ckeys = slots @ stride, cand @ stride
    order = np.argsort(ckeys)
    at = np.minimum(np.searchsorted(ckeys[order], keys), len(ckeys) - 1)
    hit = (ckeys[order][at] == keys) & (slots >= 0).all(1)
    return np.where(hit, share[order][at], 0.0)


def served_share(pred, ad: int, x: np.ndarray | None, codes: np.ndarray) -> np.ndarray:
    """(B,) the posterior-draw policy of ``pred`` (a ``Predictor``): the probability of
    catalog-coded combinations (B, K) of ad ``ad`` in context ``x``, before the exploration
    mix; 0 for one holding an element that is not the ad's candidate now."""
    masks = pred.bound()[1].masks
    a = np.full(len(codes), ad)
    slots = np.stack([masks.slot_of[k].lookup(a, codes[:, k]) for k in range(masks.K)], 1)
    cand, share = pred.thompson(ad, x)
    return share_of(np.asarray(slots, np.int64), cand, share, pred.tables(ad)[1].stride)


def served_shares(pred, ads: np.ndarray, ctx: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``served_share`` of logged rows: ads (n,), contexts (n, C) (C may be 0), catalog-coded
    combinations (n, K); one policy per distinct (ad, context)."""
    keys = np.column_stack([ads, ctx.view(np.int32) if ctx.shape[1] else ctx]).astype(np.int64)
    _, group = np.unique(keys, axis=0, return_inverse=True)
    order = np.argsort(group.reshape(-1), kind="stable")
    starts = np.flatnonzero(np.diff(group.reshape(-1)[order], prepend=-1))
    out = np.zeros(len(ads))
    for rows in np.split(order, starts[1:]):  # one key's rows each, one pass over the log
        x = ctx[rows[0]] if ctx.shape[1] else None
        out[rows] = served_share(pred, int(ads[rows[0]]), x, codes[rows])
    return out
