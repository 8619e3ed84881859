"""genco.evaluation.evaluate (the gate) and genco.evaluation.report (the HTML page) on real
bundles of a tiny world."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from genco.evaluation.evaluate import (
    BundleEval,
    Difference,
    EvalConfig,
    PolicyValue,
    _snips,
    _snips_difference,
    evaluate_bundle,
    gate,
)
from genco.evaluation.report import render_report
from genco.models.generator import GeneratorConfig
from genco.models.reward import RewardModelConfig
from genco.store import bundle_digest
from genco.training.bundle import run_train
from genco.worlds.simulate import GroundTruth, SimulationOutputs, simulate, world_config


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SimulationOutputs:
    out = tmp_path_factory.mktemp("eval_world")
    # 27 combinations per ad: enough logged matches per policy for a stable value estimate.
    config = world_config("default", n_ads=4, n_candidates=3, pool_size=4)
    return simulate(config, seed=2, out_dir=str(out), n_impressions=8000)


@pytest.fixture(scope="module")
def bundles(world: SimulationOutputs, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A trained bundle and a deliberately bad one: a reward model that barely moved from its
    initialisation (1 epoch at a tiny step, no residuals) and an untrained generator decoded
    greedily (beam width 1). Small spaces decode exactly on the reward model, so a bad
    bundle needs a bad reward model too."""
    root = tmp_path_factory.mktemp("eval_bundles")
    out = {}
    for name, reward, steps, beam in (
        ("good", RewardModelConfig(epochs=5), 40, 16),
        ("bad", RewardModelConfig(epochs=1, lr=1e-3, residual=False), 0, 1),
    ):
        run_train(
            world.catalog,
            world.impressions,
            str(root / name),
            world.constraints,
            reward,
            GeneratorConfig(rl_steps=steps, beam_width=beam),
        )
        out[name] = str(root / name)
    out["data"] = str(root / "good" / "ingest" / "impressions.parquet")
    return out


# The estimator and gate mechanics below are checked on every row of the 8,000-row log
# (value_rows="all"); the default, the 800 held-out rows, is checked on its own. They use the
# normal bound ("lcb"): on a uniform log of 27 combinations (weights 27) the default
# empirical-Bernstein bound needs far more rows than 8,000 to certify this +0.03 gain
# (tests/test_gate_bounds.py checks it on its own).
ALL = EvalConfig(value_rows="all", rule="lcb")


def test_values_default_to_the_held_out_rows(bundles):
    held = evaluate_bundle(bundles["good"], bundles["data"], bundles["bad"])
    assert held.policy_rows == held.holdout_rows == 800
    assert held.candidate.policy.rows == 800


def test_good_candidate_beats_bad_production_and_not_the_reverse(bundles, world):
    truth = GroundTruth.load(world.ground_truth)
    win = evaluate_bundle(bundles["good"], bundles["data"], bundles["bad"], ALL, truth=truth)
    assert win.passed and win.reason.startswith("candidate - production = +")
    assert win.candidate_value > win.production_value
    assert 0 < win.difference.lower_bound < win.difference.value
    assert win.difference.value == pytest.approx(win.candidate_value - win.production_value)
    assert win.candidate.gap_closed > win.production.gap_closed
    assert win.candidate_digest == bundle_digest(bundles["good"])
    assert win.policy_rows == 8000 and win.holdout_rows == 800
    assert win.propensity_source == "logged"
    lose = evaluate_bundle(bundles["bad"], bundles["data"], bundles["good"], ALL)
    assert not lose.passed and "<= margin x production" in lose.reason
    point = EvalConfig(rule="point", value_rows="all")
    lose = evaluate_bundle(bundles["bad"], bundles["data"], bundles["good"], point)
    assert not lose.passed and " < production " in lose.reason
    # A negative margin tolerates a loss up to that share.
    ratio = lose.candidate_value / lose.production_value
    tolerant = evaluate_bundle(
        bundles["bad"],
        bundles["data"],
        bundles["good"],
        EvalConfig(margin=ratio - 1.001, rule="point", value_rows="all"),
    )
    assert tolerant.passed


def test_same_model_never_passes_the_lcb_gate(bundles):
    same = evaluate_bundle(bundles["good"], bundles["data"], bundles["good"])
    assert not same.passed and same.candidate_value == same.production_value
    assert same.difference.value == 0.0 and same.difference.se == 0.0
    assert same.candidate.auc == same.production.auc
    point = evaluate_bundle(
        bundles["good"], bundles["data"], bundles["good"], EvalConfig(rule="point")
    )
    assert point.passed  # the point rule lets a tie through at zero margin, not at 0.01
    assert not evaluate_bundle(
        bundles["good"], bundles["data"], bundles["good"], EvalConfig(margin=0.01, rule="point")
    ).passed


