"""Reward model: exact attribution, learning, cold start, bundle, bad inputs."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from genco.errors import BundleError
from genco.evaluation.metrics import spearman
from genco.models.checkpoint import (
    ELEMENT_FILE,
    IMPRESSION_FILE,
    load_reward_model,
    save_reward_model,
)
from genco.models.reward import BoundModel, RewardModelConfig
from genco.models.vocab import encode
from genco.training.attribution import element_table, fit_and_attribute
from genco.training.reward_fit import train_reward_model
from genco.worlds.simulate import WORLDS, log_impressions, make_world

FAST = RewardModelConfig(epochs=6, batch_size=2048)


@pytest.fixture(scope="module")
def additive():
    world = make_world(WORLDS["additive"], seed=0)
    log = log_impressions(world, 60_000, seed=0)
    model, report = train_reward_model(world.catalog, log, FAST)
    return world, log, model, report


def test_attributions_sum_exactly_to_the_creative_logit(additive):
    world, log, model, _ = additive
    b = BoundModel(model, world.catalog)
    enc = encode(log.iloc[:2000], world.catalog)
    base, credit = b.credit(enc.ads, enc.combos, enc.ctx)
    logit = b.logit(enc.ads, enc.combos, enc.ctx)
    np.testing.assert_allclose(credit.sum(1), logit - base, atol=1e-5)
    # And the base is the appeal: it does not move with the combination.
    other = enc.combos.copy()
    other[:, 0] = world.catalog.candidates[0][0][0]
    base2, _ = b.credit(np.zeros(len(enc), np.int64), other, enc.ctx)
    base0, _ = b.credit(np.zeros(len(enc), np.int64), enc.combos, enc.ctx)
    np.testing.assert_allclose(base2, base0, atol=1e-6)


@pytest.mark.parametrize(
    "hidden, dim3", [(0, 0), (4, 0), (0, 3)], ids=["linear", "feature-tower", "three-way"]
)
def test_a_training_step_changes_parameters(hidden, dim3, monkeypatch):
    from genco.training import term_choice

    # The tower kept whatever its held-out gain (one epoch on 3,000 rows decides nothing):
    # what is under test is that every layer of it trains.
    monkeypatch.setattr(term_choice, "TOWER_Z", -np.inf)
    world = make_world(WORLDS["default"], seed=0)
    log = log_impressions(world, 3000, seed=0)
    from genco.models.reward import RewardModel
    from genco.models.vocab import Vocab

    config = RewardModelConfig(epochs=1, seed=3, feature_hidden=hidden, dim3=dim3)
    vocab = Vocab.from_catalog(world.catalog, ())

    def untrained() -> RewardModel:
        # What train_reward_model builds before its first step: the same seed, zero steps.
        # (It also sets ``bias`` to the log-odds of the training rows before the first step,
        # so a changed bias would prove nothing: it is not asserted.)
        torch.manual_seed(config.seed)
        return RewardModel(vocab, config)

    before = dict(untrained().named_parameters())
    again = dict(untrained().named_parameters())
    assert all(torch.equal(p, again[n]) for n, p in before.items())  # the baseline is exact
    model, report = train_reward_model(world.catalog, log, config)
    assert report.epochs == 1
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert {"id_main.weight", "id_ffm.weight", "w_ffm", "appeal.weight"} <= changed
    tower = {n for n, _ in model.named_parameters() if n.startswith("tower.")}
    assert len(tower) == (4 * len(world.catalog.components) if hidden else 0)
    assert tower <= changed  # every layer of every component's tower trains
    three = {n for n, _ in model.named_parameters() if n in ("id3.weight", "w3")}
    assert three == ({"id3.weight", "w3"} if dim3 else set())
    assert three <= changed


@pytest.fixture(scope="module")
def three_way():
    """A fitted model with a three-way term on a 4-component world, its vectors scaled up so
    that the term is large, and rows of its log."""
    world = make_world(WORLDS["per_product_3way"], seed=0)
    log = log_impressions(world, 30_000, seed=0)
    model, _ = train_reward_model(
        world.catalog, log, RewardModelConfig(epochs=2, dim3=3, residual=False, val_fraction=0.0)
    )  # no held-out slice: the term is fitted with the rest, not chosen
    with torch.no_grad():
        model.id3.weight.mul_(10.0)
    return world, model, encode(log.iloc[:3000], world.catalog)


def test_the_three_way_term_is_kept_only_when_it_lowers_the_held_out_loss_beyond_noise():
    from genco.training.reward_fit import _rows, _split
    from genco.training.term_choice import THREE_WAY_Z

    world = make_world(WORLDS["per_product_3way"], seed=1)
    enc = encode(log_impressions(world, 40_000, seed=1), world.catalog)
    config = RewardModelConfig(dim3=3, epochs=4, residual=False)
    model, report = train_reward_model(world.catalog, enc, config)
    t = report.tuning
    off, on = t["three_way_val_loss"]["off"], t["three_way_val_loss"]["on"]
    assert t["three_way"] == (t["three_way_gain"] > THREE_WAY_Z * t["three_way_gain_se"])
    assert not t["three_way"] or on < off
    # Chosen at the path's first L2, which goes on with the fit kept.
    assert t["l2_id_val_loss"]["0.1"] == (on if t["three_way"] else off)
    zero = not model.w3.any() and not model.id3.weight.any()
    assert zero == (not t["three_way"])  # rejected: exactly no three-way term
    # The model returned is the one whose held-out loss decided.
    _, va, _ = _split(enc, config)
    val = _rows(BoundModel(model, world.catalog), enc, va, np.ones(len(enc)))
    with torch.no_grad():
        z = model(val.ad, val.elem, val.feats, val.x)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(z, val.y, reduction="none")
    best = min(t["l2_id_val_loss"].values())
    assert float((bce * val.weight).sum() / val.weight.sum()) == pytest.approx(best, 1e-5)


def test_three_way_term_sums_every_triple_and_its_credit_splits_each_in_thirds(three_way):
    world, model, enc = three_way
    b = BoundModel(model, world.catalog)
    ad, elem, feats, x = b._inputs(enc.ads, enc.combos, enc.ctx)
    with torch.no_grad():
        f = (feats - model.feat_mean) / model.feat_std
        u = (model.id3(elem) + torch.einsum("bkf,kfd->bkd", f, model.w3)).numpy()
        forward = model(ad, elem, feats, x).numpy()
    K = u.shape[1]
    triples = [(k, l_, m) for k in range(K) for l_ in range(k + 1, K) for m in range(l_ + 1, K)]
    term = {t: (u[:, t[0]] * u[:, t[1]] * u[:, t[2]]).sum(-1) for t in triples}  # (B,) each
    base, main, inter, tri = b.parts(enc.ads, enc.combos, enc.ctx)
    assert np.abs(sum(term.values())).std() > 0.1  # the term is not negligible here
    np.testing.assert_allclose(tri.sum(1), sum(term.values()), atol=1e-5)
    for k in range(K):  # each element: a third of every triple it is in
        np.testing.assert_allclose(
            tri[:, k], sum(v for t, v in term.items() if k in t) / 3, atol=1e-5
        )
    logit = b.logit(enc.ads, enc.combos, enc.ctx)
    np.testing.assert_allclose(forward, logit, atol=1e-5)  # training's sum is the same model
    np.testing.assert_allclose(
        logit, base + main.sum(1) + inter.sum((1, 2)) / 2 + tri.sum(1), atol=1e-5
    )
    b_base, credit = b.credit(enc.ads, enc.combos, enc.ctx)
    np.testing.assert_allclose(credit.sum(1), logit - b_base, atol=1e-5)


def test_three_way_effects_average_over_uniform_partners():
    """element_effects: E[logit | e_k = e] - E[logit] over partners drawn uniformly from each
    component's catalog elements, checked by brute force over all 10^4 combinations."""
    from genco.models.reward import RewardModel
    from genco.models.vocab import Vocab

    world = make_world(WORLDS["interactions"], seed=0)
    cat = world.catalog
    torch.manual_seed(0)
    model = RewardModel(Vocab.from_catalog(cat, ()), RewardModelConfig(dim3=3)).eval()
    with torch.no_grad():  # every term nonzero and the three-way one large
        model.id_main.weight.normal_(0.0, 0.3)
        model.id3.weight.mul_(10.0)
    b = BoundModel(model, cat)
    grid = np.stack(np.meshgrid(*[np.arange(len(e)) for e in cat.elements], indexing="ij"), -1)
    grid = grid.reshape(-1, len(cat.elements))
    assert len(grid) == 10**4
    z = b.logit(np.zeros(len(grid), np.int64), grid)
    tri = b.parts(np.zeros(len(grid), np.int64), grid)[3].sum(1)
    assert tri.std() > 0.1  # the three-way term moves the effects
    effects = b.element_effects()
    for k in range(len(cat.elements)):
        want = np.bincount(grid[:, k], z) / np.bincount(grid[:, k])
        np.testing.assert_allclose(effects[k], want - want.mean(), atol=1e-4)


