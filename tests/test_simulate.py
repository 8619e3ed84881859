"""Simulator invariants: legal logs, exact propensities, reproducible ground truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from genco.data.contract import load_catalog, load_constraints
from genco.data.ingest import ingest
from genco.data.space import legal_combinations
from genco.worlds.simulate import (
    WORLDS,
    GroundTruth,
    log_impressions,
    make_world,
    policy_propensity,
    simulate,
    world_config,
)
from genco.worlds.truth import CTR_MAX, CTR_MIN

SMALL_WORLDS = [w for w in WORLDS if w != "large"]


@pytest.mark.parametrize("name", SMALL_WORLDS)
def test_propensities_sum_to_one_over_legal_combinations(name):
    world = make_world(WORLDS[name], seed=1)
    for ad in range(world.catalog.n_ads):
        legal = legal_combinations(world.catalog, world.constraints, ad)
        p = policy_propensity(world, ad, legal)
        assert p.sum() == pytest.approx(1.0, abs=1e-9)
        assert np.all(p >= 0)


@pytest.mark.parametrize("name", list(WORLDS))
def test_logs_are_legal_and_carry_the_policy_propensity(name):
    world = make_world(WORLDS[name], seed=2)
    log = log_impressions(world, 3000, seed=2)
    cat = world.catalog
    ads = np.array([cat.ad_code(a) for a in log["ad_id"]])
    combos = np.stack(
        [np.array([cat.element_code(k, e) for e in log[c]]) for k, c in enumerate(cat.components)],
        1,
    )
    assert np.all(world.constraints.violations(ads, combos) < 0)
    for k in range(cat.n_components):
        for a in np.unique(ads):
            assert np.isin(combos[ads == a, k], cat.candidates[a][k]).all()
            # Cold-start elements are never shown.
            assert not world.truth.cold[k][combos[ads == a, k]].any()
    expected = np.concatenate(
        [policy_propensity(world, a, combos[ads == a]) for a in range(cat.n_ads)]
    )
    order = np.concatenate([np.flatnonzero(ads == a) for a in range(cat.n_ads)])
    np.testing.assert_allclose(log["propensity"].to_numpy()[order], expected, rtol=1e-12)
    assert log["timestamp"].is_monotonic_increasing


@pytest.mark.parametrize("name", list(WORLDS))
def test_true_ctr_is_in_a_realistic_range(name):
    world = make_world(WORLDS[name], seed=3)
    log = log_impressions(world, 5000, seed=3)
    rate = log["click"].mean()
    assert 0.01 < rate < 0.12
    rng = np.random.default_rng(0)
    ads = rng.integers(world.catalog.n_ads, size=2000)
    combos = np.stack(
        [
            np.array([rng.choice(world.catalog.candidates[a][k]) for a in ads])
            for k in range(world.catalog.n_components)
        ],
        1,
    )
    ctx = None
    if world.truth.n_context:
        ctx = np.stack([rng.integers(0, 2, len(ads)), rng.normal(size=len(ads))], 1)
    ctr = world.truth.ctr(ads, combos, ctx)
    assert ctr.min() >= CTR_MIN - 1e-12 and ctr.max() <= CTR_MAX + 1e-12
    assert ctr.std() > 0.003  # combinations matter


def test_simulation_is_reproducible_from_the_seed(tmp_path):
    a = simulate("constrained", seed=5, out_dir=str(tmp_path / "a"), n_impressions=2000)
    b = simulate("constrained", seed=5, out_dir=str(tmp_path / "b"), n_impressions=2000)
    c = simulate("constrained", seed=6, out_dir=str(tmp_path / "c"), n_impressions=2000)
    for name in ("catalog.csv", "constraints.csv", "impressions.csv", "contexts.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "impressions.csv").read_bytes() != (
        tmp_path / "c" / "impressions.csv"
    ).read_bytes()
    ta, tb = GroundTruth.load(a.ground_truth), GroundTruth.load(b.ground_truth)
    cat = load_catalog(a.catalog)
    legal = legal_combinations(cat, load_constraints(a.constraints, cat), 0)
    ads = np.zeros(len(legal), dtype=np.int64)
    np.testing.assert_array_equal(ta.ctr(ads, legal), tb.ctr(ads, legal))
    # The saved truth equals the in-memory world it came from.
    world = make_world(WORLDS["constrained"], seed=5)
    np.testing.assert_allclose(ta.ctr(ads, legal), world.truth.ctr(ads, legal))
    assert c.ground_truth != a.ground_truth


@pytest.mark.parametrize("name", list(WORLDS))
def test_simulated_files_pass_validation(tmp_path, name):
    out = simulate(
        name, seed=0, out_dir=str(tmp_path), n_impressions=2000, impressions_format="parquet"
    )
    cat = load_catalog(out.catalog)
    cons = load_constraints(out.constraints, cat)
    s = ingest(out.impressions, cat, cons, str(tmp_path / "ingest"))
    assert s.rows_valid == s.rows_in == 2000
    assert (out.constraints is not None) == (
        WORLDS[name].n_global_forbidden > 0 or WORLDS[name].forbid_best_share > 0
    )


def test_world_presets_have_the_promised_shape():
    assert make_world(WORLDS["large"], 0).catalog.n_combinations(0) >= 100_000
    ctx_world = make_world(WORLDS["contextual"], 0)
    assert ctx_world.truth.n_context == 2
    # A context feature flips preferences: the best combination differs by ctx_0 for most ads.
    flips = 0
    for ad in range(ctx_world.catalog.n_ads):
        legal = legal_combinations(ctx_world.catalog, ctx_world.constraints, ad)
        best = []
        for c0 in (0.0, 1.0):
            ctx = np.tile([c0, 0.0], (len(legal), 1))
            best.append(np.argmax(ctx_world.truth.logit(np.full(len(legal), ad), legal, ctx)))
        flips += best[0] != best[1]
    assert flips >= 0.8 * ctx_world.catalog.n_ads
    cold = make_world(WORLDS["cold_start"], 0)
    assert all(c.any() for c in cold.truth.cold)


def test_constrained_world_forbids_some_unconstrained_optima():
    world = make_world(WORLDS["constrained"], 0)
    from genco.data.contract import Constraints

    forbidden = 0
    for ad in range(world.catalog.n_ads):
        every = legal_combinations(world.catalog, Constraints.empty(), ad)
        z = world.truth.logit(np.full(len(every), ad), every)
        best = every[np.argmax(z)][None]
        forbidden += world.constraints.violations(np.array([ad]), best)[0] >= 0
    assert forbidden >= 0.4 * world.catalog.n_ads


def test_confounded_world_logs_bad_combinations_on_popular_ads():
    world = make_world(WORLDS["confounded"], 0)
    log = log_impressions(world, 20_000, seed=0)
    share = log["ad_id"].value_counts(normalize=True)
    top = world.catalog.ads[int(np.argmax(world.truth.appeal))]
    assert share[top] == share.max()  # the most appealing product is the most shown
    assert pd.Series(world.popularity).max() > 5 * pd.Series(world.popularity).min()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pool_size": 2, "n_candidates": 3}, "pool_size (2) must be >= n_candidates (3)"),
        ({"epsilon": 2.0}, "epsilon must be in [0, 1], got 2.0"),
        ({"n_ads": 0}, "n_ads must be >= 1, got 0"),
    ],
)
def test_world_config_validates_itself(overrides, message):
    with pytest.raises(ValueError) as err:
        world_config("default", **overrides)
    assert str(err.value) == message


def test_unknown_world_lists_presets():
    with pytest.raises(ValueError, match="unknown world 'nope'; choose one of: default, additive"):
        world_config("nope")


@pytest.mark.parametrize("name", ["per_product", "interactions"])
def test_idiosyncratic_part_is_what_the_features_do_not_explain(name):
    """World.idiosyncratic: the share (1 - feature_share) of the main effects' variance, and
    the rest of truth.main is a function of the features (equal features, equal remainder)."""
    config = world_config(name)
    w = make_world(config, 3)
    for k in range(w.catalog.n_components):
        idio = w.idiosyncratic[k]
        assert idio.shape == w.truth.main[k].shape
        expected = config.main_scale * np.sqrt(1 - config.feature_share)
        assert idio.std() == pytest.approx(expected, rel=1e-6)
    no_idio = make_world(world_config(name, feature_share=1.0), 3)
    assert all(np.all(d == 0) for d in no_idio.idiosyncratic)
