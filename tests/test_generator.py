"""Generator: legal masks, exact probabilities, beam search, RL, predictor, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from genco.data.space import legal_combinations
from genco.inference.predictor import Predictor
from genco.models.generator import BoundGenerator, Generator, GeneratorConfig, train_generator
from genco.models.reward import BoundModel, RewardModelConfig
from genco.models.vocab import Vocab, encode
from genco.training.reward_fit import train_reward_model
from genco.worlds.simulate import WORLDS, log_impressions, make_world

SMALL_CONSTRAINED = replace(
    WORLDS["constrained"], n_ads=6, n_candidates=4, pool_size=6, n_global_forbidden=6
)


@pytest.fixture(scope="module")
def constrained():
    world = make_world(SMALL_CONSTRAINED, seed=0)
    log = log_impressions(world, 30_000, seed=0)
    # The structure alone (no combination residuals): these tests are about policy gradient on
    # a smooth reward; the residuals' bumps are the decoder's business (tests/test_evidence.py).
    reward, _ = train_reward_model(
        world.catalog, log, RewardModelConfig(epochs=5, residual=False, l2_id=1e-5)
    )
    bound = BoundModel(reward, world.catalog)
    gen, report = train_generator(
        bound, world.catalog, world.constraints, config=GeneratorConfig(rl_steps=150)
    )
    return world, log, bound, gen, report


def fresh(world) -> BoundGenerator:
    model = Generator(Vocab.from_catalog(world.catalog, ()), GeneratorConfig())
    return BoundGenerator(model, world.catalog, world.constraints)


def test_probabilities_of_legal_combinations_sum_to_one(constrained):
    world = constrained[0]
    for gen in (fresh(world), BoundGenerator(constrained[3], world.catalog, world.constraints)):
        for ad in range(world.catalog.n_ads):
            legal = legal_combinations(world.catalog, world.constraints, ad)
            slots = gen.masks.to_slots(np.full(len(legal), ad), legal)
            with torch.no_grad():
                p = gen.log_prob(np.full(len(legal), ad), None, slots).sum(1).exp()
            assert float(p.sum()) == pytest.approx(1.0, abs=1e-5)


def test_sampling_never_picks_a_masked_candidate(constrained):
    world = constrained[0]
    gen = fresh(world)
    ads = np.repeat(np.arange(world.catalog.n_ads), 500)
    with torch.no_grad():
        slots, logp, _, _ = gen.sample(ads, generator=torch.Generator().manual_seed(0))
    codes = gen.masks.to_codes(torch.as_tensor(ads), slots)
    assert (world.constraints.violations(ads, codes) < 0).all()
    for k in range(world.catalog.n_components):
        for a in range(world.catalog.n_ads):
            assert np.isin(codes[ads == a, k], world.catalog.candidates[a][k]).all()
    # The returned log-probability is the policy's exact propensity of that combination.
    with torch.no_grad():
        again = gen.log_prob(ads[:50], None, slots[:50]).sum(1)
    np.testing.assert_allclose(again.numpy(), logp[:50].sum(1).numpy(), atol=1e-5)


def test_sample_returns_each_steps_distribution(constrained):
    world = constrained[0]
    gen = fresh(world)
    ads = np.repeat(np.arange(world.catalog.n_ads), 20)
    with torch.no_grad():
        draw = gen.sample(ads, generator=torch.Generator().manual_seed(0))
    assert not hasattr(gen, "last_probs")  # returned, not left on the object
    assert len(draw.step_probs) == world.catalog.n_components
    for k, p in enumerate(draw.step_probs):
        torch.testing.assert_close(p.sum(1), torch.ones(len(ads)))
        chosen = p[torch.arange(len(ads)), draw.slots[:, k]]
        torch.testing.assert_close(chosen, draw.log_probs[:, k].exp())


def test_beam_returns_distinct_legal_combinations_best_first(constrained):
    world, _, _, gen_model, _ = constrained
    gen = BoundGenerator(gen_model, world.catalog, world.constraints)
    for ad in range(world.catalog.n_ads):
        codes, score = gen.beam(ad, width=10)
        assert len(np.unique(codes, axis=0)) == len(codes) == 10
        assert (world.constraints.violations(np.full(len(codes), ad), codes) < 0).all()
        assert np.all(np.diff(score) <= 1e-6)
        legal = legal_combinations(world.catalog, world.constraints, ad)
        slots = gen.masks.to_slots(np.full(len(legal), ad), legal)
        with torch.no_grad():
            lp = gen.log_prob(np.full(len(legal), ad), None, slots).sum(1).numpy()
        # With exact masks the beam's first pick is the policy's most likely combination.
        np.testing.assert_array_equal(codes[0], legal[np.argmax(lp)])


def test_policy_gradient_learns_the_reward_models_best_combinations(constrained):
    world, _, bound, gen_model, report = constrained
    first = np.mean([h["reward"] for h in report.history[:10]])
    last = np.mean([h["reward"] for h in report.history[-10:]])
    assert last > first + 0.3
    gen = BoundGenerator(gen_model, world.catalog, world.constraints)
    hits = 0
    for ad in range(world.catalog.n_ads):
        legal = legal_combinations(world.catalog, world.constraints, ad)
        best = legal[np.argmax(bound.logit(np.full(len(legal), ad), legal))]
        codes, _ = gen.beam(ad, width=4)
        hits += any((c == best).all() for c in codes)
    assert hits >= world.catalog.n_ads - 1


def test_a_training_step_changes_parameters(constrained):
    world, _, bound, _, _ = constrained

    def trained(steps: int) -> dict[str, torch.Tensor]:
        # Same seed both times: only the update itself can tell the two apart.
        config = GeneratorConfig(rl_steps=steps, seed=3)
        return train_generator(bound, world.catalog, world.constraints, config=config)[
            0
        ].state_dict()

    before, again, after = trained(0), trained(0), trained(1)
    assert all(torch.equal(p, again[n]) for n, p in before.items())  # the baseline is exact
    changed = {
        n for n, p in after.items() if p.dtype.is_floating_point and not torch.equal(p, before[n])
    }
    assert {"query.weight", "gru.weight_ih", "elem.weight", "ad.weight"} <= changed


def test_predictor_recommends_and_explains(constrained):
    world, _, bound, gen_model, _ = constrained
    pred = Predictor(bound.model, gen_model, world.catalog, world.constraints, "v1")
    ad_id = world.catalog.ads[0]
    recs = pred.recommend(ad_id, top_k=3, explain=True)
    assert [r.rank for r in recs] == [1, 2, 3]
    assert recs[0].score >= recs[1].score >= recs[2].score
    combos = np.array(
        [
            [
                world.catalog.element_code(k, r.elements[c])
                for k, c in enumerate(world.catalog.components)
            ]
            for r in recs
        ]
    )
    logit = bound.logit(np.zeros(3, np.int64), combos)
    np.testing.assert_allclose([r.score for r in recs], 1 / (1 + np.exp(-logit)), rtol=1e-5)
    base, _ = bound.credit(np.zeros(3, np.int64), combos)
    np.testing.assert_allclose([sum(r.attribution.values()) for r in recs], logit - base, atol=1e-5)
    sampled = pred.recommend(ad_id, top_k=5, mode="sample", seed=1)
    assert all(0 < r.propensity <= 1 for r in sampled)
    with pytest.raises(ValueError, match="top_k must be in \\[1, 100\\], got 0"):
        pred.recommend(ad_id, top_k=0)
    with pytest.raises(ValueError, match="mode must be one of beam, sample, thompson, got 'best'"):
        pred.recommend(ad_id, mode="best")
    with pytest.raises(ValueError, match="refine must be one of pairs, single, none, got 'x'"):
        pred.recommend(ad_id, refine="x")
    with pytest.raises(KeyError, match="ad_id 'nope' is not in the catalog"):
        pred.recommend("nope")


def test_contextual_generator_uses_the_context():
    world = make_world(replace(WORLDS["contextual"], n_ads=8), seed=0)
    log = log_impressions(world, 60_000, seed=0)
    enc = encode(log, world.catalog)
    reward, _ = train_reward_model(world.catalog, enc, RewardModelConfig(epochs=5))
    bound = BoundModel(reward, world.catalog)
    gen_model, _ = train_generator(
        bound, world.catalog, world.constraints, enc.ctx, GeneratorConfig(rl_steps=150)
    )
    gen = BoundGenerator(gen_model, world.catalog, world.constraints)
    differs = sum(
        not np.array_equal(
            gen.beam(a, np.array([0.0, 0.0]))[0][0], gen.beam(a, np.array([1.0, 0.0]))[0][0]
        )
        for a in range(world.catalog.n_ads)
    )
    assert differs >= world.catalog.n_ads // 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"group_size": 1}, "group_size must be >= 2 for a group baseline, got 1"),
        (
            {"credit": "token"},
            "credit must be one of combination, element, counterfactual, got 'token'",
        ),
        ({"rl_steps": -1}, "rl_steps must be >= 0, got -1"),
    ],
)
def test_config_validates_itself(kwargs, message):
    with pytest.raises(ValueError) as err:
        GeneratorConfig(**kwargs)
    assert str(err.value) == message


def test_cli_train_then_recommend(tmp_path):
    run = [sys.executable, "-m", "genco.cli"]
    w = tmp_path / "w"
    subprocess.run(
        [*run, "simulate", "--world", "contextual", "--n-impressions", "20000", "--out", str(w)],
        check=True,
        capture_output=True,
    )
    r = subprocess.run(
        [
            *run,
            "train",
            "--catalog",
            str(w / "catalog.csv"),
            "--impressions",
            str(w / "impressions.csv"),
            "--out",
            str(tmp_path / "m"),
            "--epochs",
            "3",
            "--rl-steps",
            "20",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rows_valid"] == 20000
    r = subprocess.run(
        [
            *run,
            "recommend",
            "--model",
            str(tmp_path / "m"),
            "--contexts",
            str(w / "contexts.csv"),
            "--top-k",
            "2",
            "--out",
            str(tmp_path / "rec.csv"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    rec = pd.read_csv(tmp_path / "rec.csv", dtype=str)
    assert list(rec.columns) == [
        "ad_id",
        "ctx_0",
        "ctx_1",
        "rank",
        "title",
        "image",
        "highlight",
        "score",
    ]
    assert len(rec) == 2 * len(pd.read_csv(w / "contexts.csv"))
    # The beam alone never finds a better top pick than the beam plus the local search.
    args = ["--model", str(tmp_path / "m"), "--contexts", str(w / "contexts.csv")]
    r = subprocess.run(
        [*run, "recommend", *args, "--refine", "none", "--out", str(tmp_path / "beam.csv")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    beam = pd.read_csv(tmp_path / "beam.csv")
    top = pd.read_csv(tmp_path / "rec.csv").query("rank == 1").reset_index(drop=True)
    assert (beam["score"] <= top["score"] + 1e-9).all()