def test_a_bundle_from_before_the_three_way_term_loads_and_scores_the_same(additive):
    world, log, fitted, _ = additive
    from genco.models.reward import RewardModel

    # A model from before the term: the fitted one's other tensors, no id3 / w3 at all.
    model = RewardModel(fitted.vocab, dataclasses.replace(fitted.config, dim3=0))
    three = ("id3.", "w3")
    model.load_state_dict({k: v for k, v in fitted.state_dict().items() if not k.startswith(three)})
    old = {k: v for k, v in model.state_dict().items()}
    assert not any(k.startswith(three) for k in old)
    config = {**dataclasses.asdict(model.config)}
    config.pop("dim3")  # an old bundle's config has no such field
    again = RewardModel(model.vocab, RewardModelConfig(**{**config, "dim3": 4}))
    again.load_state_dict(old)
    assert again.d3 == 4 and not again.id3.weight.any()
    enc = encode(log.iloc[:500], world.catalog)
    a = BoundModel(model, world.catalog).logit(enc.ads, enc.combos)
    b = BoundModel(again, world.catalog).logit(enc.ads, enc.combos)
    np.testing.assert_array_equal(a, b)
    assert RewardModelConfig(**config).dim3 == RewardModelConfig().dim3


def test_learned_effects_correlate_with_the_truth(additive):
    world, _, model, report = additive
    learned = BoundModel(model, world.catalog).element_effects()
    true = world.truth.element_effects()
    per = [spearman(a, b) for a, b in zip(learned, true)]
    assert min(per) > 0.8, per
    assert report.split == "time" and report.val_rows == 6000


