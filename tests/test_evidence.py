"""The reward model's combination residuals, exact decoding of small spaces, per-ad
attribution, exploration by construction, per-product worlds and the simple baselines."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from genco.data.space import legal_combinations
from genco.evaluation.baselines import EmpiricalBest, FactorizationMachine, FMConfig
from genco.inference.predictor import Predictor
from genco.models.generator import Generator, GeneratorConfig
from genco.models.reward import BoundModel, RewardModel, RewardModelConfig
from genco.models.vocab import Vocab, encode, fit_scalers
from genco.training.attribution import ad_effects, element_table
from genco.training.reward_fit import train_reward_model
from genco.worlds.simulate import WORLDS, GroundTruth, log_impressions, make_world

SMALL_PER_PRODUCT = replace(WORLDS["per_product_3way"], n_ads=6, n_candidates=3)
CONSTRAINED = replace(WORLDS["contextual"], n_ads=4, n_candidates=4, n_global_forbidden=6)


@pytest.fixture(scope="module")
def fitted():
    """A model whose residuals are on (fixed prior SD), on a constrained contextual world."""
    world = make_world(CONSTRAINED, seed=2)
    enc = encode(log_impressions(world, 40_000, seed=2), world.catalog)
    config = RewardModelConfig(epochs=3, residual_sd=0.5)
    model, report = train_reward_model(world.catalog, enc, config)
    return world, enc, model, report


def test_residuals_are_fitted_and_shrunk_by_traffic(fitted):
    world, enc, model, report = fitted
    assert report.tuning["residual_sd"] == 0.5
    assert report.tuning["residual_combinations"] > 0
    bound = BoundModel(model, world.catalog)
    r = bound.residual(enc.ads, enc.combos)
    assert np.abs(r).max() > 0
    # A combination never logged has no residual.
    legal = legal_combinations(world.catalog, world.constraints, 0)
    logged = {tuple(c) for c in enc.combos[enc.ads == 0].tolist()}
    unseen = np.array([c for c in legal.tolist() if tuple(c) not in logged] or [[-1] * 3])
    if unseen[0, 0] >= 0:
        assert not bound.residual(np.zeros(len(unseen), int), unseen).any()
    # With a prior SD of 0 (the held-out choice when residuals do not help) there are none.
    flat, rep = train_reward_model(
        world.catalog, enc.take(np.arange(5000)), RewardModelConfig(epochs=1, residual=False)
    )
    assert "residual_sd" not in rep.tuning and len(flat.residual_values) == 0


def test_residual_converges_to_the_observed_rate_with_traffic():
    """Many impressions of one combination: its posterior logit approaches the observed CTR,
    whatever the structure says."""
    from genco.training.residuals import _residual_newton

    rng = np.random.default_rng(0)
    n = 200_000
    y = (rng.random(n) < 0.05).astype(float)
    s = np.full(n, np.log(0.02 / 0.98))  # the structure is wrong: 2% instead of 5%
    r = _residual_newton(np.zeros(n, np.int64), 1, s, y, np.ones(n), sd=1.0)
    assert 1 / (1 + np.exp(-(s[0] + r[0]))) == pytest.approx(y.mean(), rel=0.01)
    # Thin traffic barely moves a tight prior: 2 clicks in 20 shows, or 1 in 1.
    two = np.zeros(20)
    two[:2] = 1
    few = _residual_newton(np.zeros(20, np.int64), 1, s[:20], two, np.ones(20), sd=0.1)
    one = _residual_newton(np.zeros(1, np.int64), 1, s[:1], np.ones(1), np.ones(1), sd=0.07)
    assert abs(few[0]) < 0.05 and abs(one[0]) < 0.05
    # Heavy tails: overwhelming evidence escapes the prior (20 clicks in 20 shows).
    all_ = _residual_newton(np.zeros(20, np.int64), 1, s[:20], np.ones(20), np.ones(20), sd=0.1)
    assert all_[0] > 3.0


def test_log_evidence_matches_brute_force_integration():
    """The marginal likelihood that picks the residuals' prior SD equals a brute-force
    integral of each group's residual over a fine grid, to ~1e-6 nats per group, at every SD
    from 'prior dominates' to 'data dominates'. (The Laplace approximation it replaced was
    0.17 nats per group low when the prior dominates, so a mid-sized log never got
    residuals.)"""
    import math

    from genco.training.residuals import RESIDUAL_DOF, _log_evidence

    # Groups from 'a few impressions' (the prior dominates) to 20k (the data dominates).
    group = np.array([0, 1, 1, 2, 2, 2, 3, 4])
    s = np.array([-3.0, -2.5, -2.8, -3.2, -3.0, -2.9, -4.0, -3.5])
    w = np.array([500.0, 300.0, 200.0, 1000.0, 50.0, 10.0, 3.0, 20000.0])
    y = np.array([0.06, 0.05, 0.1, 0.03, 0.02, 0.1, 0.33, 0.05])
    nu = RESIDUAL_DOF
    grid = np.linspace(-8, 8, 400_001)

    def brute(sd: float) -> float:
        log_t = (
            math.lgamma((nu + 1) / 2)
            - math.lgamma(nu / 2)
            - 0.5 * math.log(nu * math.pi)
            - math.log(sd)
            - (nu + 1) / 2 * np.log1p(grid**2 / (nu * sd**2))
        )
        total = 0.0
        for g in range(5):
            m = group == g
            z = s[m][None, :] + grid[:, None]
            f = -np.sum(w[m] * (np.logaddexp(0, z) - y[m] * z), axis=1) + log_t
            top = f.max()
            total += top + math.log(np.trapezoid(np.exp(f - top), grid))
        return total

    # Per-group accuracy matters: a log has 1e5+ groups, and a bias of 1e-3 nats per group
    # (a 32-node Gauss-Hermite rule's) is 100 nats, more than the SDs differ by.
    for sd in (0.005, 0.02, 0.05, 0.1, 0.3, 1.0):
        assert _log_evidence(group, 5, s, y, w, sd) == pytest.approx(brute(sd), abs=1e-5)
    # As the prior tightens, the evidence tends to that of no residuals at all.
    none = _log_evidence(group, 5, s, y, w, 0.0)
    assert _log_evidence(group, 5, s, y, w, 1e-5) == pytest.approx(none, abs=1e-3)


def test_credit_includes_the_residual_and_sums_to_the_creative_logit(fitted):
    world, enc, model, _ = fitted
    bound = BoundModel(model, world.catalog)
    base, credit = bound.credit(enc.ads[:500], enc.combos[:500], enc.ctx[:500])
    logit = bound.logit(enc.ads[:500], enc.combos[:500], enc.ctx[:500])
    np.testing.assert_allclose(base + credit.sum(1), logit, atol=1e-4)


def test_residuals_survive_a_state_dict_round_trip(fitted):
    world, enc, model, _ = fitted
    clone = RewardModel(model.vocab, model.config)
    clone.load_state_dict(model.state_dict())
    a, b = BoundModel(model, world.catalog), BoundModel(clone, world.catalog)
    np.testing.assert_allclose(
        a.logit(enc.ads[:300], enc.combos[:300], enc.ctx[:300]),
        b.logit(enc.ads[:300], enc.combos[:300], enc.ctx[:300]),
        atol=1e-6,
    )


def _predictor(world, model, explore=0.1):
    vocab = Vocab.from_catalog(world.catalog, model.vocab.context_columns)
    gen = Generator(vocab, GeneratorConfig(explore=explore))
    fit_scalers(gen, world.catalog, None)
    with torch.no_grad():  # a peaked policy, so exploration is what reaches the rest
        gen.elem.weight.mul_(30.0)
    return Predictor(model, gen, world.catalog, world.constraints)


def test_small_spaces_decode_exactly_to_the_reward_models_optimum(fitted):
    world, _, model, _ = fitted
    bound = BoundModel(model, world.catalog)
    pred = _predictor(world, model)
    for ad in range(world.catalog.n_ads):
        for x in (np.array([0.0, 0.3], np.float32), np.array([1.0, -1.0], np.float32)):
            legal = legal_combinations(world.catalog, world.constraints, ad)
            z = bound.logit(np.full(len(legal), ad), legal, np.tile(x, (len(legal), 1)))
            d = pred.decode(ad, x, top_k=3)
            assert d.scored == len(legal)
            np.testing.assert_array_equal(d.codes, legal[np.argsort(-z, kind="stable")[:3]])
            np.testing.assert_allclose(d.score, 1 / (1 + np.exp(-np.sort(z)[::-1][:3])), rtol=1e-4)
    # Over the exact limit the beam decides, and its picks are still legal.
    pred.exact_max = 1
    d = pred.decode(0, np.zeros(2, np.float32), top_k=3)
    assert (world.constraints.violations(np.zeros(len(d.codes), int), d.codes) < 0).all()


def test_sampling_explores_with_exact_propensities_and_a_floor(fitted):
    world, _, model, _ = fitted
    pred = _predictor(world, model, explore=0.2)
    policy, _ = pred.tables(1)
    x = np.array([1.0, 0.0], np.float32)
    legal = legal_combinations(world.catalog, world.constraints, 1)
    # Slots of every legal combination, by the ad's code -> slot maps.
    slot_of = [{int(c): i for i, c in enumerate(codes)} for codes in policy.masks.codes]
    slots = np.array([[slot_of[k][int(c)] for k, c in enumerate(row)] for row in legal])
    pi = np.exp(policy.log_prob(x, slots))
    q = np.exp(policy.log_uniform(slots))
    assert pi.sum() == pytest.approx(1.0, abs=1e-5) and q.sum() == pytest.approx(1.0, abs=1e-9)
    mix = 0.8 * pi + 0.2 * q
    floor = 0.2 / np.prod([len(c) for c in world.catalog.candidates[1]])
    assert mix.min() >= floor
    # Draws follow the mixture, and the returned propensity is the mixture's.
    counts = {}
    for seed in range(3000):
        d = pred.decode(1, x, top_k=1, mode="sample", seed=seed)
        key = tuple(d.codes[0])
        counts[key] = counts.get(key, 0) + 1
        row = [tuple(r) for r in legal.tolist()].index(key)
        assert d.propensity[0] == pytest.approx(mix[row], rel=1e-5)
    observed = np.array([counts.get(tuple(r), 0) for r in legal.tolist()]) / 3000
    assert np.abs(observed - mix).max() < 0.03
    assert (observed > 0).sum() > 0.5 * len(legal)  # exploration reaches most combinations
    # Without exploration the propensity is the policy's alone.
    d = pred.decode(1, x, top_k=1, mode="sample", seed=0, explore=0.0)
    row = [tuple(r) for r in legal.tolist()].index(tuple(d.codes[0]))
    assert d.propensity[0] == pytest.approx(pi[row], rel=1e-5)
    with pytest.raises(ValueError, match="explore"):
        pred.decode(1, x, mode="sample", explore=1.5)


def test_per_ad_effects_average_over_the_ads_own_legal_combinations(fitted):
    world, enc, model, _ = fitted
    bound = BoundModel(model, world.catalog)
    x = np.array([[1.0, 0.5]], np.float32)
    effects = ad_effects(bound.logit, world.catalog, world.constraints, x)
    for ad in range(world.catalog.n_ads):
        legal = legal_combinations(world.catalog, world.constraints, ad)
        z = bound.logit(np.full(len(legal), ad), legal, np.repeat(x, len(legal), 0))
        for k, cands in enumerate(world.catalog.candidates[ad]):
            for i, e in enumerate(cands):
                rows = legal[:, k] == e
                want = z[rows].mean() - z.mean() if rows.any() else np.nan
                np.testing.assert_allclose(effects[ad][k][i], want, atol=1e-4)
    table = element_table(bound, enc, world.constraints)
    assert len(table) == sum(
        len(c) for per in world.catalog.candidates for c in per
    )  # one row per catalog row
    assert {"ad_id", "component", "element_id", "effect", "effect_se"} <= set(table.columns)
    shown = table[table.impressions > 0]
    assert shown.effect_se.notna().all() and (shown.ci_low < shown.ci_high).all()


def test_per_product_worlds_give_every_ad_its_own_elements_and_round_trip(tmp_path):
    world = make_world(SMALL_PER_PRODUCT, seed=0)
    cat = world.catalog
    for k in range(cat.n_components):
        owners = {}
        for a in range(cat.n_ads):
            for e in cat.candidates[a][k]:
                assert owners.setdefault(int(e), a) == a  # no element shared between ads
    assert world.truth.inter3  # a three-way term
    combos = legal_combinations(cat, world.constraints, 0)
    truth = world.truth
    path = str(tmp_path / "truth.npz")
    truth.save(path)
    again = GroundTruth.load(path)
    ads = np.zeros(len(combos), int)
    np.testing.assert_allclose(again.logit(ads, combos), truth.logit(ads, combos))
    without = replace(truth, inter3={})
    assert not np.allclose(without.logit(ads, combos), truth.logit(ads, combos))


def test_baselines_learn_from_the_log():
    world = make_world(replace(WORLDS["interactions"], n_ads=8), seed=3)
    log = log_impressions(world, 60_000, seed=3)
    enc = encode(log, world.catalog)
    fm = FactorizationMachine(world.catalog, FMConfig(epochs=4)).fit(enc)
    emp = EmpiricalBest(enc)
    gaps_fm, gaps_emp = [], []
    for ad in range(world.catalog.n_ads):
        legal = legal_combinations(world.catalog, world.constraints, ad)
        true = world.truth.ctr(np.full(len(legal), ad), legal)
        keys = [tuple(r) for r in legal.tolist()]

        def gap(c, true=true, keys=keys):
            return (true[keys.index(tuple(c))] - true.mean()) / (true.max() - true.mean())

        gaps_fm.append(gap(legal[np.argmax(fm.scores(ad, legal, None))]))
        gaps_emp.append(gap(emp.pick(ad, None, legal)))
    # Both do far better than a uniform pick (gap 0) on this log.
    assert np.mean(gaps_fm) > 0.4 and np.mean(gaps_emp) > 0.2
