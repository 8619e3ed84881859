"""Beam-mode decoding of many rows at once: what ``Predictor.decode`` answers for each row,
with the models folded for a block of ads in one computation and the beam, scoring and local
search run over (rows x candidates) arrays (``genco.models.chunk_tables``).

Ads small enough for exact decoding (at most ``Predictor.exact_max`` combinations) are
decoded exactly, every legal combination scored, as ``Predictor.decode`` does.
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


def fold_block(
    sizes: list[int],
    hidden: int,
    contexts: int,
    budget: int = FOLD_BYTES,
    rows: int = 0,
    three: int = 0,
) -> int:
    """Ads per block: ``budget`` bytes over one ad's tables (``sizes``: M_k per component;
    ``hidden``: the generator's, 0 when it is not folded; ``three``: the reward model's
    three-way vector size) and, with ``rows`` combinations scored exactly per ad, their
    gathered terms."""
    K, T, M = len(sizes), sum(sizes), max(sizes)
    policy = 4 * T * (hidden + 3 * hidden + 1)
    reward = 4 * T * (T + 1 + contexts + three) + T * T
    search = 8 * (K * M * T + K * (K - 1) // 2 * M * M + K * M * (1 + contexts + three))
    exact = 8 * rows * K * (K + 2 + contexts + three)
    return max(1, budget // (policy + reward + (0 if rows else search) + exact))


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
    masks, m = gen.masks, gen.model
    out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(codes)
    counts = np.stack([v[codes].sum(1).numpy() for v in masks.valid], 1)  # (n, K)
    small = np.prod(counts.astype(np.float64), 1) <= predictor.exact_max
    # Small spaces are decoded exactly (every legal combination scored), grouped by their
    # candidate counts so that a group shares one grid of combinations.
    sizes, group = np.unique(counts[small], axis=0, return_inverse=True)
    for g, size in enumerate(sizes):
        grid = np.stack(np.meshgrid(*map(np.arange, size), indexing="ij"), -1).reshape(
            -1, len(size)
        )
        step = fold_block(masks.M, 0, m.C, fold_bytes, rows=len(grid), three=reward.model.d3)
        rows = np.flatnonzero(small)[group.reshape(-1) == g]
        for block, at, u in _blocks(codes, rows, step):
            cm = ChunkMasks.of(masks, block)
            scorer = Scorer(reward.fold(block, cm.codes), cm)
            z = scorer.exhaustive(u, scorer.x(None if x is None else x[at], len(at)), grid)
            top = np.argsort(-z, axis=1, kind="stable")[:, :top_k]
            z = np.take_along_axis(z, top, 1)
            for j, r in enumerate(at):
                keep = np.isfinite(z[j])
                if not keep.any():  # no legal combination: the per-ad path says why
                    predictor.decode(int(codes[r]), None if x is None else x[r], top_k)
                picks = cm.to_codes(u[j : j + 1], grid[None, top[j]])[0]
                out[r] = (picks[keep], 1.0 / (1.0 + np.exp(-z[j][keep])))
    step = fold_block(masks.M, m.H, m.C, fold_bytes, three=reward.model.d3)
    width = max(m.config.beam_width, top_k)
    for block, rows, u in _blocks(codes, np.flatnonzero(~small), step):
        cm = ChunkMasks.of(masks, block)
        scorer = Scorer(reward.fold(block, cm.codes), cm)
        ctx = None if x is None else x[rows]
        slots, ok = beam(gen.fold(block), cm, u, ctx, width)
        picks, scores = _rank(scorer, u, ctx, slots, ok, top_k, refine)
        for j, r in enumerate(rows):
            keep = np.isfinite(scores[j])
            out[r] = (cm.to_codes(u[j : j + 1], picks[j : j + 1])[0][keep], scores[j][keep])
    return out  # type: ignore[return-value]


def _blocks(codes: np.ndarray, rows: np.ndarray, step: int):
    """Blocks of at most ``step`` ads among the rows' ads: (ads (U,), their rows, each row's
    ad as an index into the block)."""
    rows = rows[np.argsort(codes[rows], kind="stable")]  # grouped by ad, input order within
    ads = np.unique(codes[rows])
    for lo in range(0, len(ads), step):
        block = ads[lo : lo + step]
        first = np.searchsorted(codes[rows], block[0], side="left")
        at = rows[first : np.searchsorted(codes[rows], block[-1], side="right")]
        yield block, at, np.searchsorted(block, codes[at])


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
