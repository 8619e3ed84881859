"""The feature tower (``feature_hidden``) is chosen on the held-out slice like the three-way
term: kept where the truth is nonlinear in the element features, rejected where it is
linear, and a rejected tower leaves exactly the linear model (in the fit and in the bundle)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from genco.models.checkpoint import load_reward_model, save_reward_model
from genco.models.reward import BoundModel, RewardModelConfig
from genco.models.vocab import encode
from genco.training import term_choice
from genco.training.reward_fit import train_reward_model
from genco.worlds.simulate import WORLDS, log_impressions, make_world

# Every ad its own elements (100 ads x 6: 600 per component, ~60 impressions each: their
# features must carry them, as on the per-product worlds), no pairwise terms
# (the simulator's are nonlinear in the features), so what decides is the main effect's form.
SMALL = dataclasses.replace(
    WORLDS["per_product"], n_ads=100, n_components=3, n_candidates=6, interaction_scale=0.0
)
# Small steps: the linear map must converge within the epochs, or the tower's extra weights
# win on speed alone (at 2,048 a step it gained 2.3 standard errors on the linear truth).
CONFIG = RewardModelConfig(
    feature_hidden=8, dim3=3, l2_id=0.1, epochs=10, batch_size=512, residual=False
)


def _world_with_main(form):
    """SMALL with each element's main effect replaced by ``form(its features)``."""
    world = make_world(SMALL, seed=4)
    feats = world.catalog.features
    truth = dataclasses.replace(world.truth, main=[form(f) for f in feats])
    world = dataclasses.replace(world, truth=truth)
    return world, encode(log_impressions(world, 40_000, seed=4), world.catalog)


@pytest.fixture(scope="module")
def nonlinear():
    """A main effect no linear map of the features has: 0.8 (f_0^2 - 1)."""
    return _world_with_main(lambda f: 0.8 * (f[:, 0] ** 2 - 1.0))


@pytest.fixture(scope="module")
def linear():
    """The same world, the main effect linear in the features: 0.8 f_0."""
    return _world_with_main(lambda f: 0.8 * f[:, 0])


def _logits(model, world, enc) -> np.ndarray:
    ctx = enc.ctx if enc.ctx.shape[1] else None
    return BoundModel(model, world.catalog).logit(enc.ads[:2000], enc.combos[:2000], ctx)


def test_the_tower_is_kept_where_the_truth_is_nonlinear_in_the_features(nonlinear):
    world, enc = nonlinear
    model, report = train_reward_model(world.catalog, enc, CONFIG)
    t = report.tuning
    gain, se, loss = (
        t["feature_tower_gain"],
        t["feature_tower_gain_se"],
        t["feature_tower_val_loss"],
    )
    assert t["feature_tower_z"] == term_choice.TOWER_Z
    assert se > 0 and gain > term_choice.TOWER_Z * se
    assert t["feature_tower"] is True
    assert gain == pytest.approx(loss["off"] - loss["on"], abs=1e-6)
    assert model.tower_on and all(p.any() for p in model.tower.parameters())
    # The three-way choice then starts from the kept tower: its "off" is the tower's fit.
    assert t["three_way_val_loss"]["off"] == loss["on"]


@pytest.fixture(scope="module")
def linear_fit(linear):
    """The linear world fitted with the tower offered (no three-way term: one fit less)."""
    world, enc = linear
    return train_reward_model(world.catalog, enc, dataclasses.replace(CONFIG, dim3=0))


def test_the_tower_is_rejected_where_the_truth_is_linear(linear, linear_fit, tmp_path):
    world, enc = linear
    model, report = linear_fit
    t = report.tuning
    assert t["feature_tower"] is False
    assert not t["feature_tower_gain"] > term_choice.TOWER_Z * t["feature_tower_gain_se"]
    assert "three_way" not in t
    assert not model.tower_on
    assert not any(p.any() for p in model.tower.parameters())
    # Rejected, the tower is exactly absent: the same scores as a fit that never had one.
    plain, _ = train_reward_model(
        world.catalog, enc, dataclasses.replace(CONFIG, dim3=0, feature_hidden=0)
    )
    np.testing.assert_array_equal(_logits(model, world, enc), _logits(plain, world, enc))
    # ... and its bundle loads with the tower off.
    save_reward_model(model, str(tmp_path / "rm"))
    loaded, _ = load_reward_model(str(tmp_path / "rm"))
    assert not loaded.tower_on
    np.testing.assert_array_equal(_logits(loaded, world, enc), _logits(model, world, enc))


def test_a_warm_start_from_a_model_that_rejected_the_tower_gives_it_a_random_start(
    linear, linear_fit, monkeypatch
):
    """Zero tower weights are a saddle (no gradient reaches either layer), so a warm start
    keeps the new model's random tower where the previous one had none: kept this time (z =
    -inf), it has learned something."""
    world, enc = linear
    previous, _ = linear_fit
    monkeypatch.setattr(term_choice, "TOWER_Z", -np.inf)
    config = dataclasses.replace(CONFIG, dim3=0, epochs=2)
    model, report = train_reward_model(world.catalog, enc, config, init=previous)
    assert report.tuning["feature_tower"] is True and model.tower_on
    assert all(p.any() for p in model.tower.parameters())
