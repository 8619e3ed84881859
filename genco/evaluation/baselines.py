"""What a practitioner tries first, on the same encoded log: the yardsticks GenCO must beat.

- ``per_element_scores``: each component's elements ranked by their own smoothed CTR,
  chosen independently ("existing methods");
- ``EmpiricalBest``: the combination with the best observed CTR per (ad, context bucket),
  shrunk toward the ad's CTR by a small prior;
- ``FactorizationMachine``: a plain second-order FM (Rendle 2010) over one-hot ad and element
  ids, every component's element features and the context, trained by BCE.

Each scores the legal combinations of one ad (``scores(ad, combos, ctx)``); picking the best is
the caller's ``argmax``. (Vowpal Wabbit lives in ``genco.evaluation.baselines_vw``.)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from genco.data.contract import Catalog
from genco.models.vocab import Encoded

# Context columns with at most this many distinct values are buckets for the empirical best;
# others (continuous noise, say) are ignored by it.
MAX_BUCKET_VALUES = 8


def per_element_scores(enc: Encoded, catalog: Catalog, prior: float = 30.0) -> list[np.ndarray]:
    """Per component, each element's log smoothed CTR over the whole log: (clicks + 1) /
    (shows + prior)."""
    out = []
    for k in range(catalog.n_components):
        n = len(catalog.elements[k])
        shows = np.bincount(enc.combos[:, k], minlength=n)
        clicks = np.bincount(enc.combos[:, k], weights=enc.click, minlength=n)
        out.append(np.log((clicks + 1) / (shows + prior)))
    return out


def per_element_pick(
    scores: list[np.ndarray], catalog: Catalog, constraints, ad: int, legal: np.ndarray
) -> np.ndarray:
    """The best element of each component on its own; when that combination is illegal, the
    best legal one by summed element scores."""
    pick = np.array(
        [
            catalog.candidates[ad][k][np.argmax(scores[k][catalog.candidates[ad][k]])]
            for k in range(catalog.n_components)
        ]
    )
    if constraints.violations(np.array([ad]), pick[None])[0] < 0:
        return pick
    total = sum(scores[k][legal[:, k]] for k in range(catalog.n_components))
    return legal[np.argmax(total)]


class EmpiricalBest:
    """The combination with the best observed CTR per (ad, context bucket), each shrunk toward
    its bucket's CTR: (clicks + prior * ctr_bucket) / (shows + prior). When no shown
    combination beats the bucket's CTR, an unshown legal one (the bucket's CTR) is as good."""

    def __init__(self, enc: Encoded, prior: float = 20.0) -> None:
        ctx = enc.ctx
        self.bucket_cols = [
            j for j in range(ctx.shape[1]) if len(np.unique(ctx[:100_000, j])) <= MAX_BUCKET_VALUES
        ]
        keys = np.column_stack([enc.ads, *(ctx[:, j] for j in self.bucket_cols), enc.combos])
        uniq, inv = np.unique(keys.astype(np.float64), axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        shows = np.bincount(inv, minlength=len(uniq))
        clicks = np.bincount(inv, weights=enc.click, minlength=len(uniq))
        nb = 1 + len(self.bucket_cols)
        bucket, binv = np.unique(uniq[:, :nb], axis=0, return_inverse=True)
        binv = binv.reshape(-1)
        b_rate = np.bincount(binv, weights=clicks) / np.bincount(binv, weights=shows)
        rate = (clicks + prior * b_rate[binv]) / (shows + prior)
        # Per bucket: its CTR and its best shown combination with that combination's rate.
        best = np.full(len(bucket), -1)
        for i in np.argsort(rate, kind="stable"):
            best[binv[i]] = i  # ascending, so the last write is the best
        # np.unique sorts rows, so each bucket's shown combinations are one block of ``uniq``.
        start = np.searchsorted(binv, np.arange(len(bucket)))
        end = np.searchsorted(binv, np.arange(len(bucket)), side="right")
        self._shown = uniq[:, nb:].astype(np.int64)
        self._best = {
            tuple(b): (
                float(b_rate[j]),
                self._shown[best[j]],
                float(rate[best[j]]),
                (int(start[j]), int(end[j])),
            )
            for j, b in enumerate(bucket.tolist())
        }

    def pick(self, ad: int, ctx: np.ndarray | None, legal: np.ndarray) -> np.ndarray:
        b = (
            (float(ad), *(float(ctx[j]) for j in self.bucket_cols))
            if ctx is not None
            else (float(ad),)
        )
        hit = self._best.get(b)
        if hit is None:
            return legal[0]
        b_rate, combo, rate, (lo, hi) = hit
        if rate >= b_rate:
            return combo
        shown = {tuple(c) for c in self._shown[lo:hi].tolist()}
        return next((c for c in legal if tuple(c.tolist()) not in shown), combo)


@dataclass(frozen=True)
class FMConfig:
    dim: int = field(default=8, metadata={"help": "Factor size."})
    epochs: int = field(default=20, metadata={"help": "Maximum passes over the log."})
    batch_size: int = field(default=4096, metadata={"help": "Impressions per step."})
    lr: float = field(default=0.01, metadata={"help": "Adam learning rate."})
    l2: float = field(default=1e-6, metadata={"help": "L2 on the touched parameters."})
    val_fraction: float = field(default=0.1, metadata={"help": "Latest share held out."})
    patience: int = field(default=2, metadata={"help": "Epochs without improvement to stop."})
    seed: int = field(default=0, metadata={"help": "Seed."})


class _FM(nn.Module):
    """y = w0 + sum_i w_i x_i + sum_{i<j} <v_i, v_j> x_i x_j over the active fields of a row:
    the ad id, K element ids (value 1), K*F element features and C context values."""

    def __init__(self, n_ads: int, n_elements: int, n_dense: int, dim: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w0 = nn.Parameter(torch.zeros(()))
        self.w_id = nn.Embedding(n_ads + n_elements, 1)
        self.v_id = nn.Embedding(n_ads + n_elements, dim)
        self.w_dense = nn.Parameter(torch.zeros(n_dense))
        self.v_dense = nn.Parameter(torch.randn(n_dense, dim, generator=g) * 0.01)
        with torch.no_grad():
            self.w_id.weight.zero_()
            self.v_id.weight.normal_(0.0, 0.01, generator=g)

    def forward(self, ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """ids (B, 1 + K) global id rows; dense (B, D) standardised numeric values."""
        v = torch.cat([self.v_id(ids), dense[..., None] * self.v_dense], 1)  # (B, 1+K+D, d)
        s = v.sum(1)
        pair = 0.5 * (s.pow(2) - v.pow(2).sum(1)).sum(-1)
        return self.w0 + self.w_id(ids).sum((1, 2)) + dense @ self.w_dense + pair


class FactorizationMachine:
    """A plain FM over ids and features, early-stopped on the latest share of the log."""

    def __init__(self, catalog: Catalog, config: FMConfig | None = None) -> None:
        self.catalog = catalog
        self.config = config or FMConfig()
        sizes = [len(e) for e in catalog.elements]
        self.offsets = catalog.n_ads + np.cumsum([0, *sizes[:-1]])
        F = len(catalog.feature_names)
        feats = [np.asarray(f, np.float32).reshape(len(f), F) for f in catalog.features]
        self.feats = [
            (f - f.mean(0)) / np.maximum(f.std(0), 1e-6) if F else f for f in feats
        ]  # per component (n_k, F)
        self.model: _FM | None = None

    def _rows(self, ads: np.ndarray, combos: np.ndarray, ctx: np.ndarray):
        ids = np.column_stack([ads, combos + self.offsets[None, :]])
        parts = [self.feats[k][combos[:, k]] for k in range(combos.shape[1])]
        x = (ctx - self.ctx_mean) / self.ctx_std
        dense = np.concatenate([*parts, x], 1).astype(np.float32)
        return torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(dense)

    def fit(self, enc: Encoded) -> FactorizationMachine:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        n = len(enc)
        order = (
            np.argsort(enc.timestamp, kind="stable")
            if enc.timestamp is not None
            else (np.random.default_rng(cfg.seed).permutation(n))
        )
        n_val = round(cfg.val_fraction * n)
        tr, va = order[: n - n_val], order[n - n_val :]
        self.ctx_mean = enc.ctx[tr].mean(0) if enc.ctx.shape[1] else np.zeros(0, np.float32)
        self.ctx_std = (
            np.maximum(enc.ctx[tr].std(0), 1e-6) if enc.ctx.shape[1] else np.ones(0, np.float32)
        )
        n_el = sum(len(e) for e in self.catalog.elements)
        D = self.catalog.n_components * len(self.catalog.feature_names) + enc.ctx.shape[1]
        model = _FM(self.catalog.n_ads, n_el, D, cfg.dim, cfg.seed)
        rate = float(enc.click[tr].mean())
        with torch.no_grad():
            model.w0.fill_(float(np.log(rate / (1 - rate))))
        ids, dense = self._rows(enc.ads, enc.combos, enc.ctx)
        y = torch.as_tensor(enc.click)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        bce = nn.BCEWithLogitsLoss()
        g = torch.Generator().manual_seed(cfg.seed)
        tr_t, va_t = torch.as_tensor(tr), torch.as_tensor(va)
        best, best_loss, bad = None, float("inf"), 0
        for _ in range(cfg.epochs):
            perm = tr_t[torch.randperm(len(tr_t), generator=g)]
            for s in range(0, len(perm), cfg.batch_size):
                b = perm[s : s + cfg.batch_size]
                loss = bce(model(ids[b], dense[b]), y[b])
                if cfg.l2:
                    loss = loss + cfg.l2 * (
                        model.v_id(ids[b]).pow(2).sum() + model.w_id(ids[b]).pow(2).sum()
                    ) / len(b)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if not len(va):
                best = copy.deepcopy(model.state_dict())
                continue
            with torch.no_grad():
                val = float(bce(model(ids[va_t], dense[va_t]), y[va_t]))
            if val < best_loss - 1e-6:
                best, best_loss, bad = copy.deepcopy(model.state_dict()), val, 0
            else:
                bad += 1
                if bad >= cfg.patience:
                    break
        model.load_state_dict(best)
        model.eval()
        self.model = model
        return self

    @torch.no_grad()
    def scores(self, ad: int, combos: np.ndarray, ctx: np.ndarray | None) -> np.ndarray:
        """Logits of the given combinations of one ad (higher is better)."""
        if self.model is None:
            raise RuntimeError("FactorizationMachine.scores before fit")
        C = len(self.ctx_mean)
        x = (
            np.zeros((len(combos), C), np.float32)
            if ctx is None or C == 0
            else np.tile(np.asarray(ctx, np.float32), (len(combos), 1))
        )
        ids, dense = self._rows(np.full(len(combos), ad), combos, x)
        return self.model(ids, dense).numpy()
