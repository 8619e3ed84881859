"""Posterior draws (genco.inference.thompson): the residuals' posterior widths, the win
frequencies that make the policy, and draws that follow it with exact propensities and the
exploration floor."""

from __future__ import annotations

import numpy as np
import pytest

from genco.data.space import legal_combinations
from genco.inference.thompson import win_frequencies
from genco.models.reward import BoundModel, RewardModel
from genco.models.reward_config import RESIDUAL_DOF
from genco.training.residuals import (
    ELEMENT_WIDTH_CAP,
    _element_widths,
    _residual_newton,
    _residual_width,
)
from tests.test_evidence import _predictor, fitted  # noqa: F401  (the module's fixture)


def test_win_frequencies_are_a_distribution_that_follows_the_posterior():
    rng = np.random.default_rng(0)
    z = np.array([0.0, 0.1, -2.0])
    # No uncertainty: all on the mode's argmax.
    sure = win_frequencies(z, np.zeros(3), 0.0, 1000, rng)
    np.testing.assert_array_equal(sure, [0.0, 1.0, 0.0])
    # Equal means and widths: an even split of the top two; the far one almost never wins.
    even = win_frequencies(np.array([0.0, 0.0, -2.0]), np.full(3, 0.3), 0.0, 20_000, rng)
    assert even.sum() == pytest.approx(1.0) and abs(even[0] - even[1]) < 0.03
    assert even[2] < 1e-3
    # A wider posterior on the lower mean wins more often than a narrow one.
    narrow = win_frequencies(z, np.array([0.05, 0.05, 0.05]), 0.0, 20_000, rng)
    wide = win_frequencies(z, np.array([0.8, 0.05, 0.05]), 0.0, 20_000, rng)
    assert wide[0] > narrow[0] + 0.2
    # Never seen (NaN): the Student-t prior of the given scale; a zero scale is no doubt.
    unseen = np.array([0.01, np.nan, 0.01])
    assert win_frequencies(z, unseen, 0.0, 1000, rng)[1] == 1.0
    prior = win_frequencies(np.array([0.0, 0.0]), np.array([0.01, np.nan]), 1.0, 20_000, rng)
    assert abs(prior[1] - 0.5) < 0.03  # symmetric around the same mean
    # The same seed gives the same policy.
    a = win_frequencies(z, np.full(3, 0.5), 0.0, 1000, np.random.default_rng(3))
    b = win_frequencies(z, np.full(3, 0.5), 0.0, 1000, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)


def test_element_draws_are_shared_by_every_candidate_showing_the_element():
    rng = np.random.default_rng(2)
    z = np.array([0.0, -0.1])
    none = np.zeros(2)
    # Two candidates that differ in component 1: its elements' doubt splits them.
    split = [np.zeros(1), np.array([0.5, 0.5])]
    slots = np.array([[0, 0], [0, 1]])
    share = win_frequencies(z, none, 0.0, 20_000, rng, slots, split)
    assert 0.3 < share[1] < 0.5
    # Differing in component 0, whose slots have no doubt, and sharing component 1's only
    # element: its draw shifts both alike, so the better mode always wins.
    shared = [np.zeros(2), np.array([0.5])]
    slots = np.array([[0, 0], [1, 0]])
    np.testing.assert_array_equal(win_frequencies(z, none, 0.0, 5000, rng, slots, shared), [1, 0])


def test_element_widths_are_the_clicks_fisher_information_capped():
    rows = np.array([[0, 0, 2], [0, 1, 2], [1, 0, 3]])  # ad, then global elements of 2 parts
    z = np.array([0.0, -1.0, 2.0])
    w = np.array([100.0, 50.0, 10.0])
    p = 1 / (1 + np.exp(-z))
    info = w * p * (1 - p)
    got = _element_widths(rows, z, w, 5)
    want = 1 / np.sqrt([info[0] + info[2], info[1], info[0] + info[1], info[2]])
    np.testing.assert_allclose(got[:4], np.minimum(want, ELEMENT_WIDTH_CAP))
    assert got[4] == ELEMENT_WIDTH_CAP  # never shown: the cap


