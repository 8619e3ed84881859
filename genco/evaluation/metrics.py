"""Plain metric functions on numpy arrays: ranking, calibration, rank correlation."""

from __future__ import annotations

import numpy as np
import pandas as pd


def _check_pair(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 1:
        raise ValueError(f"labels {y.shape} and scores {p.shape} must be 1-D of equal length")
    if len(y) == 0:
        raise ValueError("no rows to score")
    return y, p


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties counted half."""
    y, score = _check_pair(y, score)
    pos = y > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both clicks and non-clicks")
    ranks = pd.Series(score).rank(method="average").to_numpy()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def log_loss(y: np.ndarray, p: np.ndarray, eps: float = 1e-7) -> float:
    y, p = _check_pair(y, p)
    p = np.clip(p, eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def reliability(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> pd.DataFrame:
    """Equal-mass bins of predicted CTR: mean prediction, observed rate and count per bin.

    CTRs crowd a narrow range, so equal-width bins would leave most bins empty.
    """
    y, p = _check_pair(y, p)
    order = np.argsort(p, kind="stable")
    bins = np.array_split(order, min(n_bins, len(p)))
    rows = [(float(p[b].mean()), float(y[b].mean()), len(b)) for b in bins if len(b)]
    return pd.DataFrame(rows, columns=["predicted", "observed", "count"])


def ece(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error over equal-mass bins (count-weighted |observed - predicted|)."""
    r = reliability(y, p, n_bins)
    return float(np.sum(r["count"] * np.abs(r["observed"] - r["predicted"])) / r["count"].sum())


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or len(a) < 2:
        raise ValueError(f"need two equal-length arrays of >= 2 values, got {a.shape}, {b.shape}")
    ra = pd.Series(a).rank().to_numpy()
    rb = pd.Series(b).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])
