"""Legal masks index (ad, element) pairs by catalog row, never as a dense ads x elements array."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from genco.data.space import legal_combinations
from genco.models.legal import LegalMasks
from genco.worlds.simulate import WORLDS, make_world


def test_slot_index_grows_with_catalog_rows_and_round_trips():
    # Per-product elements: a dense (ads x elements) map would hold 400 x 1,600 cells per
    # component; the index holds one key per catalog row (400 x 4).
    world = make_world(replace(WORLDS["per_product"], n_ads=400, n_candidates=4), seed=0)
    cat = world.catalog
    masks = LegalMasks(cat, world.constraints)
    for k in range(cat.n_components):
        assert len(masks.slot_of[k].keys) == sum(len(c[k]) for c in cat.candidates)
    for ad in (0, 17, 399):
        legal = legal_combinations(cat, world.constraints, ad)
        slots = masks.to_slots(np.full(len(legal), ad), legal)
        np.testing.assert_array_equal(masks.to_codes(np.full(len(legal), ad), slots), legal)
    other = cat.candidates[1][0][0]  # an element of ad 1, not a candidate of ad 0
    with pytest.raises(ValueError, match="not a candidate of its ad"):
        masks.to_slots(np.array([0]), np.array([[other, *legal[0, 1:]]]))


def test_global_constraints_mark_every_ad_that_offers_both_elements():
    world = make_world(replace(WORLDS["constrained"], n_ads=12), seed=1)
    masks = LegalMasks(world.catalog, world.constraints)
    for ad in range(world.catalog.n_ads):
        legal = legal_combinations(world.catalog, world.constraints, ad)
        ads = np.full(len(legal), ad)
        slots = masks.to_slots(ads, legal).numpy()
        table = masks.for_ad(ad)
        for (j, k), f in table.forbid.items():
            assert not f[slots[:, j], slots[:, k]].any()  # no legal combination is masked
        cons, cands = world.constraints, world.catalog.candidates[ad]
        want = set()
        for c in range(len(cons)):
            j, k = int(cons.comp_a[c]), int(cons.comp_b[c])
            a, b = int(cons.elem_a[c]), int(cons.elem_b[c])
            if (cons.ad[c] < 0 or cons.ad[c] == ad) and a in cands[j] and b in cands[k]:
                want.add(
                    (
                        j,
                        k,
                        int(np.flatnonzero(cands[j] == a)[0]),
                        int(np.flatnonzero(cands[k] == b)[0]),
                    )
                )
        got = {
            (j, k, int(x), int(y))
            for (j, k), f in table.forbid.items()
            for x, y in zip(*np.nonzero(f))
        }
        assert got == want
