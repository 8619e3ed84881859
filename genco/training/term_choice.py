"""Which optional terms of the reward model a fit keeps, chosen on the held-out slice: the
nonlinear feature tower (``feature_hidden``) and the three-way term (``dim3``).

At the L2 path's first point (on the path's sample when it takes one) the model is fitted
without either, then with the tower, then with the three-way term on top of whatever was
kept, each from the same start; a term is kept only when it beats the noise: a one-sided
paired test over the held-out impressions, the mean of the per-impression log-loss
differences (without minus with) above z of its standard errors. Tower first: it changes
the feature map every other term reads, and when it is rejected the three-way choice is
exactly the one made without a tower (the same two fits).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from genco.models.optim import Snapshot
from genco.models.reward import RewardModel

# The three-way term is kept only when its held-out gain beats the noise: mean >
# THREE_WAY_Z x its standard error. A plain "lower held-out loss" kept it on
# per_product_contextual seed 1 on a difference of 1.2e-5 and lost 0.015 of gap closed
# (BENCHMARKS.md, "three-way term").
THREE_WAY_Z = 2.0
# The same test for the feature tower (BENCHMARKS.md, "the feature tower's paired test").
TOWER_Z = 2.0


def choose_terms(model: RewardModel, fit, rows, val) -> tuple[list, int, dict]:
    """``fit()`` (one structure fit from the model's weights: (history, best epoch)) with
    the model's optional terms, each kept only when it lowers the held-out log loss of
    ``val`` (merged rows) by more than its z standard errors of the paired per-impression
    differences. Without a held-out slice, or without such terms, one fit with every term.
    ``rows``: the sparse tables' rows the fits can move (what the snapshots copy). Returns
    the chosen fit's (history, best epoch) and what was decided (``feature_tower*``,
    ``three_way*``), the model left at the chosen fit's weights."""
    tower, three = model.tower_on, bool(model.d3)
    if val is None or not (tower or three):
        return (*fit(), {})
    start = Snapshot(model, rows)
    model.switch_tower(False)
    if three:
        model.drop_three_way()
    best = fit()
    z_best = val_logits(model, val)
    best_state = Snapshot(model, rows)
    info: dict = {}
    if tower:
        start.restore(model)
        model.switch_tower(True)
        on = fit()
        z_on = val_logits(model, val)
        keep, part = _test("feature_tower", TOWER_Z, best, on, z_best, z_on, val)
        info.update(part)
        if keep:
            best, z_best = on, z_on
            best_state.take(model)
        tower = keep
    if three:
        start.restore(model)
        model.switch_tower(tower)
        model.restore_three_way()
        on = fit()
        keep, part = _test("three_way", THREE_WAY_Z, best, on, z_best, val_logits(model, val), val)
        info.update(part)
        if keep:
            return (*on, info)
    best_state.restore(model)
    model.switch_tower(tower)
    if three:
        model.drop_three_way()
    return (*best, info)


def _test(name: str, z: float, off, on, z_off, z_on, val) -> tuple[bool, dict]:
    gain, se = paired_gain(z_off, z_on, val.y, val.weight)
    keep = gain > z * se
    loss = {k: min(h["val_loss"] for h in r[0]) for k, r in (("off", off), ("on", on))}
    return keep, {
        name: keep,
        f"{name}_val_loss": loss,
        f"{name}_gain": gain,
        f"{name}_gain_se": se,
        f"{name}_z": z,
    }


def val_logits(model: RewardModel, val) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(val.ad, val.elem, val.feats, val.x).double()


def paired_gain(
    z_off: torch.Tensor, z_on: torch.Tensor, y: torch.Tensor, weight: torch.Tensor
) -> tuple[float, float]:
    """The held-out log loss of one fit (``z_off``: without a term, or at the stronger L2 of
    the path) minus another's (``z_on``), per impression, and its standard error, from merged
    rows (their logits, click rate ``y``, weight: the impressions merged, or their weights).
    Each impression's difference is softplus(-z_off) - softplus(-z_on) when clicked,
    softplus(z_off) - softplus(z_on) when not; the paired differences' weighted mean and its
    standard error over the impressions."""
    sp = nn.functional.softplus
    d_click, d_none = sp(-z_off) - sp(-z_on), sp(z_off) - sp(z_on)
    w_click, w_none = (y * weight).double(), ((1 - y) * weight).double()
    n = float(weight.sum())
    mean = float((w_click * d_click + w_none * d_none).sum()) / n
    var = float((w_click * (d_click - mean) ** 2 + w_none * (d_none - mean) ** 2).sum())
    var /= max(n - 1.0, 1.0)
    return mean, math.sqrt(var / n)
