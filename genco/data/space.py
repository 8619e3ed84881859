"""The combination space of an ad: enumeration and counting of legal combinations."""

from __future__ import annotations

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
