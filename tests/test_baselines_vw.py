"""VW baseline: it must be a fair opponent (finds good combinations, never an illegal one) and
its shortcut of training on the logged action alone must not change what VW learns."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import vowpalwabbit

from genco.data.contract import Catalog, Constraints
from genco.data.space import legal_combinations
from genco.evaluation.baselines_vw import (
    VWConfig,
    VWRecommender,
    best_legal_by_slots,
    expand_interactions,
)
from genco.worlds.simulate import WORLDS, World, log_impressions, make_world


def _world(name: str, n_ads: int, n_log: int, **overrides: object) -> tuple[World, pd.DataFrame]:
    config = dataclasses.replace(WORLDS[name], n_ads=n_ads, n_impressions=n_log, **overrides)
    world = make_world(config, seed=0)
    return world, log_impressions(world, n_log, seed=0)


def _gap_closed(world: World, ad: int, combo: np.ndarray, ctx: np.ndarray | None = None) -> float:
    """(ctr(pick) - mean legal ctr) / (best legal ctr - mean legal ctr), in truth's terms."""
    legal = legal_combinations(world.catalog, world.constraints, ad)
    many = None if ctx is None else np.repeat(ctx[None, :], len(legal), 0)
    ctr = world.truth.ctr(np.full(len(legal), ad), legal, many)
    pick = world.truth.ctr(np.array([ad]), combo[None, :], None if ctx is None else ctx[None, :])
    return float((pick[0] - ctr.mean()) / (ctr.max() - ctr.mean()))


def _assert_legal_candidate(world: World, ad: int, combo: np.ndarray) -> None:
    assert combo.shape == (world.catalog.n_components,)
    for k, e in enumerate(combo):
        assert e in world.catalog.candidates[ad][k]
    assert world.constraints.violations(np.array([ad]), combo[None, :])[0] == -1


@pytest.fixture(scope="module")
def additive() -> tuple[World, pd.DataFrame]:
    return _world("additive", n_ads=5, n_log=20_000)


@pytest.fixture(scope="module")
def constrained() -> tuple[World, pd.DataFrame]:
    return _world("constrained", n_ads=8, n_log=10_000)


def test_cb_adf_picks_combinations_clearly_better_than_uniform(additive):
    world, log = additive
    rec = VWRecommender(world.catalog, world.constraints).fit(log)
    assert rec.mode_used == "cb_adf"
    assert rec.vw_args.startswith("--cb_adf --cb_type mtr")
    gaps = [_gap_closed(world, ad, rec.best(ad)) for ad in range(world.catalog.n_ads)]
    assert sum(g > 0.5 for g in gaps) >= 4, gaps
    assert np.mean(gaps) > 0.6, gaps
    n_legal = [len(legal_combinations(world.catalog, world.constraints, a)) for a in range(5)]
    assert rec.n_scored == sum(n_legal)
    assert rec.train_seconds > 0


@pytest.mark.parametrize("mode", ["cb_adf", "slates"])
def test_constrained_world_never_gets_an_illegal_combination(constrained, mode):
    world, log = constrained
    assert len(world.constraints) > 0
    rec = VWRecommender(world.catalog, world.constraints, VWConfig(mode=mode)).fit(log)
    assert rec.mode_used == mode
    for ad in range(world.catalog.n_ads):
        _assert_legal_candidate(world, ad, rec.best(ad))


def test_slates_mode_runs_and_returns_legal_candidates(additive):
    world, log = additive
    rec = VWRecommender(world.catalog, world.constraints, VWConfig(mode="slates"))
    rec.fit(log.iloc[:5000])
    assert rec.mode_used == "slates"
    assert rec.vw_args.startswith("--slates")
    assert "--interactions" not in rec.vw_args  # element pairs cannot fire across slots
    gaps = []
    for ad in range(world.catalog.n_ads):
        combo = rec.best(ad)
        _assert_legal_candidate(world, ad, combo)
        gaps.append(_gap_closed(world, ad, combo))
    assert np.mean(gaps) > 0.3, gaps
    per_ad = [sum(len(c) for c in world.catalog.candidates[a]) for a in range(5)]
    assert rec.n_scored == sum(per_ad)


def test_spaces_over_max_actions_fall_back_to_slates(additive):
    world, _ = additive
    n = world.catalog.n_combinations(0)
    fits = VWRecommender(world.catalog, world.constraints, VWConfig(max_actions=n))
    too_big = VWRecommender(world.catalog, world.constraints, VWConfig(max_actions=n - 1))
    assert fits.mode_used == "cb_adf"
    assert too_big.mode_used == "slates"


def test_contextual_model_needs_and_uses_the_context():
    world, log = _world("contextual", n_ads=3, n_log=3000)
    rec = VWRecommender(world.catalog, world.constraints).fit(log)
    assert "--interactions x" in rec.vw_args
    with pytest.raises(ValueError, match="trained with context columns"):
        rec.best(0, None)
    with pytest.raises(ValueError, match="ctx has 1 values, the model expects 2"):
        rec.best(0, np.array([1.0]))
    for c0 in (0.0, 1.0):
        _assert_legal_candidate(world, 1, rec.best(1, np.array([c0, 0.0])))


