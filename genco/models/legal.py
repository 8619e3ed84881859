"""Legal-combination masks for step-by-step decoding, as padded tensors.

Each ad's candidates of component k sit in slots ``0..n-1`` of a padded axis of size M_k
(the ad's own row: memory n_ads x max candidates, never ads x catalog). Forbidden pairs are
kept per component pair as ragged per-ad lists of (slot of j, slot of k) (``ForbiddenSlots``:
CSR offsets by ad), and a batch's (B, M_j, M_k) matrices are built only for the ads in it.
While decoding component k, a slot is allowed when it is a real candidate, conflicts with no
earlier pick, and leaves every later constrained component at least one choice (forward
checking), so sampling never walks into a dead end in practice.
"""

from __future__ import annotations

import numpy as np
import torch

from genco.data.contract import Catalog, Constraints
from genco.models.policy_tables import AdMasks


class SlotIndex:
    """Slot of (ad, element) pairs of one component, -1 where the element is not one of the
    ad's candidates: sorted keys ``ad * n_elements + element``, one per catalog row, so memory
    grows with the catalog's rows, never with ads x elements."""

    def __init__(self, catalog: Catalog, k: int) -> None:
        self.n = len(catalog.elements[k])
        ads, elems = catalog.candidates.component(k)  # ad-major, elements sorted per ad
        sizes = catalog.candidates.sizes(k)
        slots = np.arange(len(ads)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        keys = ads * self.n + elems
        order = np.argsort(keys, kind="stable")
        self.keys, self.slots = keys[order], slots[order]

    def lookup(self, ads: np.ndarray, elements: np.ndarray) -> np.ndarray:
        """(B,) slots of elements (B,) for ads (B,); -1 where absent."""
        q = np.asarray(ads, np.int64) * self.n + np.asarray(elements, np.int64)
        at = np.minimum(np.searchsorted(self.keys, q), len(self.keys) - 1)
        return np.where(self.keys[at] == q, self.slots[at], -1)


class ForbiddenSlots:
    """Forbidden (slot of j, slot of k) pairs of one component pair, per ad, ragged: ad a's
    pairs are entries ``offsets[a]..offsets[a + 1] - 1`` of ``sj`` and ``sk``. Memory grows
    with the number of forbidden pairs, never with ads x M_j x M_k."""

    def __init__(self, n_ads: int, ads: np.ndarray, sj: np.ndarray, sk: np.ndarray) -> None:
        order = np.lexsort((sk, sj, ads))
        ads, sj, sk = ads[order], sj[order], sk[order]
        keep = np.ones(len(ads), bool)  # the same pair named twice is one pair
        keep[1:] = (ads[1:] != ads[:-1]) | (sj[1:] != sj[:-1]) | (sk[1:] != sk[:-1])
        ads, self.sj, self.sk = ads[keep], sj[keep].astype(np.int32), sk[keep].astype(np.int32)
        self.offsets = np.zeros(n_ads + 1, np.int64)
        np.cumsum(np.bincount(ads, minlength=n_ads), out=self.offsets[1:])

    @property
    def nbytes(self) -> int:
        return self.offsets.nbytes + self.sj.nbytes + self.sk.nbytes

    def entries(self, ads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row in ads, entry index) of every forbidden pair of the given (B,) ads."""
        start = self.offsets[ads]
        count = self.offsets[ads + 1] - start
        row = np.repeat(np.arange(len(ads)), count)
        first = np.cumsum(count) - count  # where each ad's entries start in the output
        return row, np.arange(len(row)) - np.repeat(first - start, count)

    def dense(self, ads: np.ndarray, m_j: int, m_k: int) -> np.ndarray:
        """(B, M_j, M_k) bool: the given ads' forbidden pairs."""
        out = np.zeros((len(ads), m_j, m_k), bool)
        row, at = self.entries(ads)
        out[row, self.sj[at], self.sk[at]] = True
        return out

    def after(self, ads: np.ndarray, picks_j: np.ndarray, m_k: int) -> np.ndarray:
        """(B, M_k) bool: slots of k that the (B,) picks of j forbid."""
        out = np.zeros((len(ads), m_k), bool)
        row, at = self.entries(ads)
        hit = self.sj[at] == picks_j[row]
        out[row[hit], self.sk[at[hit]]] = True
        return out


class LegalMasks:
    def __init__(self, catalog: Catalog, constraints: Constraints) -> None:
        K = catalog.n_components
        self.K = K
        self.n_ads = catalog.n_ads
        self.M = [int(catalog.candidates.sizes(k).max()) for k in range(K)]
        # slots[k]: (n_ads, M_k) catalog element code in each slot, -1 for padding
        self.slots: list[torch.Tensor] = []
        self.valid: list[torch.Tensor] = []
        for k in range(K):
            sizes = catalog.candidates.sizes(k)
            s = np.full((catalog.n_ads, self.M[k]), -1, dtype=np.int64)
            s[np.arange(self.M[k])[None, :] < sizes[:, None]] = catalog.candidates.component(k)[1]
            self.slots.append(torch.as_tensor(s))
            self.valid.append(torch.as_tensor(s >= 0))
        self.slot_of = [SlotIndex(catalog, k) for k in range(K)]
        self.forbid = self._forbidden(catalog, constraints)
        self.later = {
            k: [(l_, f) for (j, l_), f in self.forbid.items() if j == k] for k in range(K)
        }

    def _forbidden(
        self, catalog: Catalog, constraints: Constraints
    ) -> dict[tuple[int, int], ForbiddenSlots]:
        """Each constraint as (ad, slot, slot) entries for the ads that offer both elements:
        per-ad constraints all at once, constraints for every ad one by one (few)."""
        found: dict[tuple[int, int], list[tuple[np.ndarray, ...]]] = {}
        c = constraints
        all_ads = np.arange(catalog.n_ads)
        jobs = [(i, all_ads) for i in np.flatnonzero(c.ad < 0)]  # (rows of c, their ads)
        per_ad = np.flatnonzero(c.ad >= 0)
        for j, k in set(zip(c.comp_a[per_ad].tolist(), c.comp_b[per_ad].tolist())):
            rows = per_ad[(c.comp_a[per_ad] == j) & (c.comp_b[per_ad] == k)]
            jobs.append((rows, c.ad[rows]))
        for rows, ads in jobs:
            j, k = int(np.atleast_1d(c.comp_a[rows])[0]), int(np.atleast_1d(c.comp_b[rows])[0])
            ea = np.broadcast_to(c.elem_a[rows], ads.shape)
            eb = np.broadcast_to(c.elem_b[rows], ads.shape)
            sj, sk = self.slot_of[j].lookup(ads, ea), self.slot_of[k].lookup(ads, eb)
            hit = (sj >= 0) & (sk >= 0)
            found.setdefault((j, k), []).append((ads[hit], sj[hit], sk[hit]))
        return {
            jk: ForbiddenSlots(catalog.n_ads, *(np.concatenate(p) for p in zip(*parts)))
            for jk, parts in sorted(found.items())
        }

    @property
    def nbytes(self) -> int:
        """Memory held by the masks: padded per-ad slots, their index, forbidden pairs."""
        per_ad = sum(
            s.numel() * s.element_size() + v.numel() for s, v in zip(self.slots, self.valid)
        )
        index = sum(ix.keys.nbytes + ix.slots.nbytes for ix in self.slot_of)
        return per_ad + index + sum(f.nbytes for f in self.forbid.values())

    def domain(self, k: int, ads: torch.Tensor, picks: torch.Tensor, upto: int) -> torch.Tensor:
        """(B, M_k) slots of component k still allowed by the picks of components < upto."""
        allowed = self.valid[k][ads].clone()
        a = np.asarray(ads)
        for j in range(min(upto, k)):
            f = self.forbid.get((j, k))
            if f is not None:
                allowed &= ~torch.as_tensor(f.after(a, np.asarray(picks[:, j]), self.M[k]))
        return allowed

    def mask(self, k: int, ads: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
        """(B, M_k) slots allowed at step k given picks (B, >=k) of earlier components (slots)."""
        allowed = self.domain(k, ads, picks, k)
        for l_, f in self.later[k]:
            dom = self.domain(l_, ads, picks, k)  # (B, M_l) before choosing k
            fk = torch.as_tensor(f.dense(np.asarray(ads), self.M[k], self.M[l_]))  # (B, M_k, M_l)
            left = (dom[:, None, :] & ~fk).any(-1)  # (B, M_k)
            allowed &= left
        return allowed

    def to_slots(self, ads: np.ndarray, combos: np.ndarray) -> torch.Tensor:
        """(B, K) catalog element codes -> (B, K) slots; ValueError if not a candidate."""
        a = np.asarray(ads)
        cols = [self.slot_of[k].lookup(a, combos[:, k]) for k in range(self.K)]
        out = torch.as_tensor(np.stack(cols, 1))
        if (out < 0).any():
            raise ValueError("combination holds an element that is not a candidate of its ad")
        return out

    def to_codes(self, ads: torch.Tensor, slot_picks: torch.Tensor) -> np.ndarray:
        """(B, K) slots -> (B, K) catalog element codes."""
        cols = [self.slots[k][ads, slot_picks[:, k]] for k in range(self.K)]
        return torch.stack(cols, 1).numpy()

    def for_ad(self, ad: int) -> AdMasks:
        """One ad's masks as numpy arrays, for decoding that ad alone; only the component
        pairs where the ad has a forbidden pair."""
        one = np.array([ad])
        forbid = {
            (j, k): f.dense(one, self.M[j], self.M[k])[0]
            for (j, k), f in self.forbid.items()
            if f.offsets[ad + 1] > f.offsets[ad]
        }
        return AdMasks(
            codes=[s[ad].numpy() for s in self.slots],
            valid=[v[ad].numpy() for v in self.valid],
            forbid=forbid,
            later={k: [(l_, forbid[(j, l_)]) for j, l_ in forbid if j == k] for k in range(self.K)},
        )
