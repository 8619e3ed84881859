"""The closed loop's peers and traffic: legal choices, exact bookkeeping, learning."""

from __future__ import annotations

import numpy as np
import pytest

from genco.evaluation.bandits import ElementThompson, UniformPeer
from genco.evaluation.bandits_vw import VWOnline
from genco.worlds.traffic import load_traffic


@pytest.fixture(scope="module")
def traffic():
    return load_traffic("constrained", 0)  # 12 forbidden pairs: legality matters


def _legal(t, ads, combos) -> bool:
    return bool(np.all(t.constraints.violations(ads, combos) < 0))


def test_oracle_is_the_best_legal_combination(traffic):
    t = traffic
    ads, ctx = t.requests(200, np.random.default_rng(0))
    best, ctr = t.oracle(ads, ctx)
    assert _legal(t, ads, best)
    for a in np.unique(ads)[:5]:
        legal = t.legal[a]
        assert ctr[ads == a][0] == pytest.approx(t.ctr(np.full(len(legal), a), legal, None).max())


def test_uniform_is_uniform_over_legal_with_exact_propensity(traffic):
    t = traffic
    ads = np.zeros(30_000, np.int64)
    combos, prop = UniformPeer(t.legal).choose(ads, None, np.random.default_rng(1))
    assert _legal(t, ads, combos) and np.all(prop == 1 / len(t.legal[0]))
    _, counts = np.unique(combos, axis=0, return_counts=True)
    assert len(counts) == len(t.legal[0])


def test_thompson_counts_every_impression_once_and_stays_legal(traffic):
    t = traffic
    ts = ElementThompson(t.catalog, t.constraints, t.legal)
    rng = np.random.default_rng(2)
    ads, ctx = t.requests(5000, rng)
    combos, _ = ts.choose(ads, ctx, rng)
    assert _legal(t, ads, combos)
    clicks = (rng.random(5000) < t.ctr(ads, combos, ctx)).astype(float)
    ts.update(ads, ctx, combos, clicks, None)
    for k in range(t.catalog.n_components):
        # each impression adds 1 to alpha (click) or beta (no click) of its shown element
        assert ts.alpha[k].sum() + ts.beta[k].sum() - 2 * ts.alpha[k].size == 5000
        assert ts.alpha[k].sum() - ts.alpha[k].size == clicks.sum()


def test_thompson_and_vw_learn_on_the_same_requests(traffic):
    t = load_traffic("default", 0)
    rng = np.random.default_rng(3)
    peers = [ElementThompson(t.catalog, t.constraints, t.legal), VWOnline(t.catalog, t.legal, 0)]
    first, last = {}, {}
    for r in range(8):
        ads, ctx = t.requests(3000, rng)
        u = rng.random(3000)
        for p in peers:
            combos, prop = p.choose(ads, ctx, rng)
            assert _legal(t, ads, combos)
            if p.name.startswith("vw"):
                assert np.all((prop > 0) & (prop <= 1))
            ctr = t.ctr(ads, combos, ctx)
            p.update(ads, ctx, combos, (u < ctr).astype(float), prop)
            (first if r == 0 else last)[p.name] = ctr.mean()
    peers[1].close()
    for name in first:
        assert last[name] > first[name] * 1.3, name
