"""The canary's triggered A/B (``genco.evaluation.ope.ab_difference`` with ``triggered_*``,
``genco.evaluation.online``): counted only where the two policies serve differently, scaled
by that share; the same quantity as the plain A/B, with less noise."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from genco.errors import ContractError
from genco.evaluation.online import (
    canary_clearly_better,
    canary_clearly_worse,
    canary_gate,
    policies_differ,
)
from genco.evaluation.ope import ab_difference
from genco.inference.predictor import Predictor
from genco.models.generator import Generator, GeneratorConfig
from genco.models.reward import RewardModel, RewardModelConfig
from genco.models.vocab import Vocab
from genco.worlds.simulate import contexts_frame, make_world, world_config


def test_triggered_ab_by_hand():
    # canary: 100 rows, 40 triggered (10 clicks there); production: 400 rows, 160 triggered
    # (16 clicks there); clicks off the triggered rows only move the plain CTRs
    canary = np.r_[np.ones(10), np.zeros(30), np.ones(6), np.zeros(54)]
    tc = np.r_[np.ones(40, bool), np.zeros(60, bool)]
    prod = np.r_[np.ones(16), np.zeros(144), np.ones(24), np.zeros(216)]
    tp = np.r_[np.ones(160, bool), np.zeros(240, bool)]
    ab = ab_difference(canary, prod, 0.95, tc, tp)
    share = 200 / 500
    se = share * np.sqrt(0.25 * 0.75 / 40 + 0.1 * 0.9 / 160)
    assert ab.triggered_share == pytest.approx(share)
    assert ab.value == pytest.approx(share * (0.25 - 0.10)) and ab.se == pytest.approx(se)
    assert ab.lower_bound == pytest.approx(ab.value - 1.6448536 * se, rel=1e-6)
    assert (ab.canary_triggered_ctr, ab.production_triggered_ctr) == (0.25, 0.1)
    assert (ab.canary_triggered_n, ab.production_triggered_n) == (40, 160)
    assert (ab.canary_ctr, ab.production_ctr) == (0.16, 0.1)  # each arm's plain CTR
    with pytest.raises(ContractError, match="give it for both arms or for neither"):
        ab_difference(canary, prod, 0.95, tc, None)
    with pytest.raises(ContractError, match="canary arm: 1 impressions where the two policies"):
        ab_difference(canary, prod, 0.95, np.r_[True, np.zeros(99, bool)], tp)
    with pytest.raises(ContractError, match="triggered: 3 rows for the production arm's 400"):
        ab_difference(canary, prod, 0.95, tc, tp[:3])


def _arms(rng, n, share, trig, base, lift):
    """n requests, a random ``share`` to the canary; the canary's CTR is ``base + lift`` on
    the triggered requests (a ``trig`` share of them), ``base`` elsewhere, as production's."""
    canary = rng.random(n) < share
    triggered = rng.random(n) < trig
    ctr = base + lift * (canary & triggered)
    return canary, triggered, (rng.random(n) < ctr).astype(float)


def test_triggered_estimates_the_same_difference_with_less_noise_and_no_false_promotions():
    plain, trig, promote_plain, promote_trig, false_trig = [], [], 0, 0, 0
    for seed in range(300):
        rng = np.random.default_rng(seed)
        on, t, y = _arms(rng, 50_000, 0.2, 0.3, 0.10, 0.02)  # +0.6% overall: +6% relative
        a = ab_difference(y[on], y[~on], 0.95)
        b = ab_difference(y[on], y[~on], 0.95, t[on], t[~on])
        plain.append(a.value), trig.append(b.value)
        promote_plain += a.lower_bound > 0
        promote_trig += b.lower_bound > 0
        on, t, y = _arms(rng, 50_000, 0.2, 0.3, 0.10, 0.0)  # the same policy
        false_trig += ab_difference(y[on], y[~on], 0.95, t[on], t[~on]).lower_bound > 0
    plain, trig = np.array(plain), np.array(trig)
    assert abs(trig.mean() - 0.006) < 0.0005 and abs(plain.mean() - 0.006) < 0.0005  # unbiased
    assert trig.std() < 0.7 * plain.std()  # sd x sqrt(0.3) = 0.55 in expectation
    assert promote_trig > promote_plain + 60  # about 190 against 110 of 300
    assert false_trig <= 30  # a 5% test: about 15 of 300