def test_snips_difference_by_hand_and_its_bound():
    # candidate matches rows 0, 1; production rows 1, 2 (row 1: both, so it mostly cancels)
    mc = np.array([1.0, 1.0, 0.0, 0.0])
    mp = np.array([0.0, 1.0, 1.0, 0.0])
    y = np.array([1.0, 0.0, 0.0, 1.0])
    p = np.array([0.5, 0.5, 0.25, 0.5])
    d = _snips_difference(mc, mp, y, p, 0.95)
    # V_c = 2 / 4 = 0.5; V_p = 0 / 6 = 0
    assert d.value == pytest.approx(0.5)
    psi = np.array([2 * 0.5 / 4, 2 * -0.5 / 4 - 0.0, 0.0, 0.0])
    assert d.se == pytest.approx(np.sqrt((psi**2).sum()))
    assert d.lower_bound == pytest.approx(0.5 - 1.6448536 * d.se, rel=1e-6)
    assert d.ci_low < d.lower_bound < d.value < d.ci_high
    assert _snips_difference(np.zeros(4), mp, y, p, 0.95) is None


def test_lcb_gate_table():
    diff = Difference(0.01, 0.004, 0.002, 0.018, 0.0034, 0.95)
    ok, why = gate(_be(0.11), _be(0.1), 0.0, diff)
    assert ok and "lower bound +0.00340 > margin x production = +0.00000" in why
    ok, why = gate(_be(0.11), _be(0.1), 0.05, diff)
    assert not ok and "<= margin x production = +0.00500" in why
    noisy = Difference(0.01, 0.02, -0.03, 0.05, -0.023, 0.95)
    assert not gate(_be(0.11), _be(0.1), 0.0, noisy)[0]  # a lucky draw never ships


def test_metrics_and_gate_file_shape(bundles):
    result = evaluate_bundle(
        bundles["good"], bundles["data"], bundles["bad"], ALL, production_version="v0"
    )
    m = result.metrics()
    for who in ("candidate", "production"):
        assert 0.5 < m[f"{who}_auc"] < 1.0
        assert m[f"{who}_value_ci_low"] <= m[f"{who}_value"] <= m[f"{who}_value_ci_high"]
        assert m[f"{who}_matched"] > 0
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    d = result.to_dict()
    assert d["passed"] is True and d["production_version"] == "v0"
    assert d["candidate_value"] == result.candidate_value
    assert len(d["candidate"]["reliability"]) == 10


def test_without_propensities_uses_per_ad_frequencies(bundles):
    frame = pd.read_parquet(bundles["data"]).drop(columns=["propensity"])
    result = evaluate_bundle(bundles["good"], frame, bundles["bad"], ALL)
    assert result.propensity_source.startswith("estimated")
    assert result.candidate_value is not None and result.passed


def test_no_production_is_a_first_deployment(bundles):
    result = evaluate_bundle(bundles["bad"], bundles["data"], None)
    assert result.passed and result.reason == "no production model: first deployment"
    assert result.production is None and "production_auc" not in result.metrics()


def test_production_that_cannot_read_todays_catalog_fails_the_gate(bundles, world, tmp_path):
    other = simulate(world_config("default", n_ads=3, n_components=2), 0, str(tmp_path / "w"), 2000)
    run_train(
        other.catalog,
        other.impressions,
        str(tmp_path / "old"),
        other.constraints,
        RewardModelConfig(epochs=1),
        GeneratorConfig(rl_steps=0),
    )
    result = evaluate_bundle(bundles["good"], bundles["data"], str(tmp_path / "old"))
    assert not result.passed  # fail closed: a person deploys across a catalog redesign
    assert result.reason.startswith("production cannot score the current data (catalog")
    assert "deploy by hand" in result.reason
    assert result.production.error and result.production.value is None


def test_damaged_production_fails_the_gate(bundles, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(bundles["bad"], damaged)
    (damaged / "generator.pt").write_bytes(b"not the weights")
    result = evaluate_bundle(bundles["good"], bundles["data"], str(damaged))
    assert not result.passed and "sha256" in result.reason


def test_unexpected_error_scoring_production_propagates(bundles, tmp_path):
    # A production whose metadata lacks a key the loader needs: before, the KeyError read as
    # "production cannot score the data" and the candidate deployed.
    broken = tmp_path / "broken"
    shutil.copytree(bundles["bad"], broken)
    meta = json.loads((broken / "reward_model.json").read_text())
    del meta["config"]
    (broken / "reward_model.json").write_text(json.dumps(meta))
    # ...with a manifest that agrees (a buggy trainer, not a torn write: that is a BundleError)
    manifest = json.loads((broken / "manifest.json").read_text())
    data = (broken / "reward_model.json").read_bytes()
    manifest["files"]["reward_model.json"] = hashlib.sha256(data).hexdigest()
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KeyError, match="config"):
        evaluate_bundle(bundles["good"], bundles["data"], str(broken))


