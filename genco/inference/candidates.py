"""The candidate combinations a decode scores when an ad's space is too large to score
whole: the generator's beam plus the ad's best-evidenced combinations (``Predictor.decode``
in beam mode, and the posterior-draw policy's candidates, ``genco.inference.thompson``)."""

from __future__ import annotations

import math

import numpy as np

from genco.models.policy_tables import PolicyTables
from genco.models.tables import RewardTables


def beam_candidates(
    policy: PolicyTables, reward: RewardTables, x: np.ndarray | None, width: int
) -> np.ndarray:
    """Slots (N, K): the beam of ``width`` and the ad's best-evidenced combinations (their
    residuals' top), those legal under the constraints served now (residuals may predate a
    constraint); without repeats, beam first."""
    slots, _ = policy.beam(x, width)
    top = reward.residual_top[policy.masks.legal(reward.residual_top)]
    if len(top):
        slots = distinct(np.concatenate([slots, top]))[0]
    return slots


def distinct(slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of (B, K) non-negative slots without repeats, first occurrences in order, and
    their indices (``np.unique(axis=0)`` sorts structured rows: ~10x slower here)."""
    radix = [int(slots[:, k].max()) + 1 for k in range(slots.shape[1])] if len(slots) else []
    if math.prod(radix) >= 2**62:  # the mixed-radix key would overflow int64
        _, first = np.unique(slots, axis=0, return_index=True)
    else:
        key = np.zeros(len(slots), np.int64)
        for k, r in enumerate(radix):
            key = key * r + slots[:, k]
        _, first = np.unique(key, return_index=True)
    first.sort()
    return slots[first], first
