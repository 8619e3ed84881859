"""The combination space of an ad: enumeration and counting of legal combinations, and the
best legal combination under independent per-slot scores."""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

from genco.data.contract import Catalog, Constraints
from genco.errors import ContractError

MAX_ENUMERATE = 5_000_000


def product(candidates: Sequence[np.ndarray]) -> np.ndarray:
    """Cartesian product of per-component code arrays: (prod(len), n_components) int64."""
    sizes = [len(c) for c in candidates]
    total = int(np.prod(sizes, dtype=np.float64))
    if total > MAX_ENUMERATE:
        raise ContractError(
            f"combination space has {total} combinations, over the enumeration limit "
            f"{MAX_ENUMERATE}"
        )
    grids = np.indices(sizes, dtype=np.int64).reshape(len(sizes), -1).T  # (total, K)
    return np.stack([np.asarray(c, np.int64)[grids[:, k]] for k, c in enumerate(candidates)], 1)


def touched_by_constraints(constraints: Constraints, ad: int) -> bool:
    return bool(np.any((constraints.ad < 0) | (constraints.ad == ad)))


def legal_combinations(
    catalog: Catalog,
    constraints: Constraints,
    ad: int,
    candidates: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """All legal combinations of an ad (optionally over a subset of its candidates)."""
    cands = catalog.candidates[ad] if candidates is None else candidates
    combos = product(cands)
    if touched_by_constraints(constraints, ad):
        viol = constraints.violations(np.full(len(combos), ad, np.int64), combos)
        combos = combos[viol < 0]
    return combos


def count_legal(
    catalog: Catalog,
    constraints: Constraints,
    ad: int,
    candidates: Sequence[np.ndarray] | None = None,
) -> int:
    """Number of legal combinations; enumerates only when a constraint can apply to the ad."""
    cands = catalog.candidates[ad] if candidates is None else candidates
    if not touched_by_constraints(constraints, ad):
        return int(np.prod([len(c) for c in cands], dtype=np.float64))
    return len(legal_combinations(catalog, constraints, ad, cands))


def best_legal_by_slots(
    constraints: Constraints,
    ad: int,
    candidates: Sequence[np.ndarray],
    utilities: Sequence[np.ndarray],
) -> np.ndarray:
    """Legal combination with the highest summed per-slot utility.

    ``utilities[k][i]`` scores ``candidates[k][i]`` (higher is better). Slot models score
    components independently and know nothing of forbidden pairs, so the slot-wise best is
    tried first and, when it is illegal, combinations are visited in decreasing order of
    summed utility until one is legal: the exact best legal combination under the slot model,
    not a heuristic repair, and usually found within a handful of steps because a pair
    constraint removes few combinations.
    """
    cands = [np.asarray(c, dtype=np.int64) for c in candidates]
    if len(cands) != len(utilities) or any(
        len(c) != len(u) or len(c) == 0 for c, u in zip(cands, utilities)
    ):
        raise ValueError("each slot needs as many utilities as candidates, and >= 1 candidate")
    order = [np.argsort(-np.asarray(u, dtype=np.float64), kind="stable") for u in utilities]
    sorted_u = [np.asarray(u, dtype=np.float64)[o] for u, o in zip(utilities, order)]
    n_slots = len(cands)
    ad_arr = np.array([ad], dtype=np.int64)

    def combo_of(ranks: tuple[int, ...]) -> np.ndarray:
        return np.array([cands[k][order[k][r]] for k, r in enumerate(ranks)], dtype=np.int64)

    start = (0,) * n_slots
    if not touched_by_constraints(constraints, ad):
        return combo_of(start)
    # A rank vector's only parent is itself with its last raised coordinate lowered, so
    # children raise coordinates at or after that one: every vector is pushed exactly once.
    heap: list[tuple[float, tuple[int, ...], int]] = [
        (-float(sum(u[0] for u in sorted_u)), start, 0)
    ]
    visited = 0
    while heap and visited < MAX_ENUMERATE:
        neg, ranks, last = heapq.heappop(heap)
        visited += 1
        combo = combo_of(ranks)
        if constraints.violations(ad_arr, combo[None, :])[0] < 0:
            return combo
        for j in range(last, n_slots):
            if ranks[j] + 1 < len(cands[j]):
                child = (*ranks[:j], ranks[j] + 1, *ranks[j + 1 :])
                delta = float(sorted_u[j][ranks[j] + 1] - sorted_u[j][ranks[j]])
                heapq.heappush(heap, (neg - delta, child, j))
    raise ValueError(f"ad {ad} has no legal combination among its candidates")