def test_policy_rows_are_subsampled_above_the_decode_budget(bundles):
    result = evaluate_bundle(
        bundles["good"], bundles["data"], None, EvalConfig(max_policy_contexts=3)
    )
    assert result.policy_rows == 3  # 4 ads > 3 keys: a seeded subset of rows


def _be(value: float | None, error: str | None = None) -> BundleEval:
    policy = PolicyValue(value, value, value, 0 if value is None else 10, 10.0, 100)
    return BundleEval("p", "v", policy=policy, error=error)


@pytest.mark.parametrize(
    ("cand", "prod", "margin", "passed", "reason"),
    [
        (_be(0.1), None, 0.0, True, "no production model: first deployment"),
        (_be(None, "ctx"), None, 0.0, False, "the candidate cannot score this data (ctx)"),
        (_be(0.1), _be(None, "bad"), 0.0, False, "production cannot score the current data (bad)"),
        (_be(None), _be(0.1), 0.0, False, "no logged impression matches the candidate's"),
        (_be(0.1), _be(None), 0.0, False, "no logged impression matches production's"),
        (_be(0.11), _be(0.1), 0.1, True, "candidate value 0.11000 >= production 0.10000"),
        (_be(0.1), _be(0.1), 0.1, False, "candidate value 0.10000 < production 0.10000"),
        (_be(0.095), _be(0.1), -0.05, True, "x (1 + -0.05) = 0.09500"),
    ],
)
def test_gate_table(cand, prod, margin, passed, reason):
    ok, why = gate(cand, prod, margin)
    assert ok is passed and reason in why


def test_snips_by_hand():
    match = np.array([1.0, 1.0, 0.0, 1.0])
    click = np.array([1.0, 0.0, 1.0, 0.0])
    prop = np.array([0.5, 0.25, 0.5, 1.0])
    v = _snips(match, click, prop, 0.95)
    # weights 2, 4, 0, 1 -> (2*1) / 7
    assert v.value == pytest.approx(2 / 7) and v.matched == 3 and v.rows == 4
    se = math.sqrt(4 * (1 - 2 / 7) ** 2 + 16 * (2 / 7) ** 2 + 1 * (2 / 7) ** 2) / 7
    assert v.ci_high - v.value == pytest.approx(1.959964 * se, rel=1e-5)
    assert v.effective_n == pytest.approx(49 / 21)
    none = _snips(np.zeros(3), np.ones(3), np.ones(3), 0.95)
    assert none.value is None and none.matched == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"margin": -1.0}, "margin must be > -1, got -1.0"),
        ({"holdout_fraction": 0.0}, "holdout_fraction must be in (0, 1), got 0.0"),
        ({"confidence": 1.0}, "confidence must be in (0, 1), got 1.0"),
        ({"max_policy_contexts": 0}, "max_policy_contexts must be >= 1, got 0"),
        ({"n_bins": 0}, "n_bins must be >= 1, got 0"),
        ({"clip": 0.5}, "clip must be >= 1, got 0.5"),
        ({"min_ess": -1.0}, "min_ess must be >= 0, got -1.0"),
        ({"rule": "ttest"}, "rule must be one of bernstein, lcb, point, got 'ttest'"),
    ],
)
def test_eval_config_rejects(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        EvalConfig(**kwargs)


def test_empty_impressions_are_rejected(bundles):
    empty = pd.read_parquet(bundles["data"]).iloc[:0]
    with pytest.raises(ValueError, match="impressions: no rows to evaluate on"):
        evaluate_bundle(bundles["good"], empty)


def test_report_is_self_contained_html(bundles, world):
    result = evaluate_bundle(
        bundles["bad"], bundles["data"], bundles["good"], truth=GroundTruth.load(world.ground_truth)
    )
    page = render_report(bundles["bad"], result)
    assert page.startswith("<!doctype html>") and "REFUSED: production stays" in page
    assert page.count("<img") == 4 and "src='http" not in page
    assert "gap closed (simulation)" in page and "oracle" in page
    # Without a result (e.g. re-rendering a stored version) it draws from the bundle alone.
    bare = render_report(bundles["good"])
    assert bare.count("data:image/png;base64,") == 4 and "PASSED" not in bare
