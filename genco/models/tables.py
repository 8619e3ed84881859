"""Per-ad numpy tables: the inference hot path of the generator and the reward model.

A request decodes one ad: a handful of products of (beams x 64) by (64 x candidates). In torch
each of those small calls costs more in dispatch than in arithmetic (the profile of one
4 x 10 top-5 request: reward credit 381 us, GRU 348 us, topk 266 us, logits 229 us, masks
142 us). So everything that depends on the ad alone is folded once into small arrays:

- the policy's pointer logits become ``state @ A_k + b_k`` (query layer folded into the
  ad's candidate vectors), the GRU's input half becomes a per-candidate lookup ``gi_k``;
- the reward model's per-element terms become ``main_k[slot]`` (linear in the context), its
  pairwise terms one (M_k, M_l) table per component pair (stored as rows per component) and
  its three-way term each slot's vector u (``genco.models.three_way``);
- the legal masks become the ad's own (M_j, M_k) forbidden matrices.

Decoding and scoring on these tables is exact (same arithmetic, float32), and training keeps
the batched torch path; tests hold the two to the same numbers. On the same tables,
``RewardTables.refine`` searches around the beam's best rows for the reward model's optimum
(swaps of one component, then of two), a few vectorised numpy calls per move.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from genco.models.policy_tables import AdMasks
from genco.models.three_way import e3, others_e2, shares

# How beam results are improved on the reward model before ranking: "pairs" (swaps of one
# component, then of two jointly), "single" (swaps of one component), "none" (beam + re-rank).
REFINES = ("pairs", "single", "none")

# How many of an ad's combinations with the largest residuals join the beam's candidates.
RESIDUAL_CANDIDATES = 64

# A move that breaks a forbidden pair (or picks a padding slot) scores this much lower: far
# below any real logit, and finite when several add up.
PENALTY = 1e9


# Per-ad tables kept in memory by one predictor, for the policy and for the reward model each:
# 4 components x 10 candidates cost ~70 KB per ad in all, 5 x 100 about 5 MB, so the bound is
# in bytes.
MAX_CACHE_BYTES = 256 * 2**20


class TableCache:
    """Least-recently-used per-ad tables, bounded by their total size in bytes (the newest
    entry is always kept, whatever its size). ``hits`` and ``misses`` count lookups (the
    serving metrics report them)."""

    def __init__(self, max_bytes: int = MAX_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[int, tuple[object, int]] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: int):
        hit = self._items.get(key)
        if hit is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return hit[0]

    def put(self, key: int, value: object, nbytes: int) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self.nbytes -= old[1]
        self._items[key] = (value, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes and len(self._items) > 1:
            _, (_, size) = self._items.popitem(last=False)
            self.nbytes -= size

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)


class RewardTables:
    """The reward model folded for one ad (float32), in the ad's slot space.

    main[k]: (M_k, 1 + C) so that main_k(slot, x) = main[k][slot, 0] + main[k][slot, 1:] @ x.
    Pairwise terms: ``inter[k]`` (M_k, sum_l M_l) holds, in column block l, the interaction of
    component k's slots with component l's (zero blocks for l = k and without pairwise
    terms), so the terms of every slot of k with a whole combination are one gather.
    Three-way term: ``tri_flat`` (sum M_k, d3) each slot's vector u, None without.
    """

    def __init__(
        self,
        base: float,
        ctx_w: np.ndarray,
        ctx_mean: np.ndarray,
        ctx_std: np.ndarray,
        main: list[np.ndarray],
        pair: dict[tuple[int, int], np.ndarray],
        residual: tuple[np.ndarray, np.ndarray] | None = None,
        tri: list[np.ndarray] | None = None,
        elem_width: list[np.ndarray] | None = None,
    ) -> None:
        """pair[(k, l)]: (M_k, M_l) for k != l (both orders); empty without pairwise terms.
        residual: the ad's combination residuals as (slots (R, K), logit values (R,),
        posterior SDs (R,), NaN where not known).
        tri: per component (M_k, d3) three-way vectors; None without the term.
        elem_width: per component (M_k,) main-effect widths (posterior draws); None: none."""
        self.elem_width = elem_width
        self.base = base  # bias + appeal (the context part is added per request)
        self.ctx_w, self.ctx_mean, self.ctx_std = ctx_w, ctx_mean, ctx_std  # over standardised x
        self.main = main
        sizes = [len(m) for m in main]
        K, total = len(sizes), sum(sizes)
        self.off = np.cumsum([0, *sizes[:-1]]).astype(np.int64)  # column block of each l
        self.main_flat = np.concatenate(main)  # (sum M_k, 1 + C)
        # All of inter in one flat array, for scoring: entry (k, i, column c) at
        # row_off[k] + i * total + c; ``inter[k]`` are views into it.
        self.row_off = np.cumsum([0, *[m * total for m in sizes[:-1]]]).astype(np.int64)
        self.inter_flat = np.zeros(total * total, np.float32)
        self.inter = [
            self.inter_flat[self.row_off[k] : self.row_off[k] + sizes[k] * total].reshape(
                sizes[k], total
            )
            for k in range(K)
        ]
        for (k, l_), table in pair.items():
            self.inter[k][:, self.off[l_] : self.off[l_] + sizes[l_]] = table
        self.has_pairs = bool(pair)
        self.total = total
        self.tri_flat = None if tri is None else np.concatenate(tri)  # (sum M_k, d3)
        # Combination residuals, looked up by a mixed-radix key over the ad's slots.
        self.stride = np.concatenate([np.cumprod(sizes[::-1])[::-1][1:], [1]]).astype(np.int64)
        self.residual_slots = np.zeros((0, K), np.int64)
        self._res_keys = np.zeros(0, np.int64)
        self._res_values = np.zeros(0, np.float32)
        self._res_width = np.zeros(0, np.float32)
        if residual is not None and len(residual[0]):
            keys = residual[0] @ self.stride
            order = np.argsort(keys)
            self.residual_slots = residual[0][order]
            self._res_keys, self._res_values = keys[order], residual[1][order]
            self._res_width = residual[2][order]
        # The combinations the residuals lift most: candidates next to the beam's.
        top = np.argsort(-self._res_values, kind="stable")[:RESIDUAL_CANDIDATES]
        self.residual_top = self.residual_slots[top]
        self._exhaustive: _Exhaustive | None = None
        # With the float64 search copies ``refine`` builds on first use (inter, both).
        M = max(sizes)
        d3 = 0 if self.tri_flat is None else self.tri_flat.shape[1]
        search = 8 * (K * M * total + K * (K - 1) // 2 * M * M + K * M * (1 + len(ctx_w) + d3))
        self.nbytes = (
            (0 if self.tri_flat is None else self.tri_flat.nbytes)
            + self.main_flat.nbytes
            + self.inter_flat.nbytes
            + search
            + self.residual_slots.nbytes
            + self._res_values.nbytes
            + self._res_width.nbytes
            + self._res_keys.nbytes
        )
        self._search: _Search | None = None

    def residual(self, slots: np.ndarray) -> np.ndarray:
        """(B,) the combination residual of slot rows (0 where the ad has none)."""
        if not len(self._res_keys):
            return np.zeros(len(slots), np.float32)
        keys = slots @ self.stride
        at = np.minimum(np.searchsorted(self._res_keys, keys), len(self._res_keys) - 1)
        return np.where(self._res_keys[at] == keys, self._res_values[at], 0.0).astype(np.float32)

    def residual_width(self, slots: np.ndarray) -> np.ndarray:
        """(B,) the posterior SD of the combination residual of slot rows: NaN where the ad
        has none (never seen, or its SD not known), the prior's width then applies."""
        if not len(self._res_keys):
            return np.full(len(slots), np.nan)
        keys = slots @ self.stride
        at = np.minimum(np.searchsorted(self._res_keys, keys), len(self._res_keys) - 1)
        return np.where(self._res_keys[at] == keys, self._res_width[at], np.nan)

    def exhaustive(self, masks: AdMasks, limit: int) -> _Exhaustive | None:
        """Every legal combination of the ad with its context-free logit, when the ad's space
        has at most ``limit`` combinations before constraints; else None. Built once per ad,
        so a request then costs one (N, C) product: exact decoding of small spaces."""
        if self._exhaustive is None:
            sizes = [int(v.sum()) for v in masks.valid]
            if math.prod(sizes) > limit:
                return None
            rows = np.zeros((1, 0), np.int64)
            for k, valid in enumerate(masks.valid):
                slots = np.flatnonzero(valid)
                rows = np.concatenate(
                    [np.repeat(rows, len(slots), 0), np.tile(slots, len(rows))[:, None]], 1
                )
                ok = np.ones(len(rows), bool)
                for j in range(k):
                    f = masks.forbid.get((j, k))
                    if f is not None:
                        ok &= ~f[rows[:, j], rows[:, k]]
                rows = rows[ok]
            m = self.main_flat[rows + self.off].sum(1, dtype=np.float64)  # (N, 1 + C)
            static = self.base + m[:, 0] + self.residual(rows)
            if self.has_pairs:
                cols = rows + self.off
                at = self.row_off + rows * self.total
                static = static + 0.5 * self.inter_flat[at[:, :, None] + cols[:, None, :]].sum(
                    (1, 2), dtype=np.float64
                )
            if self.tri_flat is not None:
                static = static + e3(self.tri_flat[rows + self.off].astype(np.float64))
            self._exhaustive = _Exhaustive(rows, static, m[:, 1:])
            self.nbytes += rows.nbytes + static.nbytes + m.nbytes
        return self._exhaustive

    def _x(self, ctx: np.ndarray | None) -> np.ndarray:
        C = len(self.ctx_w)
        if ctx is None or C == 0:
            return np.zeros(C, np.float32)
        return (ctx - self.ctx_mean) / self.ctx_std

    def credit(self, slots: np.ndarray, ctx: np.ndarray | None) -> tuple[float, np.ndarray]:
        """(base logit, Shapley credit (B, K)) of combinations given as slots (B, K).

        Credit = main effect + half of each pairwise term + a third of each three-way term +
        1/K of the combination residual, as ``BoundModel.credit``.
        """
        x = self._x(ctx)
        base = self.base + float(x @ self.ctx_w)
        m = self.main_flat[slots + self.off]  # (B, K, 1 + C)
        out = m[..., 0] + m[..., 1:] @ x
        if self.has_pairs:
            cols = slots + self.off  # (B, K): each pick's column
            at = self.row_off + slots * self.total  # (B, K): each pick's row in inter_flat
            out = out + 0.5 * self.inter_flat[at[:, :, None] + cols[:, None, :]].sum(-1)
        if self.tri_flat is not None:
            out = out + shares(self.tri_flat[slots + self.off])
        if len(self._res_keys):
            out = out + self.residual(slots)[:, None] / slots.shape[1]
        return base, out

    def refine(
        self, slots: np.ndarray, ctx: np.ndarray | None, masks: AdMasks, pairs: bool = True
    ) -> tuple[np.ndarray, int]:
        """Local search on the model's logit from each row of ``slots`` (B, K): each round
        makes, per row, the best improving swap of one component for a legal alternative,
        the others fixed; when none is left and ``pairs`` is set, the best improving swap of
        two components jointly (which escapes optima where only a matched pair of changes
        pays). Every move is exact on the tables and raises the logit; it stops when no move
        helps. Returns the improved rows and how many combinations were scored (a round of
        single swaps scores sum(M_k) per row, of pairs sum(M_k M_l))."""
        t = self._search_tables(masks)
        x = self._x(ctx)
        # (K, M) each slot's own terms, padded and illegal slots far below anything real.
        mains = np.where(t.valid, t.main[..., 0] + t.main[..., 1:] @ x, -PENALTY)
        s = slots.copy()
        B, K = s.shape
        rows = np.arange(B)
        comps = np.arange(K)
        scored = 0
        for _ in range(4 * K * t.n_valid):  # every round raises the logit or stops
            cols = s + self.off  # (B, K)
            # value[k, b, i]: slot i of component k with row b's other picks.
            value = t.inter[:, :, cols].sum(-1).transpose(0, 2, 1) + mains[:, None, :]
            if t.tri is not None:  # u(slot i) . e2(row b's other picks), per k
                u = t.tri[comps[None, :], s]  # (B, K, d3)
                tri = np.einsum("kmd,bkd->kbm", t.tri, others_e2(u))
                value = value + tri
            now = value[comps[:, None], rows[None, :], s.T]  # (K, B)
            gain = value.max(-1) - now  # (K, B)
            scored += t.n_valid * B
            k = gain.argmax(0)
            move = gain[k, rows] > 1e-6
            if move.any():
                b = rows[move]
                s[b, k[move]] = value[k[move], b].argmax(-1)
                continue
            if not pairs or len(t.pk) == 0:
                break
            # Each side's value without the other side's pick, then every joint choice.
            vk = value[t.pk] - t.inter[t.pk[:, None, None], t.slot, cols[:, t.pl].T[:, :, None]]
            vl = value[t.pl] - t.inter[t.pl[:, None, None], t.slot, cols[:, t.pk].T[:, :, None]]
            joint = vk[..., :, None] + vl[..., None, :] + t.both[:, None]  # (P, B, M, M)
            if t.tri is not None:
                joint += self._pair_three_way(t, u, tri)
            P, M = len(t.pk), joint.shape[-1]
            flat = joint.reshape(P, B, M * M)
            scored += int(t.pair_size) * B
            best = flat.argmax(-1)  # (P, B)
            at = s[:, t.pk].T * M + s[:, t.pl].T  # (P, B) current joint choice
            gain = np.take_along_axis(flat, best[..., None], -1)[..., 0]
            gain = gain - np.take_along_axis(flat, at[..., None], -1)[..., 0]
            p = gain.argmax(0)
            move = gain[p, rows] > 1e-6
            if not move.any():
                break
            b = rows[move]
            choice = best[p[move], b]
            s[b, t.pk[p[move]]] = choice // M
            s[b, t.pl[p[move]]] = choice % M
        return s, scored

    @staticmethod
    def _pair_three_way(t: _Search, u: np.ndarray, tri: np.ndarray) -> np.ndarray:
        """(P, B, M, M) what the three-way term adds to a joint swap of each pair (k, l)
        beyond ``value``'s single-swap terms: with R row b's picks but k and l, slot i of k
        and j of l take part in u_i . e2(R) + u_j . e2(R) + <u_i, u_j, p1(R)>, where
        ``tri`` (K, B, M) counted u_i . e2(R + the current pick of l) (and likewise j)."""
        uk, ul = u[:, t.pk], u[:, t.pl]  # (B, P, d3) the current picks of k and l
        r1 = u.sum(1)[:, None] - uk - ul  # (B, P, d3) power sums of R
        r2 = (u * u).sum(1)[:, None] - uk * uk - ul * ul
        e2r = (r1 * r1 - r2) / 2
        tk, tl = t.tri[t.pk], t.tri[t.pl]  # (P, M, d3)
        ak = np.einsum("pmd,bpd->pbm", tk, e2r) - tri[t.pk]  # (P, B, M)
        al = np.einsum("pmd,bpd->pbm", tl, e2r) - tri[t.pl]
        both = np.einsum("pid,bpd,pjd->pbij", tk, r1, tl)  # (P, B, M, M)
        return both + ak[..., :, None] + al[..., None, :]

    def _search_tables(self, masks: AdMasks) -> _Search:
        """Padded, penalised copies of the tables for ``refine`` (built once per ad)."""
        if self._search is None:
            K = len(self.main)
            sizes = [len(m) for m in self.main]
            M = max(sizes)
            valid = np.zeros((K, M), bool)
            # float64: a penalty added and taken away again (a pair move frees a slot that
            # clashed with the old pick) must give back the real terms, which float32 at 1e9
            # would round to multiples of 64.
            inter = np.full((K, M, self.total), -PENALTY, np.float64)
            for k, (table, clash) in enumerate(zip(self.inter, masks.conflicts(), strict=True)):
                valid[k, : sizes[k]] = masks.valid[k]
                inter[k, : sizes[k]] = np.where(clash > 0, -PENALTY, table)
            pk, pl = np.triu_indices(K, 1)
            both = np.full((len(pk), M, M), -PENALTY, np.float64)
            for p, (k, l_) in enumerate(zip(pk, pl, strict=True)):
                block = inter[k, :, self.off[l_] : self.off[l_] + sizes[l_]]
                both[p, :, : sizes[l_]] = block
            main = np.zeros((K, M, self.main[0].shape[1]), np.float64)
            for k, m in enumerate(self.main):
                main[k, : sizes[k]] = m
            tri = None  # (K, M, d3), padding zero (padded slots are penalised elsewhere)
            if self.tri_flat is not None:
                tri = np.zeros((K, M, self.tri_flat.shape[1]), np.float64)
                for k in range(K):
                    tri[k, : sizes[k]] = self.tri_flat[self.off[k] : self.off[k] + sizes[k]]
            self._search = _Search(
                valid=valid,
                n_valid=int(valid.sum()),
                main=main,
                inter=inter,
                pk=pk,
                pl=pl,
                both=both,
                slot=np.arange(M)[None, None, :],
                pair_size=sum(sizes[k] * sizes[l_] for k, l_ in zip(pk, pl, strict=True)),
                tri=tri,
            )
        return self._search


@dataclass(frozen=True)
class _Exhaustive:
    slots: np.ndarray  # (N, K) every legal combination of the ad
    static: np.ndarray  # (N,) float64 logit at a zero (standardised) context
    ctx: np.ndarray  # (N, C) coefficients of the standardised context

    def logits(self, tables: RewardTables, ctx: np.ndarray | None) -> np.ndarray:
        x = tables._x(ctx)
        z = self.static + float(x @ tables.ctx_w)
        return z + self.ctx @ x if len(x) else z


@dataclass(frozen=True)
class _Search:
    valid: np.ndarray  # (K, M) real, legal slots
    n_valid: int
    main: np.ndarray  # (K, M, 1 + C) main-effect coefficients, padded
    inter: np.ndarray  # (K, M, sum M_l) pairwise terms; forbidden pairs and padding penalised
    pk: np.ndarray  # (P,) component pairs k < l
    pl: np.ndarray
    both: np.ndarray  # (P, M, M) the pair's own term, penalised where forbidden
    slot: np.ndarray  # (1, 1, M) slot indices, for gathers
    pair_size: int  # sum over pairs of M_k * M_l
    tri: np.ndarray | None  # (K, M, d3) three-way vectors, padded with zeros; None: no term
