"""The generator and the reward model folded for a chunk of ads at once, and the beam, the
scoring and the local search of ``genco.models.tables`` run over (rows x beams) arrays.

Batch recommendation decodes every ad of a catalog. Folding the models one ad at a time (and
decoding one ad at a time) costs a few hundred small torch and numpy calls per ad; here each
is one call per chunk. Every component keeps the catalog's padded slot axis (``M_k``, the
``LegalMasks`` layout), so the ads of a chunk share one shape; a padded slot is never legal.
A row is one decoding input: an ad (``u``, its index in the chunk) and a context.

The arithmetic is the per-ad tables' (``PolicyTables.beam``, ``RewardTables.credit`` and
``refine``), in the same order, so the answers are the per-ad path's up to float rounding:
beams keep the per-ad order (invalid beams sort last), candidates keep first occurrences,
and the local search makes, per row, the same moves (a row's moves never depend on another's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from genco.models.legal import LegalMasks
from genco.models.policy_tables import no_legal_element
from genco.models.tables import PENALTY, RESIDUAL_CANDIDATES
from genco.models.three_way import e3, others_e2, shares

NEG = np.float32(-np.inf)


@dataclass(frozen=True)
class PolicyFold:
    """The generator folded for U ads (float32), as ``PolicyTables`` with a leading U axis."""

    init: np.ndarray  # (U, H)
    ctx_w: np.ndarray | None  # (C, H)
    ctx_b: np.ndarray | None  # (H,)
    ctx_mean: np.ndarray
    ctx_std: np.ndarray
    A: list[np.ndarray]  # per component (U, H, M_k)
    b: list[np.ndarray]  # per component (U, M_k)
    gi: list[np.ndarray]  # per component but the last (U, M_k, 3H)
    w_hh: np.ndarray  # (H, 3H)
    b_hh: np.ndarray  # (3H,)


@dataclass(frozen=True)
class RewardFold:
    """The reward model folded for U ads, as ``RewardTables`` with a leading U axis."""

    base: np.ndarray  # (U,) float64: bias + appeal
    ctx_w: np.ndarray  # (C,)
    ctx_mean: np.ndarray
    ctx_std: np.ndarray
    main: np.ndarray  # (U, T, 1 + C) float32, T = sum M_k: each slot's main-effect terms
    inter: np.ndarray | None  # (U, T, T) float32 pairwise terms, zero blocks k = l; None: none
    residuals: list | None  # per ad (slots (R, K), values (R,), SDs (R,)) or None; None: none
    tri: np.ndarray | None = None  # (U, T, d3) float32 three-way vectors; None: no such term


@dataclass(frozen=True)
class ChunkMasks:
    """Legal moves of U ads: ``AdMasks`` with a leading U axis. ``forbid[(j, k)]`` holds
    the (M_j, M_k) matrices of the chunk's ads that have a forbidden pair of components j < k
    (few), ``which[(j, k)]`` (U,) each ad's matrix there, -1 for none."""

    codes: list[np.ndarray]  # per component (U, M_k) catalog code per slot, -1 padding
    valid: list[np.ndarray]  # per component (U, M_k) bool
    forbid: dict[tuple[int, int], np.ndarray]  # (j, k), j < k: (U_jk, M_j, M_k) bool
    which: dict[tuple[int, int], np.ndarray]  # (j, k): (U,) index into forbid[(j, k)] or -1

    @staticmethod
    def of(masks: LegalMasks, ads: np.ndarray) -> ChunkMasks:
        forbid, which = {}, {}
        for (j, k), f in masks.forbid.items():
            has = np.flatnonzero(f.offsets[ads + 1] > f.offsets[ads])
            if len(has):
                forbid[(j, k)] = f.dense(ads[has], masks.M[j], masks.M[k])
                which[(j, k)] = np.full(len(ads), -1)
                which[(j, k)][has] = np.arange(len(has))
        return ChunkMasks(
            codes=[s[ads].numpy() for s in masks.slots],
            valid=[v[ads].numpy() for v in masks.valid],
            forbid=forbid,
            which=which,
        )

    def domain(self, k: int, u: np.ndarray, picks: np.ndarray, upto: int) -> np.ndarray:
        """(n, B, M_k) slots of k still allowed by the picks (n, B, K) of components < upto."""
        allowed = np.repeat(self.valid[k][u][:, None, :], picks.shape[1], 1)
        for j in range(min(upto, k)):
            f = self.forbid.get((j, k))
            if f is not None:
                at = self.which[(j, k)][u]
                r = np.flatnonzero(at >= 0)  # rows whose ad forbids a pair here
                allowed[r] &= ~f[at[r][:, None], picks[r, :, j]]
        return allowed

    def mask(self, k: int, u: np.ndarray, picks: np.ndarray) -> np.ndarray:
        """(n, B, M_k) slots allowed at step k, with forward checking (``AdMasks.mask``):
        only the ads with a forbidden pair of k and a later component are checked."""
        allowed = self.domain(k, u, picks, k)
        for (j, l_), f in self.forbid.items():
            if j == k:
                at = self.which[(j, l_)][u]
                r = np.flatnonzero(at >= 0)
                dom = self.domain(l_, u[r], picks[r], k)  # (r, B, M_l)
                allowed[r] &= (dom[:, :, None, :] & ~f[at[r]][:, None]).any(-1)
        return allowed

    def legal(self, u: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """(n, B) whether each combination of slots (n, B, K) is real and has no forbidden pair
        (``AdMasks.legal``)."""
        ok = np.ones(slots.shape[:2], bool)
        for k, valid in enumerate(self.valid):
            ok &= valid[u[:, None], slots[..., k]]
        for (j, k), f in self.forbid.items():
            at = self.which[(j, k)][u]
            r = np.flatnonzero(at >= 0)
            ok[r] &= ~f[at[r][:, None], slots[r, :, j], slots[r, :, k]]
        return ok

    def to_codes(self, u: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """(n, B, K) slots -> (n, B, K) catalog element codes."""
        return np.stack([c[u[:, None], slots[..., k]] for k, c in enumerate(self.codes)], -1)


def _top(total: np.ndarray, width: int) -> np.ndarray:
    """(n, min(width, N)) per row, the indices of the largest entries of ``total`` (n, N),
    largest first and ties in index order: ``np.argsort(-total, kind="stable")[:, :width]``,
    through a partition (rows with ties across the cut take the full sort)."""
    neg = -total
    if width >= neg.shape[1]:
        return np.argsort(neg, axis=1, kind="stable")
    part = np.argpartition(neg, width - 1, axis=1)[:, :width]
    part.sort(axis=1)  # index order, so the stable sort below breaks ties by index
    vals = np.take_along_axis(neg, part, 1)
    out = np.take_along_axis(part, np.argsort(vals, axis=1, kind="stable"), 1)
    cut = vals.max(1, keepdims=True)
    tied = (neg <= cut).sum(1) > width  # entries equal to the cut left out of the partition
    if tied.any():
        out[tied] = np.argsort(neg[tied], axis=1, kind="stable")[:, :width]
    return out


def beam(
    p: PolicyFold, masks: ChunkMasks, u: np.ndarray, ctx: np.ndarray | None, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """``PolicyTables.beam`` for n rows: slots (n, W, K) and whether each beam is one (n, W)
    (a row whose ad has fewer than W legal combinations keeps fewer)."""
    n, K = len(u), len(p.A)
    h = p.init[u]
    if p.ctx_w is not None and ctx is not None:
        h = h + ((ctx - p.ctx_mean) / p.ctx_std) @ p.ctx_w + p.ctx_b
    state = np.tanh(h)[:, None, :]  # (n, B, H)
    picks = np.zeros((n, 1, K), np.int64)
    score = np.zeros((n, 1), np.float32)
    rows = np.arange(n)[:, None]
    for k in range(K):
        allowed = masks.mask(k, u, picks)  # (n, B, M)
        live = np.isfinite(score)
        if not allowed.any(-1)[live].all():
            raise ValueError(no_legal_element(k))
        logits = np.matmul(state, p.A[k][u]) + p.b[k][u][:, None, :]
        with np.errstate(invalid="ignore"):
            logits = np.where(allowed, logits, -np.inf)
            top = logits.max(-1, keepdims=True)
            shifted = logits - top
            lp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        M = allowed.shape[-1]
        total = np.where(live[..., None] & allowed, score[..., None] + lp, NEG).reshape(n, -1)
        top_i = _top(total, width)
        beam_idx, slot = top_i // M, top_i % M
        picks = picks[rows, beam_idx]
        picks[:, :, k] = slot
        score = total[rows, top_i]
        if k + 1 < K:
            s = state[rows, beam_idx]  # (n, W, H)
            gi = p.gi[k][u[:, None], slot]
            gh = s @ p.w_hh + p.b_hh
            H = s.shape[-1]
            # PolicyTables.step's arithmetic, in place (the same values, fewer temporaries)
            rz = gi[..., : 2 * H] + gh[..., : 2 * H]
            rz *= 0.5
            np.tanh(rz, out=rz)
            rz += 1.0
            rz *= 0.5  # sigmoid, overflow-free
            new = rz[..., :H] * gh[..., 2 * H :]
            new += gi[..., 2 * H :]
            np.tanh(new, out=new)
            state = s - new
            state *= rz[..., H:]
            state += new  # (1 - z) * n + z * h
    return picks, np.isfinite(score)


class Scorer:
    """``RewardTables.credit`` and ``refine`` for the ads of a chunk (``RewardFold``)."""

    def __init__(self, r: RewardFold, masks: ChunkMasks) -> None:
        self.r, self.masks = r, masks
        sizes = [c.shape[1] for c in masks.codes]
        self.sizes, self.K, self.T = sizes, len(sizes), sum(sizes)
        self.off = np.cumsum([0, *sizes[:-1]]).astype(np.int64)
        self.stride = np.concatenate([np.cumprod(sizes[::-1])[::-1][1:], [1]]).astype(np.int64)
        self._residuals(r.residuals)
        self._search: tuple | None = None

    def _residuals(self, per_ad: list | None) -> None:
        """Sorted (ad, combination) keys and values, and each ad's top residual rows."""
        U, K = len(self.r.base), self.K
        span = int(np.prod(self.sizes, dtype=np.float64))
        self.res_keys = np.zeros(0, np.int64)
        self.res_values = np.zeros(0, np.float32)
        self.top = np.zeros((U, 0, K), np.int64)  # (U, R, K) the ad's residual candidates
        self.top_ok = np.zeros((U, 0), bool)
        found = [(i, x) for i, x in enumerate(per_ad or []) if x is not None and len(x[0])]
        if not found:
            return
        if span * U >= 2**62:
            raise ValueError("combination keys of this chunk overflow int64: use smaller chunks")
        keys, values, tops = [], [], []
        for i, (slots, vals, _) in found:
            key = slots @ self.stride
            order = np.argsort(key)
            keys.append(i * span + key[order])
            values.append(vals[order])
            best = np.argsort(-vals[order], kind="stable")[:RESIDUAL_CANDIDATES]
            tops.append((i, slots[order][best]))
        order = np.argsort(np.concatenate(keys), kind="stable")
        self.res_keys = np.concatenate(keys)[order]
        self.res_values = np.concatenate(values)[order].astype(np.float32)
        R = max(len(t) for _, t in tops)
        self.top = np.zeros((U, R, K), np.int64)
        self.top_ok = np.zeros((U, R), bool)
        for i, t in tops:
            self.top[i, : len(t)], self.top_ok[i, : len(t)] = t, True
        # Only those legal under the constraints served now (``Predictor.decode``).
        self.top_ok &= self.masks.legal(np.arange(U), self.top)
        self.span = span

    def residual(self, u: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """(n, B) the combination residual of slot rows (n, B, K) (0 where none)."""
        if not len(self.res_keys):
            return np.zeros(slots.shape[:2], np.float32)
        keys = u[:, None] * self.span + slots @ self.stride
        at = np.minimum(np.searchsorted(self.res_keys, keys), len(self.res_keys) - 1)
        hit = self.res_keys[at] == keys
        return np.where(hit, self.res_values[at], 0.0).astype(np.float32)

    def x(self, ctx: np.ndarray | None, n: int) -> np.ndarray:
        """(n, C) standardised contexts (zeros without)."""
        C = len(self.r.ctx_w)
        if ctx is None or C == 0:
            return np.zeros((n, C), np.float32)
        return (ctx - self.r.ctx_mean) / self.r.ctx_std

    def credit(
        self, u: np.ndarray, x: np.ndarray, slots: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(base logit (n,), Shapley credit (n, B, K)) of slot rows (n, B, K)."""
        r = self.r
        base = r.base[u] + (x @ r.ctx_w).astype(np.float64)
        cols = slots + self.off  # (n, B, K)
        m = r.main[u[:, None, None], cols]  # (n, B, K, 1 + C)
        out = m[..., 0] + (m[..., 1:] @ x[:, None, :, None])[..., 0]
        if r.inter is not None:
            pair = r.inter[u[:, None, None, None], cols[..., :, None], cols[..., None, :]]
            out = out + 0.5 * pair.sum(-1)
        if r.tri is not None:
            out = out + shares(r.tri[u[:, None, None], cols])
        if len(self.res_keys):
            out = out + self.residual(u, slots)[..., None] / self.K
        return base, out

    def exhaustive(self, u: np.ndarray, x: np.ndarray, grid: np.ndarray) -> np.ndarray:
        """(n, N) the logit of every combination of ``grid`` (N, K) slots for rows of ads
        ``u`` (n,) in contexts ``x`` (n, C), -inf where it is not legal: exact decoding
        (``RewardTables.exhaustive`` then ``_Exhaustive.logits``), same arithmetic."""
        r = self.r
        cols = grid + self.off  # (N, K)
        m = r.main[u[:, None, None], cols[None]].sum(2, dtype=np.float64)  # (n, N, 1 + C)
        slots = np.broadcast_to(grid, (len(u), *grid.shape))
        static = r.base[u][:, None] + m[..., 0] + self.residual(u, slots)
        if r.inter is not None:
            pair = r.inter[u[:, None, None, None], cols[None, :, :, None], cols[None, :, None, :]]
            static = static + 0.5 * pair.sum((2, 3), dtype=np.float64)
        if r.tri is not None:
            static = static + e3(r.tri[u[:, None, None], cols[None]].astype(np.float64))
        z = static + (x @ r.ctx_w).astype(np.float64)[:, None]
        if x.shape[1]:
            z = z + (m[..., 1:] @ x[:, :, None])[..., 0]
        return np.where(self.masks.legal(u, slots), z, -np.inf)

    def _tables(self) -> tuple:
        """``RewardTables._search_tables`` for every ad of the chunk, float64, forbidden pairs
        and padded rows penalised. The pairwise terms are symmetric (the fold writes block
        (l, k) as block (k, l) transposed), so ``inter`` is kept as (U, T, K, M), entry
        [u, c, k, i] slot i of component k with column c: a row's picks gather whole (K, M)
        blocks. ``both`` (U, P, M, M) each component pair's own block; ``valid`` (U, K, M);
        ``tri`` (U, K, M, d3) the three-way vectors, padding zero (None: no such term)."""
        if self._search is None:
            r, masks, K, T = self.r, self.masks, self.K, self.T
            U, M = len(r.base), max(self.sizes)
            valid = np.zeros((U, K, M), bool)
            for k, size in enumerate(self.sizes):
                valid[:, k, :size] = masks.valid[k]
            if r.inter is not None and all(size == M for size in self.sizes):
                inter = r.inter.astype(np.float64).reshape(U, T, K, M)
            else:
                inter = np.empty((U, T, K, M), np.float64)
                for k, size in enumerate(self.sizes):
                    o = self.off[k]
                    inter[:, :, k, :size] = 0.0 if r.inter is None else r.inter[:, :, o : o + size]
                    inter[:, :, k, size:] = -PENALTY
            for (j, k), f in masks.forbid.items():  # few: set one by one, both orders
                a, i, l_ = np.nonzero(f)
                ad = np.flatnonzero(masks.which[(j, k)] >= 0)[a]
                inter[ad, self.off[k] + l_, j, i] = -PENALTY
                inter[ad, self.off[j] + i, k, l_] = -PENALTY
            pk, pl = np.triu_indices(K, 1)
            both = np.empty((U, len(pk), M, M), np.float64)
            for q, (k, l_) in enumerate(zip(pk, pl, strict=True)):
                o, size = self.off[k], self.sizes[k]
                both[:, q, :size] = inter[:, o : o + size, l_]
                both[:, q, size:] = -PENALTY
            tri = None
            if r.tri is not None:
                tri = np.zeros((U, K, M, r.tri.shape[2]), np.float64)
                for k, size in enumerate(self.sizes):
                    tri[:, k, :size] = r.tri[:, self.off[k] : self.off[k] + size]
            self._search = (valid, inter, pk, pl, both, tri)
        return self._search

    def refine(self, u: np.ndarray, x: np.ndarray, slots: np.ndarray, pairs: bool) -> np.ndarray:
        """``RewardTables.refine`` from each row of ``slots`` (R, K) of ads ``u`` (R,) in
        contexts ``x`` (R, C): per row, the best improving single swap while there is one,
        else (``pairs``) the best improving swap of two components, until no move helps."""
        valid, inter, pk, pl, both, tri = self._tables()
        K, M = valid.shape[1:]
        coef = self.r.main[u].astype(np.float64)  # (R, T, 1 + C)
        own_t = coef[..., 0] + (coef[..., 1:] @ x[:, :, None].astype(np.float64))[..., 0]
        at = np.minimum(self.off[:, None] + np.arange(M)[None, :], self.T - 1)  # (K, M)
        mains = np.where(valid[u], own_t[:, at], -PENALTY)  # (R, K, M)
        s = slots.copy()
        active = np.arange(len(s))
        pair_rows = max(1, 2**21 // max(1, len(pk) * M * M * 8))  # cache-sized blocks
        for _ in range(4 * K * K * M):  # every move raises the logit; at most this many
            if not len(active):
                break
            a, ua = active, u[active]
            cols = s[a] + self.off  # (A, K)
            value = inter[ua[:, None], cols].sum(1) + mains[a]  # (A, K, M)
            if tri is not None:  # u(slot) . e2(the row's other picks), per component
                u3 = tri[ua[:, None], np.arange(K)[None, :], s[a]]  # (A, K, d3)
                t3 = np.einsum("akmd,akd->akm", tri[ua], others_e2(u3))
                value += t3
            now = np.take_along_axis(value, s[a][:, :, None], 2)[..., 0]  # (A, K)
            gain = value.max(-1) - now
            k = gain.argmax(1)
            idx = np.arange(len(a))
            move = gain[idx, k] > 1e-6
            s[a[move], k[move]] = value[idx[move], k[move]].argmax(-1)
            stuck = ~move
            if not pairs or len(pk) == 0:
                active = a[move]
                continue
            keep = [a[move]]
            for lo in range(0, int(stuck.sum()), pair_rows):
                b = np.flatnonzero(stuck)[lo : lo + pair_rows]
                rows, ub, cb = a[b], ua[b], cols[b]
                # Each side's value without the other side's pick, then every joint choice.
                vk = value[b][:, pk] - inter[ub[:, None], cb[:, pl], pk[None, :]]  # (A', P, M)
                vl = value[b][:, pl] - inter[ub[:, None], cb[:, pk], pl[None, :]]
                joint = vk[..., :, None] + vl[..., None, :]  # (A', P, M, M)
                joint += both[ub]
                if tri is not None:
                    joint += _pair_three_way(tri[ub], u3[b], t3[b], pk, pl)
                flat = joint.reshape(len(b), len(pk), M * M)
                best = flat.argmax(-1)  # (A', P)
                at = s[rows][:, pk] * M + s[rows][:, pl]
                g = np.take_along_axis(flat, best[..., None], -1)[..., 0]
                g = g - np.take_along_axis(flat, at[..., None], -1)[..., 0]
                q = g.argmax(1)
                go = g[np.arange(len(b)), q] > 1e-6
                choice = best[np.arange(len(b)), q][go]
                s[rows[go], pk[q[go]]] = choice // M
                s[rows[go], pl[q[go]]] = choice % M
                keep.append(rows[go])
            active = np.sort(np.concatenate(keep))
        return s


def _pair_three_way(
    tri: np.ndarray, u: np.ndarray, t3: np.ndarray, pk: np.ndarray, pl: np.ndarray
) -> np.ndarray:
    """``RewardTables._pair_three_way`` for rows: tri (A, K, M, d3) their ads' vectors, u
    (A, K, d3) their picks', t3 (A, K, M) the single-swap three-way values -> (A, P, M, M)."""
    uk, ul = u[:, pk], u[:, pl]  # (A, P, d3)
    r1 = u.sum(1)[:, None] - uk - ul
    r2 = (u * u).sum(1)[:, None] - uk * uk - ul * ul
    e2r = (r1 * r1 - r2) / 2
    tk, tl = tri[:, pk], tri[:, pl]  # (A, P, M, d3)
    ak = np.einsum("apmd,apd->apm", tk, e2r) - t3[:, pk]
    al = np.einsum("apmd,apd->apm", tl, e2r) - t3[:, pl]
    cross = np.einsum("apid,apd,apjd->apij", tk, r1, tl)
    return cross + ak[..., :, None] + al[..., None, :]


def first_occurrences(slots: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """(n, B) ``ok`` and not a repeat of an earlier ``ok`` row of the same input (``distinct``
    per row of slots (n, B, K))."""
    radix = slots.max((0, 1)) + 1 if slots.size else np.ones(slots.shape[-1], np.int64)
    if np.prod(radix.astype(np.float64)) < 2**62:  # one mixed-radix key per row
        stride = np.concatenate([np.cumprod(radix[::-1])[::-1][1:], [1]]).astype(np.int64)
        key = slots @ stride  # (n, B)
        same = key[:, :, None] == key[:, None, :]  # (n, B, B)
    else:
        same = (slots[:, :, None, :] == slots[:, None, :, :]).all(-1)
    earlier = np.tril(np.ones(same.shape[1:], bool), -1)  # [b, b']: b' < b
    return ok & ~(same & earlier & ok[:, None, :]).any(-1)
