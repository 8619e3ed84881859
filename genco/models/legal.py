"""Legal-combination masks for step-by-step decoding, as padded tensors.

Each ad's candidates of component k sit in slots ``0..n-1`` of a padded axis of size M_k.
Forbidden pairs become per-ad boolean matrices ``F[(j, k)][ad]`` of shape (M_j, M_k) for the
component pairs that have any. While decoding component k, a slot is allowed when it is a
real candidate, conflicts with no earlier pick, and leaves every later constrained component
at least one choice (forward checking), so sampling never walks into a dead end in practice.
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
        per_ad = [catalog.candidates[a][k] for a in range(catalog.n_ads)]
        keys = np.concatenate([a * self.n + np.asarray(c, np.int64) for a, c in enumerate(per_ad)])
        slots = np.concatenate([np.arange(len(c)) for c in per_ad])
        order = np.argsort(keys, kind="stable")
        self.keys, self.slots = keys[order], slots[order]

    def lookup(self, ads: np.ndarray, elements: np.ndarray) -> np.ndarray:
        """(B,) slots of elements (B,) for ads (B,); -1 where absent."""
        q = np.asarray(ads, np.int64) * self.n + np.asarray(elements, np.int64)
        at = np.minimum(np.searchsorted(self.keys, q), len(self.keys) - 1)
        return np.where(self.keys[at] == q, self.slots[at], -1)


class LegalMasks:
    def __init__(self, catalog: Catalog, constraints: Constraints) -> None:
        K = catalog.n_components
        self.K = K
        self.n_ads = catalog.n_ads
        self.M = [max(len(c[k]) for c in catalog.candidates) for k in range(K)]
        # slots[k]: (n_ads, M_k) catalog element code in each slot, -1 for padding
        self.slots: list[torch.Tensor] = []
        self.valid: list[torch.Tensor] = []
        for k in range(K):
            s = np.full((catalog.n_ads, self.M[k]), -1, dtype=np.int64)
            for a in range(catalog.n_ads):
                c = catalog.candidates[a][k]
                s[a, : len(c)] = c
            self.slots.append(torch.as_tensor(s))
            self.valid.append(torch.as_tensor(s >= 0))
        self.slot_of = [SlotIndex(catalog, k) for k in range(K)]
        self.forbid: dict[tuple[int, int], torch.Tensor] = {}
        all_ads = np.arange(catalog.n_ads)
        for i in range(len(constraints)):
            j, k = int(constraints.comp_a[i]), int(constraints.comp_b[i])
            ads = all_ads if constraints.ad[i] < 0 else np.array([int(constraints.ad[i])])
            if (j, k) not in self.forbid:
                self.forbid[(j, k)] = torch.zeros(
                    catalog.n_ads, self.M[j], self.M[k], dtype=torch.bool
                )
            sj = self.slot_of[j].lookup(ads, np.full(len(ads), constraints.elem_a[i]))
            sk = self.slot_of[k].lookup(ads, np.full(len(ads), constraints.elem_b[i]))
            hit = (sj >= 0) & (sk >= 0)
            self.forbid[(j, k)][ads[hit], sj[hit], sk[hit]] = True
        self.later = {
            k: [(l_, f) for (j, l_), f in self.forbid.items() if j == k] for k in range(K)
        }

    def domain(self, k: int, ads: torch.Tensor, picks: torch.Tensor, upto: int) -> torch.Tensor:
        """(B, M_k) slots of component k still allowed by the picks of components < upto."""
        allowed = self.valid[k][ads].clone()
        for j in range(min(upto, k)):
            f = self.forbid.get((j, k))
            if f is not None:
                allowed &= ~f[ads, picks[:, j]]
        return allowed

    def mask(self, k: int, ads: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
        """(B, M_k) slots allowed at step k given picks (B, >=k) of earlier components (slots)."""
        allowed = self.domain(k, ads, picks, k)
        for l_, f in self.later[k]:
            dom = self.domain(l_, ads, picks, k)  # (B, M_l) before choosing k
            fk = f[ads]  # (B, M_k, M_l): slot of k forbids slot of l
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
        """One ad's masks as numpy arrays, for decoding that ad alone."""
        forbid = {jk: f[ad].numpy() for jk, f in self.forbid.items()}
        return AdMasks(
            codes=[s[ad].numpy() for s in self.slots],
            valid=[v[ad].numpy() for v in self.valid],
            forbid=forbid,
            later={k: [(l_, forbid[(j, l_)]) for j, l_ in forbid if j == k] for k in range(self.K)},
        )