def test_residual_width_is_the_laplace_width_of_the_posterior():
    """One over the root of minus the log posterior's second derivative at the mode (by finite
    differences), and narrower with more impressions."""
    rng = np.random.default_rng(1)
    n_groups = 6
    group = np.repeat(np.arange(n_groups), [1, 3, 10, 30, 100, 300])
    s = rng.normal(-2.0, 0.3, len(group))
    w = np.full(len(group), 50.0)
    y = rng.binomial(50, 0.12, len(group)) / 50.0
    sd = 0.4
    r = _residual_newton(group, n_groups, s, y, w, sd)
    width = _residual_width(group, n_groups, s, w, r, sd)
    nu = RESIDUAL_DOF

    def log_post(g: int, v: float) -> float:
        z = s[group == g] + v
        lik = np.sum(w[group == g] * (y[group == g] * z - np.logaddexp(0.0, z)))
        return lik - (nu + 1) / 2 * np.log1p(v**2 / (nu * sd**2))

    h = 1e-3
    for g in range(n_groups):
        second = (log_post(g, r[g] + h) - 2 * log_post(g, r[g]) + log_post(g, r[g] - h)) / h**2
        assert width[g] == pytest.approx(1 / np.sqrt(-second), rel=1e-3)
    assert np.all(np.diff(width) < 0)  # more impressions per group: a narrower posterior


def test_fitted_residuals_keep_their_widths_through_a_state_dict(fitted):  # noqa: F811
    world, enc, model, _ = fitted
    width = model.residual_width.numpy()
    assert len(width) == len(model.residual_values) > 0
    assert np.all((width > 0) & (width < 0.5 * 1.5))  # within the prior's reach (sd 0.5)
    clone = RewardModel(model.vocab, model.config)
    clone.load_state_dict(model.state_dict())
    np.testing.assert_array_equal(clone.residual_width.numpy(), width)
    elem = model.elem_width.numpy()
    assert len(elem) == model.id_main.num_embeddings and (elem > 0).all()
    np.testing.assert_array_equal(clone.elem_width.numpy(), elem)
    # A bundle from before widths were kept: its residuals load, with widths not known (NaN),
    # and its logits are unchanged.
    old = {k: v for k, v in model.state_dict().items() if k not in ("residual_width", "elem_width")}
    legacy = RewardModel(model.vocab, model.config)
    legacy.load_state_dict(old)
    _, values, widths = legacy.residuals_of_ad(0)
    assert len(values) and np.isnan(widths).all() and len(legacy.elem_width) == 0
    a, b = BoundModel(model, world.catalog), BoundModel(legacy, world.catalog)
    np.testing.assert_allclose(
        a.logit(enc.ads[:200], enc.combos[:200], enc.ctx[:200]),
        b.logit(enc.ads[:200], enc.combos[:200], enc.ctx[:200]),
        atol=1e-6,
    )


