"""The generator folded for one ad (``PolicyTables``: beam, sampling, exploration, exact
log-probabilities) and the ad's legal moves (``AdMasks``); see ``genco.models.tables``."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free


@dataclass(frozen=True)
class AdMasks:
    """Legal moves of one ad in slot space (slot i of component k = ``codes[k][i]``)."""

    codes: list[np.ndarray]  # per component (M_k,) catalog element code per slot, -1 padding
    valid: list[np.ndarray]  # per component (M_k,) bool
    forbid: dict[tuple[int, int], np.ndarray]  # (j, k), j < k: (M_j, M_k) bool
    later: dict[int, list[tuple[int, np.ndarray]]]  # k -> [(l, forbid[(k, l)])]
    _conflicts: list[np.ndarray] = field(default_factory=list, repr=False, compare=False)

    def domain(self, k: int, picks: np.ndarray, upto: int) -> np.ndarray:
        """(B, M_k) slots of component k still allowed by the picks of components < upto."""
        allowed = self.valid[k][None, :]  # broadcasts against (B, M_k) below
        for j in range(min(upto, k)):
            f = self.forbid.get((j, k))
            if f is not None:
                allowed = allowed & ~f[picks[:, j]]
        return allowed

    def mask(self, k: int, picks: np.ndarray) -> np.ndarray:
        """(B, M_k) slots allowed at step k: legal now and leaving every later constrained
        component a choice (forward checking, as ``genco.models.legal.LegalMasks.mask``)."""
        allowed = self.domain(k, picks, k)
        for l_, f in self.later[k]:
            dom = self.domain(l_, picks, k)  # (B or 1, M_l)
            allowed = allowed & (dom[:, None, :] & ~f[None]).any(-1)
        return np.broadcast_to(allowed, (len(picks), allowed.shape[1]))

    def conflicts(self) -> list[np.ndarray]:
        """Per component k, (M_k, sum_l M_l) int8: 1 where slot i of k and slot j of l (column
        block l) form a forbidden pair, in either order. Built once per ad."""
        if not self._conflicts:
            sizes = [len(v) for v in self.valid]
            off = np.cumsum([0, *sizes[:-1]])
            for k in range(len(sizes)):
                rows = np.zeros((sizes[k], sum(sizes)), np.int8)
                for (j, l_), f in self.forbid.items():
                    if j == k:
                        rows[:, off[l_] : off[l_] + sizes[l_]] |= f
                    elif l_ == k:
                        rows[:, off[j] : off[j] + sizes[j]] |= f.T
                self._conflicts.append(rows)
        return self._conflicts

    def legal(self, slots: np.ndarray) -> np.ndarray:
        """(B,) whether each combination (B, K) of slots is real and has no forbidden pair."""
        ok = np.ones(len(slots), bool)
        for k, valid in enumerate(self.valid):
            ok &= valid[slots[:, k]]
        for (j, k), f in self.forbid.items():
            ok &= ~f[slots[:, j], slots[:, k]]
        return ok

    def to_codes(self, slots: np.ndarray) -> np.ndarray:
        """(B, K) slots -> (B, K) catalog element codes."""
        return np.stack([self.codes[k][slots[:, k]] for k in range(len(self.codes))], 1)


@dataclass(frozen=True)
class PolicyTables:
    """The generator folded for one ad (float32)."""

    masks: AdMasks
    init: np.ndarray  # (H,) ad embedding
    ctx_w: np.ndarray | None  # (C, H) context layer over standardised context, or None
    ctx_b: np.ndarray | None  # (H,)
    ctx_mean: np.ndarray
    ctx_std: np.ndarray
    A: list[np.ndarray]  # per component (H, M_k): query layer times candidates / sqrt(H)
    b: list[np.ndarray]  # per component (M_k,)
    gi: list[np.ndarray]  # per component (M_k, 3H): GRU input gates of each candidate
    w_hh: np.ndarray  # (H, 3H)
    b_hh: np.ndarray  # (3H,)

    @property
    def nbytes(self) -> int:
        """Memory held by this ad's tables (the masks included)."""
        arrays = [*self.A, *self.b, *self.gi, *self.masks.codes, *self.masks.forbid.values()]
        return sum(a.nbytes for a in arrays) + 2 * sum(len(c) for c in self.masks.codes) ** 2

    def state0(self, ctx: np.ndarray | None) -> np.ndarray:
        h = self.init
        if self.ctx_w is not None and ctx is not None:
            h = h + ((ctx - self.ctx_mean) / self.ctx_std) @ self.ctx_w + self.ctx_b
        return np.tanh(h)[None, :]

    def step(self, k: int, slot: np.ndarray, state: np.ndarray) -> np.ndarray:
        """GRU cell (torch's gate order r, z, n) on the picked candidates of component k."""
        gi = self.gi[k][slot]
        gh = state @ self.w_hh + self.b_hh
        H = state.shape[1]
        rz = _sigmoid(gi[:, : 2 * H] + gh[:, : 2 * H])
        n = np.tanh(gi[:, 2 * H :] + rz[:, :H] * gh[:, 2 * H :])
        return n + rz[:, H:] * (state - n)  # (1 - z) * n + z * h

    def log_probs(
        self, k: int, state: np.ndarray, allowed: np.ndarray, temperature: float = 1.0
    ) -> np.ndarray:
        """(B, M_k) log-probabilities over component k's slots, -inf where not allowed."""
        logits = state @ self.A[k] + self.b[k]
        if temperature != 1.0:
            logits = logits / np.float32(temperature)
        logits = np.where(allowed, logits, -np.inf)
        top = logits.max(1, keepdims=True)
        shifted = logits - top
        return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))

    def beam(self, ctx: np.ndarray | None, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``width`` distinct legal combinations, best log-probability first.

        Returns slots (W, K) and log-probabilities (W,).
        """
        K = len(self.A)
        state = self.state0(ctx)
        picks = np.zeros((1, K), dtype=np.int64)
        score = np.zeros(1, dtype=np.float32)
        for k in range(K):
            allowed = self.masks.mask(k, picks)
            if not allowed.any(1).all():
                raise ValueError(no_legal_element(k))
            M = allowed.shape[1]
            total = (score[:, None] + self.log_probs(k, state, allowed)).reshape(-1)
            n_ok = int(np.isfinite(total).sum())
            top = np.argsort(-total, kind="stable")[: min(width, n_ok)]
            beam_idx, slot = top // M, top % M
            picks = picks[beam_idx]
            picks[:, k] = slot
            score = total[top]
            if k + 1 < K:
                state = self.step(k, slot, state[beam_idx])
        return picks, score

    def log_prob(
        self, ctx: np.ndarray | None, slots: np.ndarray, temperature: float = 1.0
    ) -> np.ndarray:
        """(B,) the policy's exact log-probability of each combination given as slots (B, K)."""
        K = len(self.A)
        B = len(slots)
        state = np.repeat(self.state0(ctx), B, 0)
        logp = np.zeros(B, dtype=np.float64)
        rows = np.arange(B)
        for k in range(K):
            allowed = self.masks.mask(k, slots)
            logp += self.log_probs(k, state, allowed, temperature)[rows, slots[:, k]]
            if k + 1 < K:
                state = self.step(k, slots[:, k], state)
        return logp

    def uniform(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` exploration draws (slots (n, K)): each component uniform over the slots still
        legal given the earlier picks (forward checking: never a dead end). Without
        constraints this is uniform over the ad's combinations."""
        K = len(self.A)
        picks = np.zeros((n, K), dtype=np.int64)
        for k in range(K):
            allowed = self.masks.mask(k, picks)
            cum = allowed.cumsum(1)
            u = rng.integers(0, cum[:, -1])  # (n,) the u-th allowed slot
            picks[:, k] = (cum <= u[:, None]).sum(1)
        return picks

    def log_uniform(self, slots: np.ndarray) -> np.ndarray:
        """(B,) log-probability of each combination under ``uniform``."""
        logq = np.zeros(len(slots), dtype=np.float64)
        for k in range(len(self.A)):
            logq -= np.log(self.masks.mask(k, slots).sum(1))
        return logq

    def sample(
        self, ctx: np.ndarray | None, n: int, rng: np.random.Generator, temperature: float = 1.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """``n`` independent draws: slots (n, K) and the exact log-propensity of each (n,)."""
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        K = len(self.A)
        state = np.repeat(self.state0(ctx), n, 0)
        picks = np.zeros((n, K), dtype=np.int64)
        logp = np.zeros(n, dtype=np.float64)
        rows = np.arange(n)
        for k in range(K):
            allowed = self.masks.mask(k, picks)
            if not allowed.any(1).all():
                raise ValueError(no_legal_element(k))
            lp = self.log_probs(k, state, allowed, temperature)
            cum = np.exp(lp.astype(np.float64)).cumsum(1)
            u = rng.random(n) * cum[:, -1]
            slot = np.minimum((cum < u[:, None]).sum(1), allowed.shape[1] - 1)
            slot = np.where(allowed[rows, slot], slot, lp.argmax(1))  # u at a float edge
            picks[:, k] = slot
            logp += lp[rows, slot]
            if k + 1 < K:
                state = self.step(k, slot, state)
        return picks, logp


def no_legal_element(k: int) -> str:
    return (
        f"no legal element left for component {k} given the earlier picks: the "
        "constraints leave this ad without a legal completion"
    )
