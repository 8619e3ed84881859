"""The reward model's three-way term, for torch tensors and numpy arrays alike.

Each element of a combination has a vector u (size d3); the term is, over every triple of
components k < l < m, sum_d u_k,d u_l,d u_m,d: per d, the third elementary symmetric
polynomial of the K values, e3 = (p1^3 - 3 p1 p2 + 2 p3) / 6 from the power sums p_j =
sum_k u_k^j (a higher-order factorization machine, Blondel et al. 2016), so all triples
cost O(K d3). Its Shapley split gives each element a third of every triple it is in:
share_k = u_k . e2(the others) / 3, with e2 = (p1^2 - p2) / 2 of the other K - 1 vectors.

Only arithmetic, ``.sum`` and indexing are used, so the same functions serve the training
forward (torch), the per-ad tables and the chunked fold (numpy).
"""

from __future__ import annotations


def e3(u):
    """u (..., K, d3) -> (...): the sum over component triples of <u_k, u_l, u_m>."""
    p1, p2, p3 = u.sum(-2), (u * u).sum(-2), (u * u * u).sum(-2)
    return ((p1 * p1 * p1 - 3.0 * p1 * p2 + 2.0 * p3) / 6.0).sum(-1)


def others_e2(u):
    """u (..., K, d3) -> (..., K, d3): per k, e2 of the other K - 1 vectors (elementwise)."""
    o1 = u.sum(-2)[..., None, :] - u
    o2 = (u * u).sum(-2)[..., None, :] - u * u
    return (o1 * o1 - o2) / 2.0


def shares(u):
    """u (..., K, d3) -> (..., K): each element's Shapley share of the three-way terms (a
    third of each triple it is in); they sum over K to ``e3(u)``."""
    return (u * others_e2(u)).sum(-1) / 3.0