def test_canary_gate_triggered_reason_and_too_few_triggered_rows():
    rng = np.random.default_rng(0)
    on, t, y = _arms(rng, 40_000, 0.2, 0.3, 0.10, 0.05)
    version = np.where(on, "c", "p")
    g = canary_gate(version, y, "c", "p", "ab" * 32, triggered=t)
    assert g["passed"] and g["rule"] == "online_ab_triggered"
    assert "of requests where the two serve differently" in g["reason"]
    assert g["online"]["triggered_share"] == pytest.approx(t.mean())
    plain = canary_gate(version, y, "c", "p", "ab" * 32)
    assert plain["rule"] == "online_ab" and plain["online"]["triggered_share"] == 1.0
    assert g["online"]["se"] < plain["online"]["se"]
    alike = canary_gate(version, y, "c", "p", "ab" * 32, triggered=np.zeros(len(y), bool))
    assert not alike["passed"] and alike["rule"] == "online_ab_triggered"
    assert "serve alike on all but 0 canary and 0 production" in alike["reason"]
    every = canary_gate(version, y, "c", "p", "ab" * 32, triggered=np.ones(len(y), bool))
    assert every["rule"] == "online_ab_triggered" and every["online"]["triggered_share"] == 1.0
    assert every["online"]["value"] == pytest.approx(plain["online"]["value"])
    # the mid-round looks: no evidence without triggered rows, the gate's rule otherwise
    assert not canary_clearly_better(y[on], y[~on], 0.0, 0.99, ~t[on] & False, t[~on])
    assert canary_clearly_better(y[on], y[~on], 0.0, 0.99, t[on], t[~on])
    assert not canary_clearly_worse(y[on], y[~on], 0.99, t[on], t[~on])
    assert canary_clearly_worse(y[~on][: on.sum()], y[on], 0.99, t[~on][: on.sum()], t[on]) is (
        canary_clearly_better(y[on], y[~on][: on.sum()], 0.0, 0.99, t[on], t[~on][: on.sum()])
    )


@pytest.fixture(scope="module")
def two():
    """Two untrained bundles on a small contextual world, and its context rows: what is under
    test is where their picks differ."""
    world = make_world(world_config("contextual", n_ads=6), seed=0)
    frame = contexts_frame(world)
    cols = tuple(c for c in frame.columns if c.startswith("ctx_"))
    torch.manual_seed(0)
    vocab = Vocab.from_catalog(world.catalog, cols)
    reward = RewardModel(vocab, RewardModelConfig(seed=0)).eval()
    gen = Generator(vocab, GeneratorConfig()).eval()
    a = Predictor(reward, gen, world.catalog, world.constraints, "a")
    # b: the same model with one of ad 0's unpicked title candidates made irresistible, so
    # it differs on the ads that have that title and on no other
    pick = a.greedy(0, a.context_vector(frame[list(cols)].to_numpy(np.float32)[0]))
    other = next(int(e) for e in world.catalog.candidates[0][0] if e != pick[0])
    boosted = copy.deepcopy(reward)
    with torch.no_grad():
        boosted.id_main.weight[int(boosted.offsets[0]) + other, 0] += 50.0
    b = Predictor(boosted, gen, world.catalog, world.constraints, "b")
    ads = np.array([world.catalog.ad_code(a) for a in frame["ad_id"]])
    return (a, b), np.repeat(ads, 2), np.repeat(frame[list(cols)].to_numpy(np.float32), 2, 0)


def test_policies_differ_is_where_the_greedy_picks_differ(two):
    """A bundle never differs from itself; against another, exactly on the requests whose
    greedy picks (per ad and context) differ."""
    (a, b), ads, ctx = two
    assert not policies_differ(a, a, ads, ctx).any()
    differ = policies_differ(a, b, ads, ctx)
    expect = [
        not np.array_equal(
            a.greedy(int(x), a.context_vector(c)), b.greedy(int(x), b.context_vector(c))
        )
        for x, c in zip(ads, ctx, strict=True)
    ]
    assert differ.tolist() == expect and 0 < differ.sum() < len(ads)