def test_thompson_draws_follow_the_policy_with_exact_propensities_and_the_floor(fitted):  # noqa: F811
    world, _, model, _ = fitted
    pred = _predictor(world, model, explore=0.1)
    ad, x = 1, np.array([1.0, 0.0], np.float32)
    cand, share = pred.thompson(ad, x)
    assert share.sum() == pytest.approx(1.0) and len(cand) > 1  # the posterior is spread
    again = pred.thompson(ad, x.copy())
    np.testing.assert_array_equal(again[1], share)  # one policy per (ad, context)
    # Its mode is the exact decoder's pick, the best-supported combination.
    best = pred.decode(ad, x, top_k=1).codes[0]
    policy, _ = pred.tables(ad)
    top = policy.masks.to_codes(cand[np.argmax(share)][None])[0]
    np.testing.assert_array_equal(top, best)
    n = 40_000
    codes, prop = pred.draw(ad, x, n, np.random.default_rng(0), explore=0.1, thompson=True)
    legal = legal_combinations(world.catalog, world.constraints, ad)
    assert {tuple(c) for c in codes.tolist()} <= {tuple(c) for c in legal.tolist()}
    keys, counts = np.unique(codes, axis=0, return_counts=True)
    first = {tuple(c): p for c, p in zip(codes.tolist(), prop, strict=True)}
    for key, c in zip(keys.tolist(), counts, strict=True):
        p = first[tuple(key)]
        assert abs(c / n - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-4
    assert 0.97 < sum(first[tuple(k)] for k in keys.tolist()) <= 1 + 1e-9
    # The floor: every shown combination keeps at least explore x its exploration probability.
    size = np.prod([len(c) for c in world.catalog.candidates[ad]])
    assert prop.min() >= 0.1 / size - 1e-12
    # Explore 0: only the posterior's candidates, each at its share.
    codes0, prop0 = pred.draw(ad, x, 500, np.random.default_rng(1), explore=0.0, thompson=True)
    cand_codes = {tuple(c): s for c, s in zip(policy.masks.to_codes(cand).tolist(), share)}
    assert all(cand_codes[tuple(c)] == pytest.approx(p) for c, p in zip(codes0.tolist(), prop0))


def test_combination_thompson_peer_learns_the_best_combination_of_each_ad():
    """The textbook reference peer: a Beta posterior per (ad, legal combination)."""
    from genco.evaluation.bandits import ComboThompson

    legal = [np.array([[0, 0], [0, 1], [1, 0], [1, 1]]), np.array([[2, 1], [0, 3], [1, 2]])]
    true = [np.array([0.05, 0.05, 0.3, 0.05]), np.array([0.1, 0.02, 0.02])]
    peer = ComboThompson(legal)
    rng = np.random.default_rng(0)
    for _ in range(30):
        ads = rng.integers(2, size=400)
        combos, prop = peer.choose(ads, None, rng)
        assert np.isnan(prop).all()
        rows = [np.flatnonzero((legal[a] == c).all(1))[0] for a, c in zip(ads, combos)]
        ctr = np.array([true[a][i] for a, i in zip(ads, rows)])
        peer.update(ads, None, combos, (rng.random(len(ads)) < ctr).astype(float), prop)
    combos, _ = peer.choose(np.array([0] * 200 + [1] * 200), None, rng)
    assert (combos[:200] == [1, 0]).all(1).mean() > 0.9
    assert (combos[200:] == [2, 1]).all(1).mean() > 0.8
    # Clicks landed on the rows shown: the best rows gathered most of them.
    assert peer.alpha[0].argmax() == 2 and peer.alpha[1].argmax() == 0


def test_the_gate_weighs_logged_rows_by_the_thompson_policys_probability(fitted):  # noqa: F811
    """served="thompson": each logged row's match is the posterior-draw policy's probability
    of it, so SNIPS on a log that policy served (with exploration) recovers its true CTR,
    and a model judged against itself differs by exactly zero."""
    from genco.evaluation.ope import snips, snips_difference
    from genco.inference.thompson import served_shares

    world, _, model, _ = fitted
    pred = _predictor(world, model)
    rng = np.random.default_rng(5)
    ads, combos, prop, ctx = [], [], [], []
    for ad in range(world.catalog.n_ads):
        x = np.array([1.0, 0.0], np.float32)
        c, p = pred.draw(ad, x, 20_000, rng, explore=0.3, thompson=True)
        ads.append(np.full(len(c), ad)), combos.append(c), prop.append(p)
        ctx.append(np.tile(x, (len(c), 1)))
    ads, combos = np.concatenate(ads), np.concatenate(combos)
    prop, ctx = np.concatenate(prop), np.concatenate(ctx)
    true = world.truth.ctr(ads, combos, ctx)
    clicks = (rng.random(len(ads)) < true).astype(float)
    match = served_shares(pred, ads, ctx, combos)
    # The policy's true value: each ad's candidates at their shares, ads equally often.
    want = np.mean(
        [
            (share * world.truth.ctr(np.full(len(c), ad), pred.tables(ad)[0].masks.to_codes(c),
                                     np.tile(ctx[0], (len(c), 1)))).sum()
            for ad in range(world.catalog.n_ads)
            for c, share in [pred.thompson(ad, ctx[0])]
        ]
    )  # fmt: skip
    est = snips(match, clicks, prop, 0.95)
    assert est.ci_low - 0.002 < want < est.ci_high + 0.002
    assert np.all((match >= 0) & (match <= 1))
    same = snips_difference(match, match, clicks, prop, 0.95)
    assert same.value == 0.0 and same.se == 0.0