def test_training_on_the_logged_action_alone_equals_the_full_action_set():
    """The speed-up rests on VW's mtr touching only the logged action; check it exactly."""
    world, log = _world("additive", n_ads=3, n_log=3000, n_components=3, n_candidates=3)
    rec = VWRecommender(world.catalog, world.constraints).fit(log)
    full = vowpalwabbit.Workspace(rec.vw_args, enable_logging=False)
    ads, combos, ctx = rec._encode(log)
    legal = {a: legal_combinations(world.catalog, world.constraints, a) for a in range(3)}
    for a, combo, x, click, p in zip(ads, combos, ctx, log["click"], log["propensity"]):
        chosen = int(np.flatnonzero((legal[a] == combo).all(1))[0])
        lines = ["shared " + rec._shared_features(a, x)]
        for j, c in enumerate(legal[a]):
            label = f"0:{0.0 - click}:{p} " if j == chosen else ""
            lines.append(label + rec._action_line(c))
        full.learn(lines)
    for a in range(3):
        lines = ["shared " + rec._shared_features(a, np.zeros(0))]
        lines += [rec._action_line(c) for c in legal[a]]
        assert rec._ws is not None
        np.testing.assert_allclose(rec._ws.predict(lines), full.predict(lines), atol=1e-6)
    full.finish()


def _tiny_catalog(n_components: int, n_candidates: int) -> Catalog:
    rows = [("ad", f"c{k}", f"e{k}_{i}") for k in range(n_components) for i in range(n_candidates)]
    return Catalog.from_frame(pd.DataFrame(rows, columns=["ad_id", "component", "element_id"]))


def test_best_legal_by_slots_skips_a_forbidden_slotwise_best():
    catalog = _tiny_catalog(2, 3)
    cands = catalog.candidates[0]
    utils = [np.array([3.0, 2.0, 0.0]), np.array([3.0, 1.0, 0.0])]
    free = best_legal_by_slots(Constraints.empty(), 0, cands, utils)
    assert free.tolist() == [0, 0]
    forbid = pd.DataFrame(
        [("*", "c0", "e0_0", "c1", "e1_0")],
        columns=["ad_id", "component_a", "element_a", "component_b", "element_b"],
    )
    constraints = Constraints.from_frame(forbid, catalog)
    # (0, 1) sums to 4, (1, 0) to 5: the runner-up is in another slot than the first change.
    assert best_legal_by_slots(constraints, 0, cands, utils).tolist() == [1, 0]


def test_best_legal_by_slots_matches_brute_force():
    rng = np.random.default_rng(0)
    catalog = _tiny_catalog(3, 4)
    cands = catalog.candidates[0]
    for _ in range(25):
        pairs = []
        for _ in range(int(rng.integers(1, 12))):
            ka, kb = sorted(rng.choice(3, 2, replace=False))
            ea, eb = rng.integers(4, size=2)
            pairs.append(("ad", f"c{ka}", f"e{ka}_{ea}", f"c{kb}", f"e{kb}_{eb}"))
        frame = pd.DataFrame(
            sorted(set(pairs)),
            columns=["ad_id", "component_a", "element_a", "component_b", "element_b"],
        )
        constraints = Constraints.from_frame(frame, catalog)
        legal = legal_combinations(catalog, constraints, 0)
        utils = [rng.normal(size=4) for _ in range(3)]
        total = sum(utils[k][legal[:, k]] for k in range(3))
        got = best_legal_by_slots(constraints, 0, cands, utils)
        assert got.tolist() == legal[int(np.argmax(total))].tolist()


def test_expand_interactions_covers_every_component_set():
    assert expand_interactions(("ee", "xe", "xee", "ax"), 3) == [
        "bc",
        "bd",
        "cd",
        "xb",
        "xc",
        "xd",
        "xbc",
        "xbd",
        "xcd",
        "ax",
    ]


def test_fit_and_best_reject_bad_input(additive):
    world, log = additive
    rec = VWRecommender(world.catalog, world.constraints)
    with pytest.raises(RuntimeError, match="called before fit"):
        rec.best(0)
    with pytest.raises(ValueError, match="click must be 0 or 1"):
        rec.fit(log.iloc[:10].assign(click=2))
    with pytest.raises(KeyError, match="ad_id 'nope' is not in the catalog"):
        rec.fit(log.iloc[:10].assign(ad_id="nope"))
    with pytest.raises(ValueError, match="missing required column 'click'"):
        rec.fit(log.drop(columns="click"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mode": "full"}, "VWConfig.mode must be 'cb_adf' or 'slates', got 'full'"),
        ({"passes": 0}, "VWConfig.passes must be an integer >= 1, got 0"),
        ({"passes": 1.5}, "VWConfig.passes must be an integer >= 1, got 1.5"),
        ({"max_actions": 0}, "VWConfig.max_actions must be an integer >= 1, got 0"),
        ({"seed": -1}, "VWConfig.seed must be an integer >= 0, got -1"),
        ({"bits": 40}, "VWConfig.bits must be an integer in [10, 30], got 40"),
        (
            {"learning_rate": 0.0},
            "VWConfig.learning_rate must be a finite number > 0, got 0.0",
        ),
        (
            {"learning_rate": float("inf")},
            "VWConfig.learning_rate must be a finite number > 0, got inf",
        ),
        ({"interactions": "ee"}, "VWConfig.interactions must be a tuple of strings, got 'ee'"),
        *[
            (
                {"interactions": ("ee", bad)},
                f"VWConfig.interactions item {bad!r} must be 2 or 3 letters from a (ad), "
                "x (context), e (element), with a and x at most once each",
            )
            for bad in ("eq", "e", "eeee", "xx")
        ],
    ],
)
def test_config_validation_messages(overrides, message):
    with pytest.raises(ValueError) as err:
        VWConfig(**overrides)
    assert str(err.value) == message


def test_config_defaults_are_valid_and_documented():
    config = VWConfig()
    assert config.mode == "cb_adf"
    for f in dataclasses.fields(VWConfig):
        assert f.metadata.get("help"), f.name
    assert VWConfig(interactions=["ee"]).interactions == ("ee",)
    assert config.interactions == ("ee", "xe", "xee")
