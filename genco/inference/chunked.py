"""Beam-mode decoding of many rows at once: what ``Predictor.decode`` answers for each row,
with the models folded for a block of ads in one computation and the beam, scoring and local
search run over (rows x candidates) arrays (``genco.models.chunk_tables``).

Ads small enough for exact decoding (at most ``Predictor.exact_max`` combinations) take
``Predictor.decode``; every other row is decoded here.
"""

from __future__ import annotations

import numpy as np

from genco.errors import ConfigError
from genco.inference.predictor import MAX_TOP_K, Predictor
from genco.models.chunk_tables import ChunkMasks, Scorer, beam, first_occurrences
from genco.models.tables import REFINES

# Bytes of folded tables per block of ads (the policy's and the reward model's, the local
# search's float64 copies): blocks are sized so that a block's tables stay near this.
FOLD_BYTES = 48 * 2**20


def fold_block(sizes: list[int], hidden: int, contexts: int, budget: int = FOLD_BYTES) -> int:
    """Ads per block: ``budget`` bytes over one ad's tables (``sizes``: M_k per component)."""
    K, T, M = len(sizes), sum(sizes), max(sizes)
    policy = 4 * T * (hidden + 3 * hidden + 1)
    reward = 4 * T * (T + 1 + contexts) + T * T
    search = 8 * (K * M * T + K * (K - 1) // 2 * M * M + K * M * (1 + contexts))
    return max(1, budget // (policy + reward + search))


def decode_rows(
    predictor: Predictor,
    codes: np.ndarray,
    x: np.ndarray | None,
    top_k: int,
    refine: str | None = None,
    fold_bytes: int = FOLD_BYTES,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Beam-mode ``Predictor.decode`` of each row (ad code (n,), context (n, C) float32 or
    None): per row, catalog codes (k, K) and scores (k,), best first. The models are folded
    for blocks of ads whose tables take about ``fold_bytes``."""
    if not 1 <= top_k <= MAX_TOP_K:
        raise ConfigError(f"top_k must be in [1, {MAX_TOP_K}], got {top_k}")
    refine = predictor.refine if refine is None else refine
    if refine not in REFINES:
        raise ConfigError(f"refine must be one of {', '.join(REFINES)}, got '{refine}'")
    reward, gen = predictor.bound()
    masks = gen.masks
    out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(codes)
    counts = np.stack([v[codes].sum(1).numpy() for v in masks.valid], 1).astype(np.float64)
    small = np.prod(counts, 1) <= predictor.exact_max
    for i in np.flatnonzero(small):  # exact decoding, one ad at a time
        d = predictor.decode(int(codes[i]), None if x is None else x[i], top_k, refine=refine)
        out[i] = (d.codes, d.score)
    rest = np.flatnonzero(~small)
    rest = rest[np.argsort(codes[rest], kind="stable")]  # grouped by ad
    ads = np.unique(codes[rest])
    m = gen.model
    step = fold_block(masks.M, m.H, m.C, fold_bytes)
    width = max(m.config.beam_width, top_k)
    for lo in range(0, len(ads), step):
        block = ads[lo : lo + step]
        first = np.searchsorted(codes[rest], block[0], side="left")
        rows = rest[first : np.searchsorted(codes[rest], block[-1], side="right")]
        u = np.searchsorted(block, codes[rows])
        cm = ChunkMasks.of(masks, block)
        scorer = Scorer(reward.fold(block, cm.codes), cm)
        ctx = None if x is None else x[rows]
        slots, ok = beam(gen.fold(block), cm, u, ctx, width)
        picks, scores = _rank(scorer, u, ctx, slots, ok, top_k, refine)
        for j, r in enumerate(rows):
            keep = np.isfinite(scores[j])
            out[r] = (cm.to_codes(u[j : j + 1], picks[j : j + 1])[0][keep], scores[j][keep])
    return out  # type: ignore[return-value]


def _rank(
    scorer: Scorer,
    u: np.ndarray,
    ctx: np.ndarray | None,
    slots: np.ndarray,
    ok: np.ndarray,
    top_k: int,
    refine: str,
) -> tuple[np.ndarray, np.ndarray]:
    """The beam's rows, the ad's residual candidates and (``refine``) the local search's
    results, scored and ranked: slots (n, top_k, K) and scores (n, top_k), -inf past the
    row's last candidate (as ``Predictor.decode`` in beam mode)."""
    n = len(u)
    x = scorer.x(ctx, n)
    if scorer.top.shape[1]:  # the ad's best-evidenced combinations compete too
        slots = np.concatenate([slots, scorer.top[u]], 1)
        ok = np.concatenate([ok, scorer.top_ok[u]], 1)
    ok = first_occurrences(slots, ok)
    if refine != "none":
        _, credit = scorer.credit(u, x, slots)
        z = np.where(ok, credit.sum(-1), -np.inf)
        best = np.argsort(-z, axis=1, kind="stable")[:, :top_k]  # (n, top_k)
        start = np.take_along_axis(slots, best[..., None], 1)
        start_ok = np.take_along_axis(ok, best, 1)
        rows = np.repeat(np.arange(n), best.shape[1])
        flat = start.reshape(-1, start.shape[-1])
        better = scorer.refine(u[rows], x[rows], flat, refine == "pairs").reshape(start.shape)
        slots = np.concatenate([slots, better], 1)
        ok = first_occurrences(slots, np.concatenate([ok, start_ok], 1))
    base, credit = scorer.credit(u, x, slots)
    score = 1.0 / (1.0 + np.exp(-(base[:, None] + credit.sum(-1, dtype=np.float64))))
    score = np.where(ok, score, -np.inf)
    order = np.argsort(-score, axis=1, kind="stable")[:, :top_k]
    return np.take_along_axis(slots, order[..., None], 1), np.take_along_axis(score, order, 1)


__all__ = ["FOLD_BYTES", "decode_rows", "fold_block"]
