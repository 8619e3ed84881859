"""Helpers of ``genco.evaluation.evaluate`` against a world's ground truth: the (ad, context)
keys of evaluated rows, true CTRs of combinations, and the logging policy's and the oracle's
true CTR."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from genco.data.contract import Catalog, Constraints
from genco.data.space import legal_combinations
from genco.models.vocab import Encoded

if TYPE_CHECKING:
    from genco.worlds.truth import GroundTruth


def row_keys(enc: Encoded, rows: np.ndarray) -> np.ndarray:
    """One integer per distinct (ad, context) among rows."""
    table = np.column_stack([enc.ads[rows].astype(np.float64), enc.ctx[rows].astype(np.float64)])
    _, inverse = np.unique(table, axis=0, return_inverse=True)
    return inverse.reshape(-1)


def truth_ctx(truth: GroundTruth | None, enc: Encoded) -> np.ndarray | None:
    if truth is None or not truth.n_context:
        return None
    return enc.ctx.astype(np.float64)


def true_ctr(
    truth: GroundTruth,
    catalog: Catalog,
    ads: np.ndarray,
    combos: np.ndarray,
    ctx: np.ndarray | None,
) -> np.ndarray:
    ad_map, elem_maps = truth.aligned(catalog)
    world = np.column_stack([elem_maps[k][combos[:, k]] for k in range(catalog.n_components)])
    return truth.ctr(ad_map[ads], world, ctx)


def truth_baselines(
    truth: GroundTruth,
    catalog: Catalog,
    constraints: Constraints,
    enc: Encoded,
    rows: np.ndarray,
    ctx_all: np.ndarray | None,
) -> dict:
    """True CTR of the logging policy (the logged combinations) and of the oracle (the best
    legal combination for each row), averaged over the evaluated rows."""
    ctx = None if ctx_all is None else ctx_all[rows]
    logging = true_ctr(truth, catalog, enc.ads[rows], enc.combos[rows], ctx)
    keys = row_keys(enc, rows)
    _, first = np.unique(keys, return_index=True)
    best = np.zeros(len(first))
    legal: dict[int, np.ndarray] = {}
    for j, r in enumerate(rows[first]):
        a = int(enc.ads[r])
        if a not in legal:
            legal[a] = legal_combinations(catalog, constraints, a)
        combos = legal[a]
        c = None if ctx_all is None else np.repeat(ctx_all[r][None, :], len(combos), 0)
        best[j] = true_ctr(truth, catalog, np.full(len(combos), a), combos, c).max()
    return {
        "logging_true_ctr": float(logging.mean()),
        "oracle_true_ctr": float(best[keys].mean()),
    }
