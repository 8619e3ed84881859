"""Multi-instance reward model: a shown combination is a bag whose instances are its elements.

    logit = bias + appeal(ad) + w_ctx . x                       # product/context appeal
          + sum_k  main_k(e_k, x)                               # per-element score, linear in x
          + sum_{k<l} < v(e_k -> l), v(e_l -> k) >              # field-aware pairwise interaction
          + sum_{k<l<m} sum_d u_d(e_k) u_d(e_l) u_d(e_m)        # three-way (dim3 > 0)
          + r(ad, e_1..e_K)                                     # combination residual

Every element representation is an id part plus a projection of the catalog's ``feat_*``
features, so an element never seen in the log (cold start) is scored from its features alone.
The appeal term soaks up how popular the product is, so element credit is not confounded by
which product happened to be shown. The residual is fitted after the structure, by empirical
Bayes (``genco.training.residuals``): it moves a combination toward its own observed CTR as
its traffic grows, and is zero for combinations never shown.

Fitting lives in ``genco.training.reward_fit``; this module is the model and its scoring.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from genco.data.contract import Catalog
from genco.models.chunk_tables import RewardFold
from genco.models.optim import set_sparse
from genco.models.residual_index import ResidualIndex
from genco.models.reward_config import RewardModelConfig
from genco.models.tables import RewardTables
from genco.models.three_way import e3, others_e2, shares
from genco.models.tower import make_towers, set_towers
from genco.models.vocab import Vocab, check_catalog, id_map, register_vocab_buffers

# SD of the three-way feature map's initial weights (per standardised feature): u's products
# are cubic, so a start as small as the pairwise vectors' leaves the term's gradient near zero.
THREE_WAY_INIT = 0.3


class RewardModel(nn.Module):
    """The click model over the training vocabulary (plus one zero "unknown" row per table).

    Element indices are global: component k's element e is ``offsets[k] + e``; the last
    index is the unknown element whose id embeddings stay zero (features only). Large id
    tables (appeal, id_main, id_ffm) have sparse gradients: a step updates the rows its
    batch touched (``genco.models.optim``).
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
        # Each residual's posterior SD (logit), for posterior draws; empty in bundles from
        # before it was kept (their residuals then count as unseen: the prior's width).
        self.register_buffer("residual_width", torch.zeros(0))
        # Each element's main-effect width (logit), same use; empty: none known (no doubt).
        self.register_buffer("elem_width", torch.zeros(0))
        self._residual_index: ResidualIndex | None = None
        self.bias = nn.Parameter(torch.zeros(()))
        self.appeal = nn.Embedding(len(vocab.ads) + 1, 1, padding_idx=len(vocab.ads))
        self.ctx_w = nn.Parameter(torch.zeros(C))
        # main_k(e, x) = <coef(e), [1, x]>; coef = id part + feature projection
        self.id_main = nn.Embedding(self.n_elements + 1, 1 + C, padding_idx=self.n_elements)
        self.w_main = nn.Parameter(torch.zeros(K, max(F, 1), 1 + C))
        self.id_ffm = nn.Embedding(self.n_elements + 1, K * d, padding_idx=self.n_elements)
        self.w_ffm = nn.Parameter(torch.zeros(K, max(F, 1), K * d))
        # Nonlinear part of the feature map, one small tower per component (``tower_on``:
        # computed; False once a fit switched it off, ``switch_tower``).
        self.tower = make_towers(
            K, F, config.feature_hidden, 1 + C + K * d, config.init_scale, config.seed
        )
        self.tower_on = len(self.tower) > 0
        g = torch.Generator().manual_seed(config.seed)
        with torch.no_grad():
            nn.init.zeros_(self.appeal.weight)
            nn.init.zeros_(self.id_main.weight)
            self.id_ffm.weight.normal_(0.0, config.init_scale, generator=g)
            self.id_ffm.weight[self.n_elements].zero_()
            self.w_ffm.normal_(0.0, config.init_scale / math.sqrt(max(F, 1)), generator=g)
        # Three-way vectors u(e) = id part + feature projection (``genco.models.three_way``);
        # none without three components or with dim3 = 0 (older bundles: none either).
        d3 = config.dim3 if K >= 3 else 0
        if d3:
            self.id3 = nn.Embedding(self.n_elements + 1, d3, padding_idx=self.n_elements)
            self.w3 = nn.Parameter(torch.zeros(K, max(F, 1), d3))
            with torch.no_grad():
                self.id3.weight.normal_(0.0, config.init_scale, generator=g)
                self.id3.weight[self.n_elements].zero_()
                self.w3.normal_(0.0, THREE_WAY_INIT / math.sqrt(max(F, 1)), generator=g)
        self.K, self.F, self.C, self.d, self.d3 = K, F, C, d, d3
        set_sparse(self)

    def parts(
        self,
        ad: torch.Tensor,
        elem: torch.Tensor,
        feats: torch.Tensor,
        ctx: torch.Tensor,
        pairs: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Logit decomposition.

        ad (B,) ad index (len(ads) = unknown); elem (B, K) global element index;
        feats (B, K, F) raw element features; ctx (B, C) raw context.
        Returns base (B,), main (B, K), inter (B, K, K) symmetric with zero diagonal, tri
        (B, K) each element's Shapley share of the three-way terms (zeros without).
        With ``pairs``: the interaction vectors (B, K, K, d) and the three-way vectors
        (B, K, d3) instead of inter and tri (None where the model has no such term).
        """
        B, K = elem.shape
        x = (ctx - self.ctx_mean) / self.ctx_std  # (B, C)
        f = (feats - self.feat_mean) / self.feat_std if self.F else feats.new_zeros(B, K, 1)
        base = self.bias + x @ self.ctx_w
        if self.config.use_appeal:
            base = base + self.lookup("appeal", ad)[:, 0]
        feat_main, feat_ffm = self.feature_terms(f)
        coef = self.lookup("id_main", elem) + feat_main  # (B, K, 1+C)
        main = coef[..., 0] + (coef[..., 1:] * x[:, None, :]).sum(-1)  # (B, K)
        u = None
        if self.d3:
            u = self.lookup("id3", elem) + torch.einsum("bkf,kfd->bkd", f, self.w3)  # (B, K, d3)
        v = None
        if self.config.use_interactions:
            v = self.lookup("id_ffm", elem) + feat_ffm  # (B, K, K*d)
            v = v.view(B, K, K, self.d)  # v[b, k, l]: element of field k facing field l
        if pairs:  # for forward: the vectors, not the (B, K, K) products
            return base, main, v, u
        tri = main.new_zeros(B, K) if u is None else shares(u)
        if v is None:
            return base, main, main.new_zeros(B, K, K), tri
        inter = (v * v.transpose(1, 2)).sum(-1)  # (B, K, K)
        inter = inter * (1 - torch.eye(K, dtype=inter.dtype, device=inter.device))
        return base, main, inter, tri

    # For one training step (``genco.models.optim.RowStep``): of each sparse id table, the
    # rows the batch touches as a small dense leaf, and the step's indices point into it.
    row_tables: dict[str, torch.Tensor] | None = None

    def lookup(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` of id table ``name`` (appeal, id_main, id_ffm, id3), or of its step
        leaf."""
        leaf = self.row_tables.get(name) if self.row_tables else None
        if leaf is None:
            return getattr(self, name)(index)
        # index_select: its backward is one index_add_ (embedding's dense backward measured
        # several times slower on CPU for these shapes)
        return leaf.index_select(0, index.reshape(-1)).view(*index.shape, leaf.shape[1])

    def feature_terms(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised features f (B, K, F) -> what they add to each element's main-effect
        coefficients (B, K, 1 + C) and interaction vectors (B, K, K * d)."""
        main = torch.einsum("bkf,kfc->bkc", f, self.w_main)
        ffm = torch.einsum("bkf,kfm->bkm", f, self.w_ffm)
        if self.tower_on:
            out = torch.stack([t(f[:, k]) for k, t in enumerate(self.tower)], 1)
            main, ffm = main + out[..., : 1 + self.C], ffm + out[..., 1 + self.C :]
        return main, ffm

    def forward(self, ad, elem, feats, ctx) -> torch.Tensor:
        """The structural logit (no combination residual): what gradient training fits.
        The same sum as ``parts``' base + main.sum(1) + inter.sum((1, 2)) / 2 + tri.sum(1),
        with each pair (k < l) of the interaction once: a third of the (B, K, K, d) products,
        and contiguous ones (training's forward and backward spent most of their time there)."""
        base, main, v, u = self.parts(ad, elem, feats, ctx, pairs=True)
        out = base + main.sum(1)
        if v is not None:
            k, m = torch.triu_indices(self.K, self.K, 1, device=v.device)
            out = out + (v[:, k, m] * v[:, m, k]).sum((1, 2))  # (B, P, d) -> (B,)
        if u is not None:
            out = out + e3(u)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name in (
            "residual_keys", "residual_values", "residual_sd", "residual_width", "elem_width"
        ):  # fmt: skip
            saved = state_dict.get(prefix + name)
            if saved is None:  # a bundle from before residuals existed: none
                state_dict[prefix + name] = getattr(self, name)
            elif name != "residual_sd":  # the residual table's size comes from the data
                setattr(self, name, torch.empty_like(saved))
        if self.d3:  # a bundle from before the three-way term: none (zero vectors)
            for name, p in (("id3.weight", self.id3.weight), ("w3", self.w3)):
                state_dict.setdefault(prefix + name, torch.zeros_like(p))
        self._residual_index = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def drop_three_way(self) -> None:
        """Zero the three-way vectors: the term is then exactly off, and stays off in
        training (each vector's gradient is a product of the others, all zero). This model
        then also skips it (``d3`` = 0: no forward, backward or table work for a term of
        zeros); a bundle saved from it loads with the zero vectors, the same scores."""
        self.id3.weight.zero_()
        self.w3.zero_()
        self.d3 = 0
        for p in (self.id3.weight, self.w3):  # no parameter DDP would wait for in vain
            p.requires_grad_(False)

    def restore_three_way(self) -> None:
        """Compute the three-way term again (``d3`` from the config), e.g. after its
        vectors were restored from a snapshot taken before ``drop_three_way``."""
        self.d3 = self.id3.weight.shape[1]
        for p in (self.id3.weight, self.w3):
            p.requires_grad_(True)

    def switch_tower(self, on: bool) -> None:
        """Off: the towers zeroed and skipped; on: computed again (``set_towers``)."""
        self.tower_on = set_towers(self.tower, on)

    def set_residuals(
        self, keys: np.ndarray, values: np.ndarray, sd: float, width: np.ndarray | None = None
    ) -> None:
        """keys (R, 1 + K) int64 (ad index, global element indices); values (R,) logits;
        width (R,) their posterior SDs (None: not known)."""
        self.residual_keys = torch.as_tensor(keys, dtype=torch.long)
        self.residual_values = torch.as_tensor(values, dtype=torch.float32)
        self.residual_width = torch.as_tensor(
            np.zeros(0) if width is None else width, dtype=torch.float32
        )
        self.residual_sd.fill_(float(sd))
        self._residual_index = None

    def set_element_widths(self, width: np.ndarray) -> None:
        """(n_elements,) each element's main-effect width (logit), by global index."""
        self.elem_width = torch.as_tensor(width, dtype=torch.float32)

    def _residuals(self) -> ResidualIndex:
        """The residuals' index: values and posterior SDs (NaN where not known) as columns."""
        if self._residual_index is None:
            width = self.residual_width.numpy()
            if len(width) != len(self.residual_values):
                width = np.full(len(self.residual_values), np.nan, np.float32)
            both = np.column_stack([self.residual_values.numpy(), width])
            self._residual_index = ResidualIndex(self.residual_keys.numpy(), both)
        return self._residual_index

    def residual(self, keys: np.ndarray) -> np.ndarray:
        """(B,) residual logit of rows (B, 1 + K) (ad index, global element indices); 0 where
        the combination has none."""
        if len(self.residual_values) == 0:
            return np.zeros(len(keys), np.float32)
        return self._residuals().lookup(keys)[:, 0]

    def residuals_of_ad(self, ad_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The residual rows (R_a, K) global element indices, values and posterior SDs (NaN
        where not known) of one ad."""
        if len(self.residual_values) == 0:
            return np.zeros((0, self.K), np.int64), np.zeros(0, np.float32), np.zeros(0)
        rows, both = self._residuals().of_ad(ad_index)
        return rows, both[:, 0], both[:, 1]


class BoundModel:
    """A reward model bound to a catalog: scores and explains catalog-coded combinations.

    Catalog elements unknown to the model map to the zero "unknown" row (features only).
    """

    def __init__(self, model: RewardModel, catalog: Catalog, allow_unknown_ads: bool = False):
        vocab = model.vocab
        check_catalog(vocab, catalog, "reward model")
        ad_codes = id_map(vocab.ads, catalog.ads)
        if (ad_codes < 0).any() and not allow_unknown_ads:
            raise ValueError(
                f"ad_id '{catalog.ads[int(np.flatnonzero(ad_codes < 0)[0])]}' is not known to "
                f"the reward model (trained on {len(vocab.ads)} ads); retrain, or allow unknown "
                "ads to score them with the average appeal"
            )
        self.model = model
        self.catalog = catalog
        self.ad_map = torch.as_tensor(np.where(ad_codes < 0, len(vocab.ads), ad_codes))
        maps, feats = [], []
        for k in range(catalog.n_components):
            codes = id_map(vocab.elements[k], catalog.elements[k])
            off = int(model.offsets[k])
            maps.append(np.where(codes < 0, model.n_elements, off + codes))
            feats.append(torch.as_tensor(catalog.features[k], dtype=torch.float32))
        self.cat_offsets = np.cumsum([0, *[len(m) for m in maps[:-1]]])
        self.elem_map = torch.as_tensor(np.concatenate(maps), dtype=torch.long)
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
        """(base, main (B, K), inter (B, K, K), tri (B, K)) as numpy arrays."""
        return tuple(p.numpy() for p in self.model.parts(*self._inputs(ads, combos, ctx)))

    def residual(self, ads: np.ndarray, combos: np.ndarray) -> np.ndarray:
        """(B,) the combination residual of catalog-coded rows (0 where none)."""
        if len(self.model.residual_values) == 0:
            return np.zeros(len(ads), np.float32)
        g = torch.as_tensor(combos + self.cat_offsets[None, :], dtype=torch.long)
        rows = np.column_stack([self.ad_map[torch.as_tensor(ads)].numpy(), self.elem_map[g]])
        return self.model.residual(rows)

    def logit(self, ads: np.ndarray, combos: np.ndarray, ctx: np.ndarray | None = None):
        base, main, inter, tri = self.parts(ads, combos, ctx)
        return base + main.sum(1) + inter.sum((1, 2)) / 2 + tri.sum(1) + self.residual(ads, combos)

    def ctr(self, ads: np.ndarray, combos: np.ndarray, ctx: np.ndarray | None = None):
        return 1.0 / (1.0 + np.exp(-self.logit(ads, combos, ctx)))

    def credit(self, ads: np.ndarray, combos: np.ndarray, ctx: np.ndarray | None = None):
        """Shapley credit per element (B, K): main effect plus half of each pairwise term plus
        a third of each three-way term.

        The combination residual is a K-way term, so each element gets an equal 1/K share. This
        is the exact Shapley value of the model, and it sums to the creative logit (logit minus
        base) row by row.
        """
        base, main, inter, tri = self.parts(ads, combos, ctx)
        share = self.residual(ads, combos)[:, None] / main.shape[1]
        return base, main + inter.sum(-1) / 2 + tri + share

    def _component_features(self, k: int, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised features (N, F) of component k's elements -> feature terms."""
        m = self.model
        main, ffm = f @ m.w_main[k], f @ m.w_ffm[k]
        if m.tower_on:
            out = m.tower[k](f)
            main, ffm = main + out[:, : 1 + m.C], ffm + out[:, 1 + m.C :]
        return main, ffm

    def _three_way(self, k: int, elem: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """Three-way vectors (N, d3) of component k's elements (global indices ``elem``,
        standardised features f (N, F))."""
        return self.model.id3(elem) + f @ self.model.w3[k]

    @torch.no_grad()
    def tables(self, ad: int, slot_codes: list[np.ndarray]) -> RewardTables:
        """The model folded for one ad over its slots (``slot_codes[k]``: catalog code per
        slot of component k, -1 for padding): see ``genco.models.tables``."""
        m = self.model
        K = len(slot_codes)
        main, vec, tri, width = [], [], [], []
        for k, codes in enumerate(slot_codes):
            g = torch.as_tensor(np.maximum(codes, 0) + self.cat_offsets[k], dtype=torch.long)
            elem, f = self.elem_map[g], self.feat_table[g]
            f = (f - m.feat_mean[k]) / m.feat_std[k] if m.F else torch.zeros(len(g), 1)
            fm, fv = self._component_features(k, f)
            main.append((m.id_main(elem) + fm).numpy())  # (M_k, 1 + C)
            if len(m.elem_width):
                width.append(m.elem_width[elem].numpy())
            if m.d3:
                tri.append(self._three_way(k, elem, f).numpy())  # (M_k, d3)
            v = m.id_ffm(elem) + fv
            vec.append(v.view(len(g), K, m.d))  # [slot, l]: facing component l
        pair = {}  # no pairwise terms: no tables
        if m.config.use_interactions:
            for k in range(K):
                for l_ in range(k + 1, K):  # symmetric: (l, k) is (k, l) transposed
                    pair[(k, l_)] = (vec[k][:, l_] @ vec[l_][:, k].T).numpy()
                    pair[(l_, k)] = pair[(k, l_)].T
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
            tri=tri or None,
            elem_width=width or None,
        )

    @torch.inference_mode()
    def fold(self, ads: np.ndarray, slot_codes: list[np.ndarray]) -> RewardFold:
        """``tables`` for a chunk of U ads at once, padded: ``slot_codes[k]`` (U, M_k)."""
        m = self.model
        K, U = len(slot_codes), len(ads)
        main, vec, tri = [], [], []
        for k, codes in enumerate(slot_codes):
            g = torch.as_tensor(np.maximum(codes, 0) + self.cat_offsets[k]).reshape(-1)
            elem, f = self.elem_map[g], self.feat_table[g]
            f = (f - m.feat_mean[k]) / m.feat_std[k] if m.F else torch.zeros(len(g), 1)
            fm, fv = self._component_features(k, f)
            main.append((m.id_main(elem) + fm).view(U, codes.shape[1], -1))  # (U, M_k, 1 + C)
            if m.d3:
                tri.append(self._three_way(k, elem, f).view(U, codes.shape[1], m.d3))
            vec.append((m.id_ffm(elem) + fv).view(U, codes.shape[1], K, m.d))
        sizes = [c.shape[1] for c in slot_codes]
        off = np.cumsum([0, *sizes[:-1]])
        inter = None
        if m.config.use_interactions:
            inter = torch.empty(U, sum(sizes), sum(sizes))  # (U, T, T), zero blocks k = l
            for k in range(K):
                inter[:, off[k] : off[k] + sizes[k], off[k] : off[k] + sizes[k]] = 0.0
                for l_ in range(k + 1, K):  # symmetric: (l, k) is (k, l) transposed
                    block = vec[k][:, :, l_] @ vec[l_][:, :, k].transpose(1, 2)
                    inter[:, off[k] : off[k] + sizes[k], off[l_] : off[l_] + sizes[l_]] = block
                    inter[:, off[l_] : off[l_] + sizes[l_], off[k] : off[k] + sizes[k]] = block.mT
        base = m.bias.expand(U)
        if m.config.use_appeal:
            base = base + m.appeal.weight[self.ad_map[torch.as_tensor(ads)], 0]
        residuals = None
        if len(m.residual_values):
            residuals = [
                self._slot_residuals(int(a), [c[i] for c in slot_codes]) for i, a in enumerate(ads)
            ]
        return RewardFold(
            base=base.numpy().astype(np.float64),
            ctx_w=m.ctx_w.numpy().copy(),
            ctx_mean=m.ctx_mean.numpy().copy(),
            ctx_std=m.ctx_std.numpy().copy(),
            main=torch.cat(main, 1).numpy(),
            inter=None if inter is None else inter.numpy(),
            residuals=residuals,
            tri=torch.cat(tri, 1).numpy() if tri else None,
        )

    def _slot_residuals(self, ad: int, slot_codes: list[np.ndarray]):
        """The ad's combination residuals as (slots (R, K), values (R,), posterior SDs (R,)),
        dropping rows with an element that is not one of the ad's slots now."""
        rows, values, width = self.model.residuals_of_ad(int(self.ad_map[ad]))
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
        return (slots[keep], values[keep], width[keep]) if keep.any() else None

    @torch.no_grad()
    def element_effects(self, ctx: np.ndarray | None = None) -> list[np.ndarray]:
        """Average marginal effect of every catalog element on the logit, centred per component.

        E[logit | e_k = e] - E[logit] with partners drawn uniformly from the catalog: main_k(e, x)
        plus the mean interaction with each other component's elements, plus the mean three-way
        term with each pair of other components (partners independent: u(e) . e2 of the
        other components' mean vectors). ctx: one context row
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
        if m.d3:
            u = torch.cat(
                [self._three_way(k, self.elem_map[comp_t == k], f[comp_t == k]) for k in range(K)]
            )  # (n_cat, d3)
            mean_u = torch.stack([u[comp_t == k].mean(0) for k in range(K)])
            e2 = others_e2(mean_u)  # (K, d3): e2 of the other components' mean vectors
            out += (u * e2[comp_t]).sum(-1)
        splits = np.cumsum([len(e) for e in self.catalog.elements])[:-1]
        return [e - e.mean() for e in np.split(out.numpy(), splits)]
