"""Multi-instance reward model: a shown combination is a bag whose instances are its elements.

    logit = bias + appeal(ad) + w_ctx . x                       # product/context appeal
          + sum_k  main_k(e_k, x)                               # per-element score, linear in x
          + sum_{k<l} < v(e_k -> l), v(e_l -> k) >              # field-aware pairwise interaction

Every element representation is an id part plus a projection of the catalog's ``feat_*``
features, so an element never seen in the log (cold start) is scored from its features alone.
The appeal term soaks up how popular the product is, so element credit is not confounded by
which product happened to be shown.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch
from torch import nn

from genco.data.contract import Catalog
from genco.models.tables import RewardTables
from genco.models.vocab import (
    Encoded,
    Vocab,
    check_catalog,
    encode,
    fit_scalers,
    register_vocab_buffers,
)


@dataclass(frozen=True)
class RewardModelConfig:
    dim: int = field(default=8, metadata={"help": "Size of each field-aware interaction vector."})
    use_appeal: bool = field(
        default=True, metadata={"help": "Per-ad appeal term (keeps popularity out of credit)."}
    )
    use_interactions: bool = field(default=True, metadata={"help": "Pairwise terms on/off."})
    epochs: int = field(default=30, metadata={"help": "Maximum passes over the training log."})
    batch_size: int = field(default=4096, metadata={"help": "Impressions per gradient step."})
    lr: float = field(default=0.01, metadata={"help": "Adam learning rate."})
    l2_id: float = field(
        default=0.0,
        metadata={
            "help": "L2 on id embeddings (pulls rare elements to their feature prediction); "
            "0 = chosen on the held-out slice from L2_ID_GRID."
        },
    )
    l2_dense: float = field(default=1e-6, metadata={"help": "L2 on feature projections."})
    val_fraction: float = field(
        default=0.1, metadata={"help": "Held-out share: the latest impressions, or random."}
    )
    patience: int = field(
        default=3,
        metadata={"help": "Epochs without improvement to stop; each one halves the step size."},
    )
    propensity_weighting: bool = field(
        default=False, metadata={"help": "Weight impressions by 1/propensity (mean 1)."}
    )
    max_weight: float = field(default=20.0, metadata={"help": "Clip of normalised weights."})
    init_scale: float = field(default=0.05, metadata={"help": "SD of initial interaction vectors."})
    feature_hidden: int = field(
        default=0,
        metadata={
            "help": "Hidden units of each component's feature tower (element features to "
            "main-effect coefficients and interaction vectors, beside the linear map); "
            "0 = linear only."
        },
    )
    residual: bool = field(
        default=True,
        metadata={
            "help": "Per (ad, combination) residual on top of the structure, shrunk by its own "
            "traffic (empirical Bayes): the observed CTR where traffic is plenty, the "
            "structure where it is thin."
        },
    )
    residual_sd: float = field(
        default=0.0,
        metadata={
            "help": "Prior SD of the residuals on the logit; 0 = chosen on the held-out slice "
            "from RESIDUAL_SD_GRID."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for init, split and shuffling."})

    def __post_init__(self) -> None:
        positive = ("dim", "epochs", "batch_size", "lr", "max_weight", "init_scale")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("l2_id", "l2_dense", "residual_sd", "feature_hidden"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")


class RewardModel(nn.Module):
    """The click model over the training vocabulary (plus one zero "unknown" row per table).

    Element indices are global: component k's element e is ``offsets[k] + e``; the last
    index is the unknown element whose id embeddings stay zero (features only).
    """

    def __init__(self, vocab: Vocab, config: RewardModelConfig) -> None:
        super().__init__()
        self.vocab, self.config = vocab, config
        K, F, C = register_vocab_buffers(self, vocab)
        d = config.dim
        self.register_buffer("seen", torch.zeros(self.n_elements + 1, dtype=torch.bool))
        # Combination residuals: rows (ad index, global element index per component) and
        # their shrunk logit offsets; sized by the data, so loading resizes them.
        self.register_buffer("residual_keys", torch.zeros(0, 1 + K, dtype=torch.long))
        self.register_buffer("residual_values", torch.zeros(0))
        self.register_buffer("residual_sd", torch.zeros(()))
        self._residual_index: ResidualIndex | None = None
        self.bias = nn.Parameter(torch.zeros(()))
        self.appeal = nn.Embedding(len(vocab.ads) + 1, 1, padding_idx=len(vocab.ads))
        self.ctx_w = nn.Parameter(torch.zeros(C))
        # main_k(e, x) = <coef(e), [1, x]>; coef = id part + feature projection
        self.id_main = nn.Embedding(self.n_elements + 1, 1 + C, padding_idx=self.n_elements)
        self.w_main = nn.Parameter(torch.zeros(K, max(F, 1), 1 + C))
        self.id_ffm = nn.Embedding(self.n_elements + 1, K * d, padding_idx=self.n_elements)
        self.w_ffm = nn.Parameter(torch.zeros(K, max(F, 1), K * d))
        # Nonlinear part of the feature map, one small tower per component.
        H = config.feature_hidden if F else 0
        self.tower = nn.ModuleList(
            nn.Sequential(nn.Linear(F, H), nn.Tanh(), nn.Linear(H, 1 + C + K * d))
            for _ in range(K if H else 0)
        )
        g = torch.Generator().manual_seed(config.seed)
        with torch.no_grad():
            nn.init.zeros_(self.appeal.weight)
            nn.init.zeros_(self.id_main.weight)
            self.id_ffm.weight.normal_(0.0, config.init_scale, generator=g)
            self.id_ffm.weight[self.n_elements].zero_()
            self.w_ffm.normal_(0.0, config.init_scale / math.sqrt(max(F, 1)), generator=g)
            for t in self.tower:
                t[0].weight.normal_(0.0, 1.0 / math.sqrt(F), generator=g)
                t[0].bias.normal_(0.0, 0.5, generator=g)
                t[2].weight.normal_(0.0, config.init_scale / math.sqrt(H), generator=g)
                t[2].bias.zero_()
        self.K, self.F, self.C, self.d = K, F, C, d

    def parts(
        self, ad: torch.Tensor, elem: torch.Tensor, feats: torch.Tensor, ctx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logit decomposition.

        ad (B,) ad index (len(ads) = unknown); elem (B, K) global element index;
        feats (B, K, F) raw element features; ctx (B, C) raw context.
        Returns base (B,), main (B, K), inter (B, K, K) symmetric with zero diagonal.
        """
        B, K = elem.shape
        x = (ctx - self.ctx_mean) / self.ctx_std  # (B, C)
        f = (feats - self.feat_mean) / self.feat_std if self.F else feats.new_zeros(B, K, 1)
        base = self.bias + x @ self.ctx_w
        if self.config.use_appeal:
            base = base + self.appeal(ad)[:, 0]
        feat_main, feat_ffm = self.feature_terms(f)
        coef = self.id_main(elem) + feat_main  # (B, K, 1+C)
        main = coef[..., 0] + (coef[..., 1:] * x[:, None, :]).sum(-1)  # (B, K)
        if not self.config.use_interactions:
            return base, main, main.new_zeros(B, K, K)
        v = self.id_ffm(elem) + feat_ffm  # (B, K, K*d)
        v = v.view(B, K, K, self.d)  # v[b, k, l]: element of field k facing field l
        inter = (v * v.transpose(1, 2)).sum(-1)  # (B, K, K)
        inter = inter * (1 - torch.eye(K, dtype=inter.dtype))
        return base, main, inter

    def feature_terms(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised features f (B, K, F) -> what they add to each element's main-effect
        coefficients (B, K, 1 + C) and interaction vectors (B, K, K * d)."""
        main = torch.einsum("bkf,kfc->bkc", f, self.w_main)
        ffm = torch.einsum("bkf,kfm->bkm", f, self.w_ffm)
        if len(self.tower):
            out = torch.stack([t(f[:, k]) for k, t in enumerate(self.tower)], 1)
            main, ffm = main + out[..., : 1 + self.C], ffm + out[..., 1 + self.C :]
        return main, ffm

    def forward(self, ad, elem, feats, ctx) -> torch.Tensor:
        """The structural logit (no combination residual): what gradient training fits."""
        base, main, inter = self.parts(ad, elem, feats, ctx)
        return base + main.sum(1) + inter.sum((1, 2)) / 2

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name in ("residual_keys", "residual_values", "residual_sd"):
            saved = state_dict.get(prefix + name)
            if saved is None:  # a bundle from before residuals existed: none
                state_dict[prefix + name] = getattr(self, name)
            elif name != "residual_sd":  # the residual table's size comes from the data
                setattr(self, name, torch.empty_like(saved))
        self._residual_index = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_residuals(self, keys: np.ndarray, values: np.ndarray, sd: float) -> None:
        """keys (R, 1 + K) int64 (ad index, global element indices); values (R,) logits."""
        self.residual_keys = torch.as_tensor(keys, dtype=torch.long)
        self.residual_values = torch.as_tensor(values, dtype=torch.float32)
        self.residual_sd.fill_(float(sd))
        self._residual_index = None

    def residual(self, keys: np.ndarray) -> np.ndarray:
        """(B,) residual logit of rows (B, 1 + K) (ad index, global element indices); 0 where
        the combination has none."""
        if len(self.residual_values) == 0:
            return np.zeros(len(keys), np.float32)
        if self._residual_index is None:
            self._residual_index = ResidualIndex(
                self.residual_keys.numpy(), self.residual_values.numpy()
            )
        return self._residual_index.lookup(keys)

    def residuals_of_ad(self, ad_index: int) -> tuple[np.ndarray, np.ndarray]:
        """The residual rows (R_a, K) global element indices, and values, of one ad."""
        if len(self.residual_values) == 0:
            return np.zeros((0, self.K), np.int64), np.zeros(0, np.float32)
        if self._residual_index is None:
            self._residual_index = ResidualIndex(
                self.residual_keys.numpy(), self.residual_values.numpy()
            )
        return self._residual_index.of_ad(ad_index)


def _row_hash(rows: np.ndarray) -> np.ndarray:
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
        h = _row_hash(keys)
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
        h = _row_hash(rows)
        at = np.minimum(np.searchsorted(self.hash, h), len(self.hash) - 1)
        hit = (self.hash[at] == h) & np.all(self.keys[at] == rows, axis=1)
        return np.where(hit, self.values[at], 0.0).astype(np.float32)


class BoundModel:
    """A reward model bound to a catalog: scores and explains catalog-coded combinations.

    Catalog elements unknown to the model map to the zero "unknown" row (features only).
    """

    def __init__(self, model: RewardModel, catalog: Catalog, allow_unknown_ads: bool = False):
        vocab = model.vocab
        check_catalog(vocab, catalog, "reward model")
        ad_index = {a: i for i, a in enumerate(vocab.ads)}
        unknown = [a for a in catalog.ads if a not in ad_index]
        if unknown and not allow_unknown_ads:
            raise ValueError(
                f"ad_id '{unknown[0]}' is not known to the reward model (trained on "
                f"{len(vocab.ads)} ads); retrain, or allow unknown ads to score them with the "
                "average appeal"
            )
        self.model = model
        self.catalog = catalog
        self.ad_map = torch.tensor([ad_index.get(a, len(vocab.ads)) for a in catalog.ads])
        maps, feats = [], []
        for k in range(catalog.n_components):
            index = {e: i for i, e in enumerate(vocab.elements[k])}
            off = int(model.offsets[k])
            maps.append(
                [off + index[e] if e in index else model.n_elements for e in catalog.elements[k]]
            )
            feats.append(torch.as_tensor(catalog.features[k], dtype=torch.float32))
        self.cat_offsets = np.cumsum([0, *[len(m) for m in maps[:-1]]])
        self.elem_map = torch.tensor([i for m in maps for i in m], dtype=torch.long)
        F = max(len(catalog.feature_names), 1)
        self.feat_table = torch.cat(
            [f if f.shape[1] else torch.zeros(len(f), F) for f in feats]
        )  # (n_catalog_elements, F)

    def _inputs(self, ads: np.ndarray, combos: np.ndarray, ctx: np.ndarray | None):
        g = torch.as_tensor(combos + self.cat_offsets[None, :], dtype=torch.long)  # (B, K)
        C = self.model.C
        x = (
            torch.zeros(len(ads), C)
            if ctx is None or C == 0
            else torch.as_tensor(np.asarray(ctx, dtype=np.float32).reshape(len(ads), C))
        )
        return self.ad_map[torch.as_tensor(ads)], self.elem_map[g], self.feat_table[g], x

    @torch.no_grad()
    def parts(self, ads: np.ndarray, combos: np.ndarray, ctx: np.ndarray | None = None):
        """(base, main (B, K), inter (B, K, K)) as numpy arrays."""
        base, main, inter = self.model.parts(*self._inputs(ads, combos, ctx))
        return base.numpy(), main.numpy(), inter.numpy()

    def residual(self, ads: np.ndarray, combos: np.ndarray) -> np.ndarray:
        """(B,) the combination residual of catalog-coded rows (0 where none)."""
        if len(self.model.residual_values) == 0:
            return np.zeros(len(ads), np.float32)
        g = torch.as_tensor(combos + self.cat_offsets[None, :], dtype=torch.long)
        rows = np.column_stack([self.ad_map[torch.as_tensor(ads)].numpy(), self.elem_map[g]])
        return self.model.residual(rows)

    def logit(self, ads: np.ndarray, combos: np.ndarray, ctx: np.ndarray | None = None):
        base, main, inter = self.parts(ads, combos, ctx)
        return base + main.sum(1) + inter.sum((1, 2)) / 2 + self.residual(ads, combos)

    def ctr(self, ads: np.ndarray, combos: np.ndarray, ctx: np.ndarray | None = None):
        return 1.0 / (1.0 + np.exp(-self.logit(ads, combos, ctx)))

    def credit(self, ads: np.ndarray, combos: np.ndarray, ctx: np.ndarray | None = None):
        """Shapley credit per element (B, K): main effect plus half of each pairwise term.

        The combination residual is a K-way term, so each element gets an equal 1/K share. This
        is the exact Shapley value of the model, and it sums to the creative logit (logit minus
        base) row by row.
        """
        base, main, inter = self.parts(ads, combos, ctx)
        share = self.residual(ads, combos)[:, None] / main.shape[1]
        return base, main + inter.sum(-1) / 2 + share

    def _component_features(self, k: int, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised features (N, F) of component k's elements -> feature terms."""
        m = self.model
        main = f @ m.w_main[k]
        ffm = f @ m.w_ffm[k]
        if len(m.tower):
            out = m.tower[k](f)
            main, ffm = main + out[:, : 1 + m.C], ffm + out[:, 1 + m.C :]
        return main, ffm

    @torch.no_grad()
    def tables(self, ad: int, slot_codes: list[np.ndarray]) -> RewardTables:
        """The model folded for one ad over its slots (``slot_codes[k]``: catalog code per
        slot of component k, -1 for padding): see ``genco.models.tables``."""
        m = self.model
        K = len(slot_codes)
        main, vec = [], []
        for k, codes in enumerate(slot_codes):
            g = torch.as_tensor(np.maximum(codes, 0) + self.cat_offsets[k], dtype=torch.long)
            elem, f = self.elem_map[g], self.feat_table[g]
            f = (f - m.feat_mean[k]) / m.feat_std[k] if m.F else torch.zeros(len(g), 1)
            fm, fv = self._component_features(k, f)
            main.append((m.id_main(elem) + fm).numpy())  # (M_k, 1 + C)
            v = m.id_ffm(elem) + fv
            vec.append(v.view(len(g), K, m.d))  # [slot, l]: facing component l
        pair = {}  # no pairwise terms: no tables
        if m.config.use_interactions:
            for k in range(K):
                for l_ in range(K):
                    if l_ != k:
                        pair[(k, l_)] = (vec[k][:, l_] @ vec[l_][:, k].T).numpy()
        base = m.bias
        if m.config.use_appeal:
            base = base + m.appeal.weight[self.ad_map[ad], 0]
        return RewardTables(
            base=float(base),
            ctx_w=m.ctx_w.numpy().copy(),
            ctx_mean=m.ctx_mean.numpy().copy(),
            ctx_std=m.ctx_std.numpy().copy(),
            main=main,
            pair=pair,
            residual=self._slot_residuals(ad, slot_codes),
        )

    def _slot_residuals(self, ad: int, slot_codes: list[np.ndarray]):
        """The ad's combination residuals as (slots (R, K), values (R,)), dropping rows
        with an element that is not one of the ad's slots now."""
        rows, values = self.model.residuals_of_ad(int(self.ad_map[ad]))
        if len(rows) == 0:
            return None
        slots = np.zeros(rows.shape, np.int64)
        keep = np.ones(len(rows), bool)
        for k, codes in enumerate(slot_codes):
            g = self.elem_map[np.maximum(codes, 0) + self.cat_offsets[k]].numpy()
            g = np.where(codes >= 0, g, -1)
            order = np.argsort(g)
            at = np.minimum(np.searchsorted(g[order], rows[:, k]), len(g) - 1)
            found = g[order][at] == rows[:, k]
            slots[:, k] = order[at]
            keep &= found
        return (slots[keep], values[keep]) if keep.any() else None

    @torch.no_grad()
    def element_effects(self, ctx: np.ndarray | None = None) -> list[np.ndarray]:
        """Average marginal effect of every catalog element on the logit, centred per component.

        E[logit | e_k = e] - E[logit] with partners drawn uniformly from the catalog: main_k(e, x)
        plus the mean interaction with each other component's elements. ctx: one context row
        (C,); default the training mean. (Shapley credit splits pairwise terms in half, but
        that split is not identified from clicks; this effect is, so it is what we compare.)
        """
        m = self.model
        K, n_cat = self.catalog.n_components, len(self.elem_map)
        x = m.ctx_mean if ctx is None else torch.as_tensor(np.asarray(ctx, np.float32))
        x = ((x - m.ctx_mean) / m.ctx_std)[None, :]
        comp_of = np.repeat(np.arange(K), [len(e) for e in self.catalog.elements])
        comp_t = torch.as_tensor(comp_of)
        f = self.feat_table
        f = (f - m.feat_mean[comp_t]) / m.feat_std[comp_t] if m.F else torch.zeros(n_cat, 1)
        parts = [self._component_features(k, f[comp_of == k]) for k in range(K)]
        coef = m.id_main(self.elem_map) + torch.cat([p[0] for p in parts])
        main = coef[:, 0] + (coef[:, 1:] * x).sum(-1)  # (n_cat,)
        out = main.clone()
        if m.config.use_interactions:
            v = m.id_ffm(self.elem_map) + torch.cat([p[1] for p in parts])
            v = v.view(n_cat, K, m.d)  # v[n, l]: element n facing field l
            mean_facing = torch.stack(
                [v[torch.as_tensor(comp_of == k)].mean(0) for k in range(K)]
            )  # (K, K, d): mean over field k's elements of their vector facing field l
            for k in range(K):
                rows = torch.as_tensor(comp_of == k)
                for l_ in range(K):
                    if l_ != k:
                        out[rows] += (v[rows, l_] * mean_facing[l_, k]).sum(-1)
        splits = np.cumsum([len(e) for e in self.catalog.elements])[:-1]
        return [e - e.mean() for e in np.split(out.numpy(), splits)]


@dataclass
class TrainReport:
    epochs: int
    best_epoch: int
    train_rows: int
    val_rows: int
    split: str
    seconds: float
    history: list[dict]
    # What was chosen on the held-out slice (l2_id, residual_sd) with the losses behind it.
    tuning: dict = field(default_factory=dict)


def _split(enc: Encoded, config: RewardModelConfig) -> tuple[np.ndarray, np.ndarray, str]:
    n = len(enc)
    n_val = round(config.val_fraction * n)
    if n_val == 0:
        return np.arange(n), np.zeros(0, np.int64), "none"
    if enc.timestamp is not None:
        order = np.argsort(enc.timestamp, kind="stable")
        return order[: n - n_val], order[n - n_val :], "time"
    perm = np.random.default_rng(config.seed).permutation(n)
    return perm[n_val:], perm[:n_val], "random"


def train_reward_model(
    catalog: Catalog,
    impressions: pd.DataFrame | Encoded,
    config: RewardModelConfig | None = None,
    progress: bool = False,
    init: RewardModel | None = None,
) -> tuple[RewardModel, TrainReport]:
    """Fit the reward model: the structure by weighted BCE with early stopping on a held-out
    split, then (``config.residual``) the combination residuals by empirical Bayes.

    init: a previous model to warm start from (same vocabulary), e.g. production.
    """
    config = config or RewardModelConfig()
    enc = impressions if isinstance(impressions, Encoded) else encode(impressions, catalog)
    _check_learnable(enc)
    if config.propensity_weighting and enc.propensity is None:
        raise ValueError("propensity_weighting needs a 'propensity' column")
    torch.manual_seed(config.seed)
    model = RewardModel(Vocab.from_catalog(catalog, enc.context_columns), config)
    if init is not None:
        model.load_state_dict(init.state_dict())
    bound = BoundModel(model, catalog)
    tr, va, split = _split(enc, config)
    weights = _weights(enc, tr, config)
    fit_scalers(model, catalog, enc.ctx[tr])
    with torch.no_grad():
        rate = float(enc.click[tr].mean())
        if init is None:
            model.bias.fill_(math.log(rate / (1 - rate)))
    t0 = time.perf_counter()
    history, best_epoch, tuning = _fit_tuned(model, bound, enc, tr, va, weights, config, progress)
    residual: dict = {}
    if config.residual:
        residual = fit_residuals(model, bound, enc, weights)
    report = TrainReport(
        len(history),
        best_epoch,
        len(tr),
        len(va),
        split,
        time.perf_counter() - t0,
        history,
        {**tuning, **residual},
    )
    return model, report


# Strengths tried for the id embeddings' L2 when the config leaves it at 0.
L2_ID_GRID = (1e-3, 1e-2, 1e-1)


def _fit_tuned(model, bound, enc, tr, va, weights, config, progress) -> tuple[list, int, dict]:
    """``_fit_structure`` once with ``config.l2_id``, or (l2_id = 0) once per L2_ID_GRID value
    from the same start, keeping the one with the best held-out loss."""
    if config.l2_id > 0 or not len(va):
        l2 = config.l2_id if config.l2_id > 0 else L2_ID_GRID[len(L2_ID_GRID) // 2]
        history, best_epoch = _fit_structure(
            model, bound, enc, tr, va, weights, replace(config, l2_id=l2), progress
        )
        return history, best_epoch, {"l2_id": l2}
    start = copy.deepcopy(model.state_dict())
    best = None
    losses = {}
    for l2 in L2_ID_GRID:
        model.load_state_dict(start)
        history, best_epoch = _fit_structure(
            model, bound, enc, tr, va, weights, replace(config, l2_id=l2), progress
        )
        losses[str(l2)] = min(h["val_loss"] for h in history)
        if best is None or losses[str(l2)] < best[0]:
            best = (losses[str(l2)], l2, copy.deepcopy(model.state_dict()), history, best_epoch)
    _, l2, state, history, best_epoch = best
    model.load_state_dict(state)
    return history, best_epoch, {"l2_id": l2, "l2_id_val_loss": losses}


def _check_learnable(enc: Encoded) -> None:
    if len(enc) == 0:
        raise ValueError("impressions: no rows to learn from")
    if enc.click.sum() == 0:
        raise ValueError("impressions: no clicks at all; a click model cannot be learned")
    if enc.click.sum() == len(enc):
        raise ValueError(
            "impressions: every impression was clicked; a click model cannot be learned"
        )


def _weights(enc: Encoded, tr: np.ndarray, config: RewardModelConfig) -> np.ndarray:
    """(n,) impression weights: 1, or 1/propensity normalised to mean 1 on the training rows
    and clipped."""
    if not config.propensity_weighting:
        return np.ones(len(enc))
    w = 1.0 / enc.propensity
    return np.minimum(w / w[tr].mean(), config.max_weight)


@dataclass
class _Rows:
    """Impressions as model inputs, identical ones merged: ``weight`` sums their weights and
    ``y`` is their weighted click rate (the same BCE, fewer rows)."""

    ad: torch.Tensor
    elem: torch.Tensor
    feats: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    weight: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, b: torch.Tensor) -> tuple:
        return self.ad[b], self.elem[b], self.feats[b], self.x[b], self.y[b], self.weight[b]


# Merge identical impressions only when that shrinks the rows at least this much.
MIN_MERGE_RATIO = 4.0


def _merge(
    enc: Encoded, idx: np.ndarray, weights: np.ndarray, force: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Identical impressions (ad, combination, context) among rows ``idx`` merged, when that
    shrinks them by MIN_MERGE_RATIO (or ``force``): (one row index each, summed weight,
    weighted click rate)."""
    keys = np.column_stack([enc.ads[idx], enc.combos[idx], enc.ctx[idx].view(np.int32)])
    h = _row_hash(keys.astype(np.int64))
    uniq, first, group = np.unique(h, return_index=True, return_inverse=True)
    w, y = weights[idx], enc.click[idx].astype(np.float64)
    if not force and len(uniq) * MIN_MERGE_RATIO > len(idx):
        return idx, w, y
    group = group.reshape(-1)
    wsum = np.bincount(group, w, len(uniq))
    y = np.bincount(group, w * y, len(uniq)) / np.maximum(wsum, 1e-12)
    return idx[first], wsum, y


def _rows(bound: BoundModel, enc: Encoded, idx: np.ndarray, weights: np.ndarray) -> _Rows:
    idx, w, y = _merge(enc, idx, weights)
    ad, elem, feats, x = bound._inputs(enc.ads[idx], enc.combos[idx], enc.ctx[idx])
    return _Rows(
        ad,
        elem,
        feats,
        x,
        torch.as_tensor(y, dtype=torch.float32),
        torch.as_tensor(w, dtype=torch.float32),
    )


def _fit_structure(
    model: RewardModel,
    bound: BoundModel,
    enc: Encoded,
    tr: np.ndarray,
    va: np.ndarray,
    weights: np.ndarray,
    config: RewardModelConfig,
    progress: bool,
) -> tuple[list[dict], int]:
    """Adam on weighted BCE; each plateau of the held-out loss goes back to the best weights
    with half the step; stops after ``patience`` plateaus. Returns (history, best epoch)."""
    train = _rows(bound, enc, tr, weights)
    val = _rows(bound, enc, va, np.ones(len(enc))) if len(va) else None
    with torch.no_grad():
        seen = torch.zeros(model.n_elements + 1, dtype=torch.bool)
        seen[train.elem.unique()] = True
        seen[model.n_elements] = False
        model.seen.copy_(seen)
    # As many steps per epoch as unmerged rows would take; merged rows make each step smaller.
    steps = max(1, math.ceil(len(tr) / config.batch_size))
    per_step = min(config.batch_size, max(64, math.ceil(len(train) / steps)))
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    bce = nn.BCEWithLogitsLoss(reduction="none")
    g = torch.Generator().manual_seed(config.seed)
    best, best_loss, best_epoch, bad_epochs = None, float("inf"), 0, 0
    history: list[dict] = []
    from tqdm import tqdm

    bar = tqdm(range(config.epochs), desc="reward model", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        reps = math.ceil(steps * per_step / len(train))
        perm = torch.cat([torch.randperm(len(train), generator=g) for _ in range(reps)])
        total, seen_w = 0.0, 0.0
        for s in range(0, min(len(perm), steps * per_step), per_step):
            ad, elem, feats, x, y, w = train.batch(perm[s : s + per_step])
            raw = (bce(model(ad, elem, feats, x), y) * w).sum()
            total, seen_w = total + float(raw.detach()), seen_w + float(w.sum())
            loss = raw / w.sum()
            if config.l2_id:
                loss = loss + config.l2_id * (
                    model.id_main(elem).pow(2).sum()
                    + model.id_ffm(elem).pow(2).sum()
                    + model.appeal(ad).pow(2).sum()
                ) / len(y)
            if config.l2_dense:
                loss = loss + config.l2_dense * (
                    model.w_main.pow(2).sum()
                    + model.w_ffm.pow(2).sum()
                    + sum(p.pow(2).sum() for t in model.tower for p in t.parameters())
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        record = {"epoch": epoch + 1, "train_loss": total / seen_w}
        if val is not None:
            model.eval()
            with torch.no_grad():
                z = model(val.ad, val.elem, val.feats, val.x)
                record["val_loss"] = float((bce(z, val.y) * val.weight).sum() / val.weight.sum())
        history.append(record)
        bar.set_postfix({k: round(v, 5) for k, v in record.items() if k != "epoch"})
        score = record.get("val_loss", record["train_loss"])
        if score < best_loss - 1e-6:
            best = copy.deepcopy(model.state_dict())
            best_loss, best_epoch, bad_epochs = score, epoch + 1, 0
        else:
            # Back to the best weights with half the step size: noisy Adam steps around the
            # optimum, not the model, were what stopped the improvement.
            bad_epochs += 1
            if bad_epochs >= config.patience:
                break
            model.load_state_dict(best)
            for group in opt.param_groups:
                group["lr"] /= 2
    bar.close()
    model.load_state_dict(best)
    with torch.no_grad():
        # Elements never seen in training carry no evidence: score them from features only.
        model.id_main.weight[~model.seen] = 0.0
        model.id_ffm.weight[~model.seen] = 0.0
    model.eval()
    return history, best_epoch


# Prior SDs (logit scale) tried for the combination residuals; 0 = none.
RESIDUAL_SD_GRID = (0.0, 0.02, 0.03, 0.05, 0.07, 0.1, 0.14, 0.2, 0.3, 0.5, 0.7, 1.0)


# Degrees of freedom of the residuals' Student-t prior: heavy tails, so the few combinations
# far from the structure (the ones an argmax cares about) are shrunk less than the many near it.
RESIDUAL_DOF = 4.0


def _residual_newton(
    group: np.ndarray, n_groups: int, s: np.ndarray, y: np.ndarray, w: np.ndarray, sd: float
) -> np.ndarray:
    """Posterior mode of r_g under logit = s + r_g, r_g ~ Student-t(RESIDUAL_DOF, scale sd),
    by Fisher-scoring steps on all groups at once. group (n,) in [0, n_groups); s (n,)
    structural logits; y (n,) click rates of rows with weight (impressions) w (n,)."""
    r = np.zeros(n_groups)
    if sd <= 0:
        return r
    nu = RESIDUAL_DOF
    for _ in range(30):
        p = 1.0 / (1.0 + np.exp(-(s + r[group])))
        curv = (nu + 1) / (nu * sd**2 + r**2)  # the prior's pull per unit of r, always > 0
        grad = np.bincount(group, w * (y - p), n_groups) - curv * r
        hess = np.bincount(group, w * p * (1 - p), n_groups) + curv
        step = grad / hess
        r += step
        if np.abs(step).max() < 1e-5:
            break
    return r


def _log_evidence(
    group: np.ndarray, n_groups: int, s: np.ndarray, y: np.ndarray, w: np.ndarray, sd: float
) -> float:
    """Laplace approximation of log p(clicks | sd): the log likelihood at the posterior
    modes, plus each group's log prior density there and its Laplace volume term."""
    r = _residual_newton(group, n_groups, s, y, w, sd)
    z = s + r[group]
    loglik = -float(np.sum(w * (np.logaddexp(0.0, z) - y * z)))
    if sd <= 0:
        return loglik
    nu = RESIDUAL_DOF
    p = 1.0 / (1.0 + np.exp(-z))
    h = np.bincount(group, w * p * (1 - p), n_groups)
    a = nu * sd**2 + r**2
    log_prior = (
        math.lgamma((nu + 1) / 2)
        - math.lgamma(nu / 2)
        - 0.5 * math.log(nu * math.pi)
        - math.log(sd)
        - (nu + 1) / 2 * np.log1p(r**2 / (nu * sd**2))
    )
    prior_curv = (nu + 1) * (nu * sd**2 - r**2) / a**2
    volume = 0.5 * math.log(2 * math.pi) - 0.5 * np.log(np.maximum(h + prior_curv, 1e-12))
    return loglik + float(np.sum(log_prior + volume))


@torch.no_grad()
def fit_residuals(
    model: RewardModel,
    bound: BoundModel,
    enc: Encoded,
    weights: np.ndarray,
    batch: int = 262_144,
) -> dict:
    """Fit the per (ad, combination) residuals on top of the trained structure.

    The prior SD is chosen by empirical Bayes, unless the config fixes it: the one of
    RESIDUAL_SD_GRID with the largest marginal likelihood of all the clicks (Laplace
    approximation), the standard choice for a random-effects variance. (A held-out slice was
    measured first: its log-loss differences between SDs, ~1e-5, were inside its own noise,
    and it picked a too-tight prior on one AES log seed in five.) Returns the SD chosen and
    the log evidence per SD.
    """

    def merged(idx: np.ndarray, w: np.ndarray):
        """Rows merged by (ad, combination, context): structural logit, group, y, weight."""
        idx, w, y = _merge(enc, idx, w, force=True)
        s = np.zeros(len(idx))
        for i in range(0, len(idx), batch):
            part = idx[i : i + batch]
            s[i : i + batch] = model(*bound._inputs(enc.ads[part], enc.combos[part], enc.ctx[part]))
        g = torch.as_tensor(enc.combos[idx] + bound.cat_offsets[None, :], dtype=torch.long)
        rows = np.column_stack(
            [bound.ad_map[torch.as_tensor(enc.ads[idx])].numpy(), bound.elem_map[g]]
        )
        return rows, s, y, w

    everything = np.arange(len(enc))
    rows, s, y, w = merged(everything, weights)
    keys, group = np.unique(_row_hash(rows), return_inverse=True)
    group = group.reshape(-1)
    n_groups = len(keys)
    evidence: dict[str, float] = {}
    sd = model.config.residual_sd
    if sd == 0:
        for cand in RESIDUAL_SD_GRID:
            evidence[str(cand)] = _log_evidence(group, n_groups, s, y, w, cand)
        sd = float(max(RESIDUAL_SD_GRID, key=lambda c: (evidence[str(c)], -c)))
    r = _residual_newton(group, n_groups, s, y, w, sd)
    first = np.zeros(n_groups, np.int64)
    first[group] = np.arange(len(group))  # any row of a group: they share its key
    keep = np.abs(r) > 1e-6
    model.set_residuals(rows[first[keep]], r[keep].astype(np.float32), sd)
    return {
        "residual_sd": sd,
        "residual_log_evidence": evidence,
        "residual_combinations": int(keep.sum()),
    }
