"""Exact lookup of (ad, combination) rows: the combination residuals' index."""

from __future__ import annotations

import numpy as np


def row_hash(rows: np.ndarray) -> np.ndarray:
    """A 64-bit hash per int64 row (splitmix64 steps over the columns)."""
    h = np.zeros(len(rows), np.uint64)
    with np.errstate(over="ignore"):
        for j in range(rows.shape[1]):
            h = (h ^ rows[:, j].astype(np.uint64)) * np.uint64(0x9E3779B97F4A7C15)
            h ^= h >> np.uint64(31)
    return h


class ResidualIndex:
    """Exact lookup of int64 rows: sorted row hashes, then the rows compared, so a hash
    collision gives no residual rather than a wrong one."""

    def __init__(self, keys: np.ndarray, values: np.ndarray) -> None:
        h = row_hash(keys)
        order = np.argsort(h, kind="stable")
        self.hash, self.keys, self.values = h[order], keys[order], values[order]

    def of_ad(self, ad_index: int) -> tuple[np.ndarray, np.ndarray]:
        if not hasattr(self, "_by_ad"):
            order = np.argsort(self.keys[:, 0], kind="stable")
            self._by_ad = (self.keys[order], self.values[order])
        keys, values = self._by_ad
        lo, hi = np.searchsorted(keys[:, 0], [ad_index, ad_index + 1])
        return keys[lo:hi, 1:], values[lo:hi]

    def lookup(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        h = row_hash(rows)
        at = np.minimum(np.searchsorted(self.hash, h), len(self.hash) - 1)
        hit = (self.hash[at] == h) & np.all(self.keys[at] == rows, axis=1)
        hit = hit.reshape(-1, *([1] * (self.values.ndim - 1)))  # values (R,) or (R, m)
        return np.where(hit, self.values[at], 0.0).astype(np.float32)