def test_cold_start_elements_are_scored_from_features():
    world = make_world(WORLDS["cold_start"], seed=0)
    log = log_impressions(world, 60_000, seed=0)
    model, _ = train_reward_model(world.catalog, log, FAST)
    b = BoundModel(model, world.catalog)
    learned, true = b.element_effects(), world.truth.element_effects()
    cold_l = np.concatenate([e[c] for e, c in zip(learned, world.truth.cold)])
    cold_t = np.concatenate([e[c] for e, c in zip(true, world.truth.cold)])
    assert len(cold_l) >= 9
    # Never logged, yet ranked like the truth through their features alone.
    assert spearman(cold_l, cold_t) > 0.6
    table = element_table(b, encode(log, world.catalog))
    cold_rows = table[table.cold]
    assert (cold_rows.impressions == 0).all() and cold_rows.effect.notna().all()
    # One row per (ad, candidate): every cold element appears, under each ad that offers it.
    cold_ids = {
        (comp, world.catalog.elements[k][e])
        for k, comp in enumerate(world.catalog.components)
        for e in np.flatnonzero(world.truth.cold[k])
        if any(e in world.catalog.candidates[a][k] for a in range(world.catalog.n_ads))
    }
    assert set(zip(cold_rows.component, cold_rows.element_id)) == cold_ids


def test_bundle_round_trip_and_tamper_check(tmp_path, additive):
    world, log, model, _ = additive
    save_reward_model(model, str(tmp_path))
    again, meta = load_reward_model(str(tmp_path))
    enc = encode(log.iloc[:500], world.catalog)
    a = BoundModel(model, world.catalog).logit(enc.ads, enc.combos)
    b = BoundModel(again, world.catalog).logit(enc.ads, enc.combos)
    np.testing.assert_array_equal(a, b)
    assert meta["vocab"]["components"] == list(world.catalog.components)
    weights = tmp_path / "reward_model.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 .* does not match the recorded"):
        load_reward_model(str(tmp_path))
    with pytest.raises(BundleError, match="not a reward model directory"):
        load_reward_model(str(tmp_path / "nope"))


