"""Per-ad numpy tables (genco.models.tables) against the batched torch models they fold."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from genco.data.space import legal_combinations
from genco.inference.candidates import distinct
from genco.models.generator import BoundGenerator, Generator, GeneratorConfig
from genco.models.reward import BoundModel, RewardModelConfig
from genco.models.tables import TableCache
from genco.models.vocab import Vocab, encode, fit_scalers
from genco.training.reward_fit import train_reward_model
from genco.worlds.simulate import WORLDS, log_impressions, make_world

# Context, features and forbidden pairs: every part of the tables is exercised.
WORLD = replace(WORLDS["contextual"], n_ads=5, n_candidates=5, pool_size=8, n_global_forbidden=8)
CONTEXTS = [np.array([0.0, 0.0], np.float32), np.array([1.0, -0.5], np.float32)]


@pytest.fixture(scope="module")
def models():
    world = make_world(WORLD, seed=1)
    enc = encode(log_impressions(world, 20_000, seed=1), world.catalog)
    reward, _ = train_reward_model(world.catalog, enc, RewardModelConfig(epochs=2))
    bound = BoundModel(reward, world.catalog)
    vocab = Vocab.from_catalog(world.catalog, reward.vocab.context_columns)
    gen_model = Generator(vocab, GeneratorConfig())
    fit_scalers(gen_model, world.catalog, enc.ctx)
    with torch.no_grad():  # a peaked, context-dependent policy rather than a near-uniform one
        gen_model.elem.weight.mul_(20.0)
        gen_model.ctx.weight.mul_(5.0)
    gen = BoundGenerator(gen_model, world.catalog, world.constraints)
    assert len(world.constraints) > 0 and enc.ctx.shape[1] == 2
    return world, bound, gen


@pytest.fixture(scope="module", params=["pairwise", "three-way"])
def rewards(request, models):
    """The reward model as fitted (pairwise), or with a three-way term whose vectors are
    scaled up after a short fit so that it moves every score (a wrong table fails)."""
    world, bound, gen = models
    if request.param == "pairwise":
        return world, bound, gen
    enc = encode(log_impressions(world, 20_000, seed=1), world.catalog)
    reward, _ = train_reward_model(
        world.catalog, enc, RewardModelConfig(epochs=2, dim3=3, val_fraction=0.0)
    )
    with torch.no_grad():
        reward.id3.weight.mul_(20.0)
        reward.w3.mul_(3.0)
    bound = BoundModel(reward, world.catalog)
    legal = legal_combinations(world.catalog, world.constraints, 0)
    tri = bound.parts(np.zeros(len(legal), np.int64), legal, None)[3]
    assert np.abs(tri.sum(1)).std() > 0.1  # the three-way term matters
    return world, bound, gen


def legal_slots(world, gen, ad):
    legal = legal_combinations(world.catalog, world.constraints, ad)
    return legal, gen.masks.to_slots(np.full(len(legal), ad), legal)


def torch_logp(gen, ad, x, slots) -> np.ndarray:
    with torch.no_grad():
        return gen.log_prob(np.full(len(slots), ad), np.tile(x, (len(slots), 1)), slots).sum(1)


def test_reward_tables_give_the_models_credit(rewards):
    world, bound, gen = rewards
    for ad in range(world.catalog.n_ads):
        tables = bound.tables(ad, gen.tables(ad).masks.codes)
        legal, slots = legal_slots(world, gen, ad)
        for x in CONTEXTS:
            base, credit = bound.credit(np.full(len(legal), ad), legal, np.tile(x, (len(legal), 1)))
            t_base, t_credit = tables.credit(slots.numpy(), x)
            np.testing.assert_allclose(t_base, base, atol=1e-5)
            np.testing.assert_allclose(t_credit, credit, atol=1e-5)
            assert np.abs(credit).max() > 0.01  # the comparison is not between zeros
            np.testing.assert_allclose(
                base + credit.sum(1),
                bound.logit(np.full(len(legal), ad), legal, np.tile(x, (len(legal), 1))),
                atol=1e-5,
            )


def test_exhaustive_tables_score_every_combination_as_the_model(rewards):
    world, bound, gen = rewards
    for ad in range(world.catalog.n_ads):
        policy = gen.tables(ad)
        tables = bound.tables(ad, policy.masks.codes)
        exact = tables.exhaustive(policy.masks, limit=10**6)
        codes = policy.masks.to_codes(exact.slots)
        want = {tuple(c) for c in legal_combinations(world.catalog, world.constraints, ad)}
        assert {tuple(c) for c in codes} == want
        for x in CONTEXTS:
            z = bound.logit(np.full(len(codes), ad), codes, np.tile(x, (len(codes), 1)))
            np.testing.assert_allclose(exact.logits(tables, x), z, atol=1e-4)


def test_beam_on_tables_is_the_policys_exact_ranking(models):
    world, _, gen = models
    for ad in range(world.catalog.n_ads):
        legal, slots = legal_slots(world, gen, ad)
        for x in CONTEXTS:
            lp = torch_logp(gen, ad, x, slots).numpy()
            # Wider than the space: every legal combination, in the policy's order.
            codes, score = gen.beam(ad, x, width=len(legal) + 7)
            assert len(codes) == len(legal)
            order = np.argsort(-lp, kind="stable")
            np.testing.assert_allclose(score, lp[order], atol=1e-4)
            assert {tuple(c) for c in codes} == {tuple(c) for c in legal}
            assert np.exp(lp).sum() == pytest.approx(1.0, abs=1e-4)
            # Narrow (pruned, so not necessarily the global top 3): distinct legal
            # combinations, best first, each scored with its exact log-probability.
            top, top_score = gen.beam(ad, x, width=3)
            assert len({tuple(c) for c in top}) == 3
            assert np.all(np.diff(top_score) <= 0)
            top_slots = gen.masks.to_slots(np.full(3, ad), top)
            np.testing.assert_allclose(top_score, torch_logp(gen, ad, x, top_slots), atol=1e-4)
    # The context changes the answer somewhere, so the context path is live.
    firsts = {ad: [tuple(gen.beam(ad, x, 1)[0][0]) for x in CONTEXTS] for ad in range(5)}
    assert any(a != b for a, b in firsts.values())


def test_sampling_on_tables_draws_legal_combinations_with_exact_propensities(models):
    world, _, gen = models
    ad, x = 2, CONTEXTS[1]
    tables = gen.tables(ad)
    slots, logp = tables.sample(x, 20_000, np.random.default_rng(0))
    codes = tables.masks.to_codes(slots)
    assert (world.constraints.violations(np.full(len(codes), ad), codes) < 0).all()
    exact = torch_logp(gen, ad, x, torch.as_tensor(slots[:200])).numpy()
    np.testing.assert_allclose(logp[:200], exact, atol=1e-4)
    # Frequencies follow those probabilities.
    legal, lslots = legal_slots(world, gen, ad)
    p = np.exp(torch_logp(gen, ad, x, lslots).numpy())
    index = {tuple(s): i for i, s in enumerate(lslots.numpy())}
    freq = np.bincount([index[tuple(s)] for s in slots], minlength=len(legal)) / len(slots)
    assert np.abs(freq - p).max() < 4 * np.sqrt(p.max() / len(slots)) + 1e-3
    # Same seed, same draws; a cold temperature concentrates on the most likely combination.
    once, _ = tables.sample(x, 50, np.random.default_rng(7))
    again, _ = tables.sample(x, 50, np.random.default_rng(7))
    np.testing.assert_array_equal(again, once)
    cold, _ = tables.sample(x, 50, np.random.default_rng(1), temperature=1e-3)
    assert (cold == lslots.numpy()[np.argmax(p)]).all()
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        tables.sample(x, 1, np.random.default_rng(0), temperature=0)


def test_tables_follow_training_updates(models):
    _, _, gen = models
    before = gen.tables(0)
    assert gen.tables(0) is before  # cached while frozen
    gen.candidate_vectors()  # grad enabled: what training does each step
    after = gen.tables(0)
    assert after is not before
    np.testing.assert_allclose(after.A[0], before.A[0])  # same weights, same numbers


@pytest.mark.parametrize("pairs", [False, True], ids=["single", "pairs"])
def test_refine_reaches_a_legal_local_optimum_of_the_reward_model(rewards, pairs):
    world, bound, gen = rewards
    rng = np.random.default_rng(0)
    K = world.catalog.n_components
    moved = 0
    for ad in range(world.catalog.n_ads):
        policy = gen.tables(ad)
        tables = bound.tables(ad, policy.masks.codes)
        for x in CONTEXTS:
            start, _ = policy.sample(x, 6, rng)  # arbitrary legal starting points
            done, scored = tables.refine(start, x, policy.masks, pairs=pairs)
            assert scored >= 6 * sum(len(c) for c in policy.masks.codes)  # >= one sweep
            codes = policy.masks.to_codes(done)
            n = len(codes)
            assert (world.constraints.violations(np.full(n, ad), codes) < 0).all()
            X = np.tile(x, (n, 1))

            # The search climbs the structure (main, pairwise, three-way terms); the residuals of
            # logged combinations are weighed when the candidates are ranked.
            ads = np.full(n, ad)

            def structure(c, X=X, ads=ads):
                return bound.logit(ads, c, X) - bound.residual(ads, c)

            before = structure(policy.masks.to_codes(start))
            after = structure(codes)
            assert np.all(after >= before - 1e-5)
            moved += int((after > before + 1e-4).sum())
            # No legal swap of one component (or, with pairs, of two) improves any row.
            cands = world.catalog.candidates[ad]
            moves = [((k,), (e,)) for k in range(K) for e in cands[k]]
            if pairs:
                moves += [
                    ((k, l_), (e, f))
                    for k in range(K)
                    for l_ in range(k + 1, K)
                    for e in cands[k]
                    for f in cands[l_]
                ]
            for comps, elems in moves:
                swapped = codes.copy()
                swapped[:, list(comps)] = elems
                legal = world.constraints.violations(np.full(n, ad), swapped) < 0
                value = structure(swapped)
                assert np.all(value[legal] <= after[legal] + 1e-5)
    assert moved >= 10  # random starts do climb (60 starts in all)


def test_distinct_keeps_first_occurrences_in_order():
    rows = np.array([[2, 1], [0, 3], [2, 1], [1, 0], [0, 3]])
    kept, first = distinct(rows)
    np.testing.assert_array_equal(kept, [[2, 1], [0, 3], [1, 0]])
    np.testing.assert_array_equal(first, [0, 1, 3])
    wide = np.array([[999] * 10, [1] * 10, [999] * 10])  # 1000**10 overflows an int64 key
    kept, first = distinct(wide)
    np.testing.assert_array_equal(first, [0, 1])


def test_table_cache_is_bounded_in_bytes_and_keeps_the_recently_used():
    cache = TableCache(max_bytes=100)
    for ad in range(3):
        cache.put(ad, f"t{ad}", 40)
    assert len(cache) == 2 and cache.get(0) is None  # 120 bytes > 100: the oldest went
    assert cache.get(1) == "t1"  # now the most recent
    cache.put(3, "t3", 40)
    assert cache.get(2) is None and cache.get(1) == "t1" and cache.nbytes == 80
    cache.put(4, "huge", 1000)  # bigger than the bound: kept alone
    assert len(cache) == 1 and cache.get(4) == "huge"
