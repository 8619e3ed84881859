"""Chunked decoding (``genco.inference.chunked``, what ``genco recommend`` runs) gives the
per-ad path's answers (``Predictor.decode``): same combinations in the same order, same
scores, on catalog-world ads with forbidden pairs, contexts and combination residuals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genco.data.contract import Catalog, Constraints
from genco.errors import ConfigError
from genco.inference.chunked import decode_rows
from genco.inference.predictor import Predictor
from genco.models.generator import Generator, GeneratorConfig
from genco.models.reward import BoundModel, RewardModel, RewardModelConfig
from genco.models.tables import REFINES
from genco.models.vocab import Vocab
from genco.worlds.catalog import CatalogWorld, CatalogWorldConfig

CTX = ("ctx_0", "ctx_1")
N_ADS = 24


@pytest.fixture(
    scope="module",
    params=[(12, 0, 0), (6, 0, 0), (12, 4, 0), (6, 0, 3)],
    ids=["same-width", "narrow-title", "feature-tower", "three-way"],
)
def predictor(request) -> Predictor:
    """Untrained models (the arithmetic is under test, not the weights) on catalog-world ads
    with 4 components of 5-12 candidates (so padded slots), a forbidden pair on most ads, a
    context the model reads, and residuals on a third of the ads. ``narrow-title``: at most 6
    titles per ad, so the components' padded widths differ. ``feature-tower``: the reward
    model's nonlinear feature map on (``feature_hidden``), folded like the linear one.
    ``three-way``: the reward model's three-way term on (``dim3``), its vectors scaled up so
    that it moves the scores."""
    titles, hidden, dim3 = request.param
    config = CatalogWorldConfig(
        n_ads=N_ADS,
        n_components=4,
        min_candidates=5,
        max_candidates=12,
        forbid_share=0.8,
        ad_block=N_ADS,
    )
    world = CatalogWorld(config, seed=3)
    blk = world.block(0)
    frame = world.catalog_block(blk)[0].to_pandas()
    kept = frame["element_id"].str[-2:].astype(int) < titles
    frame = frame[kept | (frame["component"] != "title")]
    catalog = Catalog.from_frame(frame)
    pairs = world.constraint_rows(blk).to_pandas()
    known = set(frame["element_id"])
    pairs = pairs[pairs["element_a"].isin(known) & pairs["element_b"].isin(known)]
    cons = Constraints.from_frame(pairs, catalog)
    torch.manual_seed(0)
    vocab = Vocab.from_catalog(catalog, CTX)
    reward = RewardModel(vocab, RewardModelConfig(feature_hidden=hidden, dim3=dim3)).eval()
    assert len(reward.tower) == (4 if hidden else 0)  # the catalog world has features
    with torch.no_grad():  # a context that matters: ctx_w is zero at initialisation
        reward.ctx_w.normal_(0.0, 1.0)
        if dim3:
            reward.id3.weight.mul_(30.0)
    bound = BoundModel(reward, catalog)
    rng = np.random.default_rng(0)
    keys = []
    for a in range(0, N_ADS, 3):  # 40 residual rows on every third ad
        cands = catalog.candidates[a]
        for _ in range(40):
            codes = [int(rng.choice(c)) for c in cands]
            g = [int(bound.elem_map[c + bound.cat_offsets[k]]) for k, c in enumerate(codes)]
            keys.append([int(bound.ad_map[a]), *g])
    keys = np.unique(np.array(keys), axis=0)
    reward.set_residuals(keys, rng.normal(0.0, 2.0, len(keys)).astype(np.float32), 1.0)
    gen = Generator(vocab, GeneratorConfig(beam_width=8)).eval()
    return Predictor(reward, gen, catalog, cons, exact_max=0)


def _rows(predictor: Predictor) -> tuple[np.ndarray, np.ndarray]:
    """Every ad twice, in two contexts, shuffled: (ad codes (2n,), contexts (2n, 2))."""
    rng = np.random.default_rng(1)
    codes = rng.permutation(np.repeat(np.arange(N_ADS), 2))
    return codes, rng.normal(0.0, 1.5, (len(codes), len(CTX))).astype(np.float32)


def test_the_sample_exercises_forbidden_pairs_residuals_and_padding(predictor):
    _, gen = predictor.bound()
    ads_with_pairs = set()
    for f in gen.masks.forbid.values():
        ads_with_pairs |= set(np.flatnonzero(np.diff(f.offsets)).tolist())
    assert len(ads_with_pairs) >= N_ADS // 2
    assert len(predictor.reward.residual_values) > 100
    assert any(not v.all() for valid in gen.masks.valid for v in valid.numpy())  # padding
    assert max(gen.masks.M) == 12 and min(gen.masks.M) in (6, 12)  # as the fixture says
    if len(predictor.reward.tower):  # the tower moves the scores: it is under test too
        bound, _ = predictor.bound()
        combos = np.stack([c[:1].repeat(3) for c in predictor.catalog.candidates[0]], 1)
        with torch.no_grad():
            main = bound.parts(np.zeros(3, np.int64), combos, np.zeros((3, 2)))[1]
        assert np.abs(main).max() > 0  # zero-initialised linear maps: only the tower
    if predictor.reward.d3:  # the three-way term moves the scores: it is under test too
        bound, _ = predictor.bound()
        combos = np.stack([c[:6] for c in predictor.catalog.candidates[1]], 1)
        with torch.no_grad():
            tri = bound.parts(np.ones(6, np.int64), combos, np.zeros((6, 2)))[3]
        assert np.abs(tri.sum(1)).std() > 0.1


@pytest.mark.parametrize("refine", REFINES)
@pytest.mark.parametrize("top_k", [1, 4])
def test_chunked_decoding_is_the_per_ad_decoding(predictor, refine, top_k):
    codes, x = _rows(predictor)
    # A small fold budget: several blocks of ads, an ad's two rows in one block.
    got = decode_rows(predictor, codes, x, top_k, refine, fold_bytes=200_000)
    for i, (ad, ctx) in enumerate(zip(codes, x, strict=True)):
        want = predictor.decode(int(ad), ctx, top_k, refine=refine)
        np.testing.assert_array_equal(got[i][0], want.codes, err_msg=f"row {i}, ad {ad}")
        np.testing.assert_allclose(got[i][1], want.score, rtol=1e-6, err_msg=f"row {i}")


def test_chunked_answers_are_legal_and_exact_decoding_is_kept(predictor):
    codes, x = _rows(predictor)
    _, gen = predictor.bound()
    got = decode_rows(predictor, codes, x, 5, "pairs")
    # Per-ad answers too: residual rows may break a constraint (a residual can predate it).
    per_ad = [predictor.decode(int(ad), c, 5, refine="pairs").codes for ad, c in zip(codes, x)]
    for (combos, score), ad, one in zip(got, codes, per_ad, strict=True):
        assert len(combos) == 5 and np.all(np.diff(score) <= 0)
        combos = np.concatenate([combos, one])
        for (j, k), f in gen.masks.forbid.items():
            lo, hi = f.offsets[ad], f.offsets[ad + 1]
            slots = gen.masks.to_slots(np.full(len(combos), ad), combos).numpy()
            pairs = set(zip(f.sj[lo:hi].tolist(), f.sk[lo:hi].tolist(), strict=True))
            assert not pairs & set(zip(slots[:, j].tolist(), slots[:, k].tolist(), strict=True))
    # Ads small enough for exact decoding keep it: each row is Predictor.decode's answer.
    small = Predictor(
        predictor.reward,
        predictor.generator,
        predictor.catalog,
        predictor.constraints,
        exact_max=3000,
    )
    sizes = [np.prod([len(c) for c in predictor.catalog.candidates[a]]) for a in codes]
    assert 0 < sum(s <= 3000 for s in sizes) < len(sizes)  # a mix of both paths
    mixed = decode_rows(small, codes, x, 2, "pairs")
    for i, ad in enumerate(codes):
        want = small.decode(int(ad), x[i], 2, refine="pairs")
        np.testing.assert_array_equal(mixed[i][0], want.codes)
        np.testing.assert_allclose(mixed[i][1], want.score, rtol=1e-6)


def test_bad_arguments_are_named(predictor):
    codes, x = _rows(predictor)
    with pytest.raises(ConfigError, match="top_k must be in \\[1, 100\\], got 0"):
        decode_rows(predictor, codes, x, 0)
    with pytest.raises(ConfigError, match="refine must be one of pairs, single, none, got 'x'"):
        decode_rows(predictor, codes, x, 1, "x")
