"""Combination residuals by empirical Bayes: on top of the fitted structure, each (ad,
combination) gets a logit offset r ~ Student-t(RESIDUAL_DOF, scale sd), its posterior mode
given the combination's own clicks; sd is chosen by marginal likelihood (quadrature)."""

from __future__ import annotations

import math

import numpy as np
import torch

from genco.models.residual_index import row_hash
from genco.models.reward import BoundModel, RewardModel
from genco.models.reward_config import RESIDUAL_DOF
from genco.models.vocab import Encoded

# Merge identical impressions only when that shrinks the rows at least this much.
MIN_MERGE_RATIO = 4.0


def merge_impressions(
    enc: Encoded, idx: np.ndarray, weights: np.ndarray, force: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Identical impressions (ad, combination, context) among rows ``idx`` merged, when that
    shrinks them by MIN_MERGE_RATIO (or ``force``): (one row index each, summed weight,
    weighted click rate)."""
    keys = np.column_stack([enc.ads[idx], enc.combos[idx], enc.ctx[idx].view(np.int32)])
    h = row_hash(keys.astype(np.int64))
    uniq, first, group = np.unique(h, return_index=True, return_inverse=True)
    w, y = weights[idx], enc.click[idx].astype(np.float64)
    if not force and len(uniq) * MIN_MERGE_RATIO > len(idx):
        return idx, w, y
    group = group.reshape(-1)
    wsum = np.bincount(group, w, len(uniq))
    y = np.bincount(group, w * y, len(uniq)) / np.maximum(wsum, 1e-12)
    return idx[first], wsum, y


# Prior SDs (logit scale) tried for the combination residuals; 0 = none.
RESIDUAL_SD_GRID = (0.0, 0.02, 0.03, 0.05, 0.07, 0.1, 0.14, 0.2, 0.3, 0.5, 0.7, 1.0)


# The scan of RESIDUAL_SD_GRID stops after this many SDs > 0 in a row whose evidence fell:
# over SDs > 0 the evidence had one peak in every log recorded (130 fits in bench/results:
# AES, per-product, today's worlds), and each SD costs a quadrature over every combination
# (~5 s CPU on `large` at 1M), mostly for SDs far past the peak.
EVIDENCE_FALLS = 2


class _Groups:
    """Per-group sums and per-row gathers of a group index (n,) in [0, n_groups): plain
    copies when every row is its own group, in order (a large space's log: `large` at 1M,
    where the bincount and the gather were half of each quadrature node's time)."""

    def __init__(self, group: np.ndarray, n_groups: int) -> None:
        self.group, self.n = group, n_groups
        self.own = len(group) == n_groups and bool(np.all(group[1:] > group[:-1]))

    def sum(self, x: np.ndarray) -> np.ndarray:
        return x if self.own else np.bincount(self.group, x, self.n)

    def rows(self, v: np.ndarray) -> np.ndarray:
        return v if self.own else v[self.group]


def _residual_newton(
    group: np.ndarray, n_groups: int, s: np.ndarray, y: np.ndarray, w: np.ndarray, sd: float
) -> np.ndarray:
    """Posterior mode of r_g under logit = s + r_g, r_g ~ Student-t(RESIDUAL_DOF, scale sd),
    by Fisher-scoring steps on all groups at once. group (n,) in [0, n_groups); s (n,)
    structural logits; y (n,) click rates of rows with weight (impressions) w (n,)."""
    r = np.zeros(n_groups)
    if sd <= 0:
        return r
    nu = RESIDUAL_DOF
    g = _Groups(group, n_groups)
    for _ in range(30):
        p = 1.0 / (1.0 + np.exp(-(s + g.rows(r))))
        curv = (nu + 1) / (nu * sd**2 + r**2)  # the prior's pull per unit of r, always > 0
        grad = g.sum(w * (y - p)) - curv * r
        hess = g.sum(w * p * (1 - p)) + curv
        # At most one logit unit a step: a full step from far away could overshoot to where
        # p(1 - p) vanishes and the next step diverges (groups of 1,000+ impressions whose
        # residual is 2-3 under a wide prior: nan evidence for SDs >= 0.3 before the clip)
        step = np.clip(grad / hess, -1.0, 1.0)
        r += step
        if np.abs(step).max() < 1e-5:
            break
    return r


def _residual_width(
    group: np.ndarray, n_groups: int, s: np.ndarray, w: np.ndarray, r: np.ndarray, sd: float
) -> np.ndarray:
    """Each residual's posterior SD (Laplace: one over the root of the log posterior's
    curvature at its mode ``r``), what ``mode: thompson`` draws from. The Student-t prior's
    curvature turns negative past |r| = sqrt(nu) sd; it is counted as zero there (the
    clicks' curvature alone), never as a width wider than the data allow."""
    g = _Groups(group, n_groups)
    p = 1.0 / (1.0 + np.exp(-(s + g.rows(r))))
    nu = RESIDUAL_DOF
    a = nu * sd**2 + r**2
    prior = np.maximum((nu + 1) * (nu * sd**2 - r**2) / a**2, 0.0)
    return 1.0 / np.sqrt(np.maximum(g.sum(w * p * (1 - p)) + prior, 1e-12))


# An element's main-effect width where its own clicks say little (never logged): 1 logit.
ELEMENT_WIDTH_CAP = 1.0


def _element_widths(rows: np.ndarray, z: np.ndarray, w: np.ndarray, n_elements: int):
    """Each element's main-effect width (logit): one over the root of the clicks' Fisher
    information about a shift of that element's logit, sum of w p (1 - p) over the rows
    showing it (rows (n, 1 + K): ad index, global element indices; z (n,) the fitted logits).
    The width its own clicks leave, with a flat prior (the id L2 is a per-impression penalty,
    not a prior): what ``mode: thompson`` draws the structure's doubt from."""
    p = 1.0 / (1.0 + np.exp(-z))
    info = np.zeros(n_elements)
    for k in range(1, rows.shape[1]):
        info += np.bincount(rows[:, k], w * p * (1 - p), n_elements)
    return np.minimum(1.0 / np.sqrt(np.maximum(info, 1e-12)), ELEMENT_WIDTH_CAP)


# Each group's one-dimensional evidence integral: trapezoid rule in v over [-V, V] with
# r = mode + width * sinh(v), which turns the Student-t's polynomial tails into exponential
# ones; measured error < 1e-7 nats per group against brute-force integration (a 32-node
# Gauss-Hermite rule was ~7e-4 nats per group low when the prior dominates: 100 nats on a
# log of 150k combinations, enough to refuse every residual).
QUADRATURE_V, QUADRATURE_STEP = 6.0, 0.1


def _log_prior(r: np.ndarray, sd: float) -> np.ndarray:
    """Log density of Student-t(RESIDUAL_DOF, scale sd) at r."""
    nu = RESIDUAL_DOF
    return (
        math.lgamma((nu + 1) / 2)
        - math.lgamma(nu / 2)
        - 0.5 * math.log(nu * math.pi)
        - math.log(sd)
        - (nu + 1) / 2 * np.log1p(r**2 / (nu * sd**2))
    )


def _log_evidence(
    group: np.ndarray, n_groups: int, s: np.ndarray, y: np.ndarray, w: np.ndarray, sd: float
) -> float:
    """log p(clicks | sd): each group's residual integrated out numerically around its
    posterior mode, on the Laplace width's scale (see QUADRATURE_V). (The Laplace
    approximation alone is ~0.17 nats per group low for a Student-t prior when the prior
    dominates, which made any sd > 0 lose to sd = 0 on mid-sized logs.)"""
    if sd <= 0:
        return -float(np.sum(w * (np.logaddexp(0.0, s) - y * s)))
    r = _residual_newton(group, n_groups, s, y, w, sd)
    g = _Groups(group, n_groups)
    p = 1.0 / (1.0 + np.exp(-(s + g.rows(r))))
    nu = RESIDUAL_DOF
    h = g.sum(w * p * (1 - p))
    a = nu * sd**2 + r**2
    curv = h + (nu + 1) * (nu * sd**2 - r**2) / a**2
    width = 1.0 / np.sqrt(np.maximum(curv, 1e-12))
    vs = np.arange(-QUADRATURE_V, QUADRATURE_V + QUADRATURE_STEP / 2, QUADRATURE_STEP)
    top = np.full(n_groups, -np.inf)
    acc = np.zeros(n_groups)  # running log-sum-exp over the nodes, per group
    for v in vs:
        rk = r + width * math.sinh(v)
        z = s + g.rows(rk)
        term = -g.sum(w * (np.logaddexp(0.0, z) - y * z))
        term += _log_prior(rk, sd) + np.log(width * (math.cosh(v) * QUADRATURE_STEP))
        new_top = np.maximum(top, term)
        acc = acc * np.exp(top - new_top) + np.exp(term - new_top)
        top = new_top
    return float(np.sum(top + np.log(acc)))


def choose_sd(
    group: np.ndarray, n_groups: int, s: np.ndarray, y: np.ndarray, w: np.ndarray
) -> tuple[float, dict[str, float]]:
    """The prior SD of RESIDUAL_SD_GRID with the largest log evidence (the smaller on a
    tie), scanning the grid upward until EVIDENCE_FALLS SDs > 0 in a row lose evidence.
    Returns it and the log evidence of each SD tried. Arguments as ``_log_evidence``'s."""
    evidence: dict[str, float] = {}
    falls, last = 0, None  # SDs > 0 in a row whose evidence fell; the last one's evidence
    for cand in RESIDUAL_SD_GRID:
        e = evidence[str(cand)] = _log_evidence(group, n_groups, s, y, w, cand)
        if cand > 0:
            falls = falls + 1 if last is not None and e < last else 0
            last = e
            if falls >= EVIDENCE_FALLS:
                break
    tried = [c for c in RESIDUAL_SD_GRID if str(c) in evidence]
    return float(max(tried, key=lambda c: (evidence[str(c)], -c))), evidence


@torch.no_grad()
def fit_residuals(
    model: RewardModel,
    bound: BoundModel,
    enc: Encoded,
    weights: np.ndarray,
    batch: int = 262_144,
) -> dict:
    """Fit the per (ad, combination) residuals on top of the trained structure.

    The prior SD is chosen by empirical Bayes, unless the config fixes it: the one of
    RESIDUAL_SD_GRID with the largest marginal likelihood of all the clicks (each residual
    integrated out by quadrature), the standard choice for a random-effects variance, scanned
    upward until EVIDENCE_FALLS SDs in a row lose evidence. (A held-out slice was measured
    first: its log-loss differences between SDs, ~1e-5, were inside its own noise.) Returns
    the SD chosen and the log evidence per SD tried.
    """

    def merged(idx: np.ndarray, w: np.ndarray):
        """Rows merged by (ad, combination, context): (their residual keys, structural
        logits, click rates, weights)."""
        idx, w, y = merge_impressions(enc, idx, w, force=True)
        s = np.zeros(len(idx))
        for i in range(0, len(idx), batch):
            part = idx[i : i + batch]
            s[i : i + batch] = model(*bound._inputs(enc.ads[part], enc.combos[part], enc.ctx[part]))
        g = torch.as_tensor(enc.combos[idx] + bound.cat_offsets[None, :], dtype=torch.long)
        rows = np.column_stack(
            [bound.ad_map[torch.as_tensor(enc.ads[idx])].numpy(), bound.elem_map[g]]
        )
        return rows, s, y, w

    everything = np.arange(len(enc))
    rows, s, y, w = merged(everything, weights)
    keys, group = np.unique(row_hash(rows), return_inverse=True)
    # Rows in group order (stable: each group's rows keep theirs, so its sums are the same).
    order = np.argsort(group.reshape(-1), kind="stable")
    rows, s, y, w, group = rows[order], s[order], y[order], w[order], group.reshape(-1)[order]
    n_groups = len(keys)
    evidence: dict[str, float] = {}
    sd = model.config.residual_sd
    if sd == 0:
        sd, evidence = choose_sd(group, n_groups, s, y, w)
    r = _residual_newton(group, n_groups, s, y, w, sd)
    first = np.zeros(n_groups, np.int64)
    first[group] = np.arange(len(group))  # any row of a group: they share its key
    keep = np.abs(r) > 1e-6
    width = _residual_width(group, n_groups, s, w, r, sd)[keep] if sd > 0 else None
    model.set_residuals(rows[first[keep]], r[keep].astype(np.float32), sd, width)
    model.set_element_widths(_element_widths(rows, s + r[group], w, model.id_main.num_embeddings))
    return {
        "residual_sd": sd,
        "residual_log_evidence": evidence,
        "residual_combinations": int(keep.sum()),
    }