def test_fit_and_attribute_writes_tables_next_to_the_model(tmp_path):
    world = make_world(WORLDS["default"], seed=0)
    log = log_impressions(world, 20_000, seed=0)
    metrics = fit_and_attribute(world.catalog, log, str(tmp_path), FAST)
    assert 0.5 < metrics["test"]["auc"] < 1.0
    per_imp = pd.read_parquet(tmp_path / IMPRESSION_FILE)
    assert len(per_imp) == len(log)
    credits = per_imp[[f"credit_{c}" for c in world.catalog.components]].sum(axis=1)
    np.testing.assert_allclose(credits, per_imp["creative_logit"], atol=1e-5)
    per_el = pd.read_csv(tmp_path / ELEMENT_FILE, dtype={"element_id": str})
    assert len(per_el) == sum(len(c) for per in world.catalog.candidates for c in per)
    assert per_el.impressions.sum() == len(log) * world.catalog.n_components
    shown = per_el[per_el.impressions > 0]
    assert (shown.ci_low < shown.effect).all() and (shown.effect < shown.ci_high).all()
    saved = json.loads((tmp_path / "reward_metrics.json").read_text())
    assert saved["train"]["best_epoch"] >= 1


def test_bad_inputs_give_clear_errors():
    world = make_world(WORLDS["default"], seed=0)
    log = log_impressions(world, 500, seed=0)
    with pytest.raises(ValueError, match="^impressions: no rows to learn from$"):
        train_reward_model(world.catalog, log.iloc[:0])
    with pytest.raises(ValueError, match="^impressions: no clicks at all"):
        train_reward_model(world.catalog, log.assign(click=0))
    with pytest.raises(ValueError, match="^impressions: ad_id 'ad_9999' is not in the catalog$"):
        train_reward_model(world.catalog, log.assign(ad_id="ad_9999"))
    # A model trained on fewer ads refuses to score an ad it never saw.
    from genco.data.contract import Catalog

    small = Catalog.from_frame(world.catalog.to_frame().query("ad_id != 'ad_0019'"))
    model, _ = train_reward_model(small, log[log.ad_id != "ad_0019"], FAST)
    with pytest.raises(ValueError, match="ad_id 'ad_0019' is not known to the reward model"):
        BoundModel(model, world.catalog)
    assert BoundModel(model, world.catalog, allow_unknown_ads=True).ad_map[-1] == small.n_ads


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": 0}, "dim must be > 0, got 0"),
        ({"val_fraction": 1.0}, "val_fraction must be in [0, 1), got 1.0"),
        ({"l2_id": -1.0}, "l2_id must be >= 0, got -1.0"),
        ({"patience": 0}, "patience must be >= 1, got 0"),
    ],
)
def test_config_validates_itself(kwargs, message):
    with pytest.raises(ValueError) as err:
        RewardModelConfig(**kwargs)
    assert str(err.value) == message


def test_cli_attribute(tmp_path):
    run = [sys.executable, "-m", "genco.cli"]
    subprocess.run(
        [*run, "simulate", "--n-impressions", "8000", "--out", str(tmp_path / "w")],
        check=True,
        capture_output=True,
    )
    r = subprocess.run(
        [
            *run,
            "attribute",
            "--catalog",
            str(tmp_path / "w" / "catalog.csv"),
            "--impressions",
            str(tmp_path / "w" / "impressions.csv"),
            "--constraints",
            str(tmp_path / "w" / "constraints.csv"),
            "--out",
            str(tmp_path / "m"),
            "--epochs",
            "3",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["rows_valid"] == 8000 and out["epochs"] <= 3 and 0.5 < out["auc"] < 1
    model, _ = load_reward_model(str(tmp_path / "m"))
    assert model.vocab.components == ("title", "image", "highlight")
