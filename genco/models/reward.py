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
from dataclasses import dataclass, field

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
        default=1e-5, metadata={"help": "L2 on id embeddings (pulls rare elements to features)."}
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
    seed: int = field(default=0, metadata={"help": "Seed for init, split and shuffling."})

    def __post_init__(self) -> None:
        positive = ("dim", "epochs", "batch_size", "lr", "max_weight", "init_scale")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("l2_id", "l2_dense"):
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
        self.bias = nn.Parameter(torch.zeros(()))
        self.appeal = nn.Embedding(len(vocab.ads) + 1, 1, padding_idx=len(vocab.ads))
        self.ctx_w = nn.Parameter(torch.zeros(C))
        # main_k(e, x) = <coef(e), [1, x]>; coef = id part + feature projection
        self.id_main = nn.Embedding(self.n_elements + 1, 1 + C, padding_idx=self.n_elements)
        self.w_main = nn.Parameter(torch.zeros(K, max(F, 1), 1 + C))
        self.id_ffm = nn.Embedding(self.n_elements + 1, K * d, padding_idx=self.n_elements)
        self.w_ffm = nn.Parameter(torch.zeros(K, max(F, 1), K * d))
        g = torch.Generator().manual_seed(config.seed)
        with torch.no_grad():
            nn.init.zeros_(self.appeal.weight)
            nn.init.zeros_(self.id_main.weight)
            self.id_ffm.weight.normal_(0.0, config.init_scale, generator=g)
            self.id_ffm.weight[self.n_elements].zero_()
            self.w_ffm.normal_(0.0, config.init_scale / math.sqrt(max(F, 1)), generator=g)
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
        coef = self.id_main(elem) + torch.einsum("bkf,kfc->bkc", f, self.w_main)  # (B, K, 1+C)
        main = coef[..., 0] + (coef[..., 1:] * x[:, None, :]).sum(-1)  # (B, K)
        if not self.config.use_interactions:
            return base, main, main.new_zeros(B, K, K)
        v = self.id_ffm(elem) + torch.einsum("bkf,kfm->bkm", f, self.w_ffm)  # (B, K, K*d)
        v = v.view(B, K, K, self.d)  # v[b, k, l]: element of field k facing field l
        inter = (v * v.transpose(1, 2)).sum(-1)  # (B, K, K)
        inter = inter * (1 - torch.eye(K, dtype=inter.dtype))
        return base, main, inter

    def forward(self, ad, elem, feats, ctx) -> torch.Tensor:
        base, main, inter = self.parts(ad, elem, feats, ctx)
        return base + main.sum(1) + inter.sum((1, 2)) / 2


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

    def logit(self, ads: np.ndarray, combos: np.ndarray, ctx: np.ndarray | None = None):
        base, main, inter = self.parts(ads, combos, ctx)
        return base + main.sum(1) + inter.sum((1, 2)) / 2

    def ctr(self, ads: np.ndarray, combos: np.ndarray, ctx: np.ndarray | None = None):
        return 1.0 / (1.0 + np.exp(-self.logit(ads, combos, ctx)))

    def credit(self, ads: np.ndarray, combos: np.ndarray, ctx: np.ndarray | None = None):
        """Shapley credit per element (B, K): main effect plus half of each pairwise term.

        For a model with only main and pairwise terms this is the exact Shapley value, and it
        sums to the creative logit (logit minus base) row by row.
        """
        base, main, inter = self.parts(ads, combos, ctx)
        return base, main + inter.sum(-1) / 2

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
            main.append((m.id_main(elem) + f @ m.w_main[k]).numpy())  # (M_k, 1 + C)
            v = m.id_ffm(elem) + f @ m.w_ffm[k]
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
        )

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
        coef = m.id_main(self.elem_map) + torch.einsum("nf,nfc->nc", f, m.w_main[comp_t])
        main = coef[:, 0] + (coef[:, 1:] * x).sum(-1)  # (n_cat,)
        out = main.clone()
        if m.config.use_interactions:
            v = m.id_ffm(self.elem_map) + torch.einsum("nf,nfm->nm", f, m.w_ffm[comp_t])
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
    """Fit the reward model by weighted BCE with early stopping on a held-out split.

    init: a previous model to warm start from (same vocabulary), e.g. production.
    """
    config = config or RewardModelConfig()
    enc = impressions if isinstance(impressions, Encoded) else encode(impressions, catalog)
    if len(enc) == 0:
        raise ValueError("impressions: no rows to learn from")
    if enc.click.sum() == 0:
        raise ValueError("impressions: no clicks at all; a click model cannot be learned")
    if enc.click.sum() == len(enc):
        raise ValueError(
            "impressions: every impression was clicked; a click model cannot be learned"
        )
    vocab = Vocab.from_catalog(catalog, enc.context_columns)
    torch.manual_seed(config.seed)
    model = RewardModel(vocab, config)
    if init is not None:
        model.load_state_dict(init.state_dict())
    bound = BoundModel(model, catalog)
    tr, va, split = _split(enc, config)

    # Standardise features over each component's vocabulary and contexts over training rows.
    fit_scalers(model, catalog, enc.ctx[tr])
    with torch.no_grad():
        rate = float(enc.click[tr].mean())
        if init is None:
            model.bias.fill_(math.log(rate / (1 - rate)))

    def tensors(idx: np.ndarray):
        ad, elem, feats, x = bound._inputs(enc.ads[idx], enc.combos[idx], enc.ctx[idx])
        return ad, elem, feats, x, torch.as_tensor(enc.click[idx])

    train_t = tensors(tr)
    val_t = tensors(va) if len(va) else None
    weights = torch.ones(len(tr))
    if config.propensity_weighting:
        if enc.propensity is None:
            raise ValueError("propensity_weighting needs a 'propensity' column")
        w = 1.0 / enc.propensity[tr]
        weights = torch.as_tensor(np.minimum(w / w.mean(), config.max_weight), dtype=torch.float32)
    with torch.no_grad():
        seen = torch.zeros(model.n_elements + 1, dtype=torch.bool)
        seen[train_t[1].unique()] = True
        seen[model.n_elements] = False
        model.seen.copy_(seen)

    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    bce = nn.BCEWithLogitsLoss(reduction="none")
    g = torch.Generator().manual_seed(config.seed)
    best, best_loss, best_epoch, bad_epochs = None, float("inf"), 0, 0
    history: list[dict] = []
    t0 = time.perf_counter()
    from tqdm import tqdm

    bar = tqdm(range(config.epochs), desc="reward model", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(tr), generator=g)
        total = 0.0
        for s in range(0, len(tr), config.batch_size):
            b = perm[s : s + config.batch_size]
            ad, elem, feats, x, y = (t[b] for t in train_t)
            logit = model(ad, elem, feats, x)
            loss = (bce(logit, y) * weights[b]).mean()
            total += float(loss.detach()) * len(b)
            if config.l2_id:
                loss = loss + config.l2_id * (
                    model.id_main(elem).pow(2).sum()
                    + model.id_ffm(elem).pow(2).sum()
                    + model.appeal(ad).pow(2).sum()
                ) / len(b)
            if config.l2_dense:
                loss = loss + config.l2_dense * (
                    model.w_main.pow(2).sum() + model.w_ffm.pow(2).sum()
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        record = {"epoch": epoch + 1, "train_loss": total / len(tr)}
        if val_t is not None:
            model.eval()
            with torch.no_grad():
                ad, elem, feats, x, y = val_t
                record["val_loss"] = float(bce(model(ad, elem, feats, x), y).mean())
        history.append(record)
        bar.set_postfix({k: round(v, 5) for k, v in record.items() if k != "epoch"})
        score = record.get("val_loss", record["train_loss"])
        if score < best_loss - 1e-6:
            best, best_loss, best_epoch, bad_epochs = (
                copy.deepcopy(model.state_dict()),
                score,
                epoch + 1,
                0,
            )
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
    report = TrainReport(
        len(history), best_epoch, len(tr), len(va), split, time.perf_counter() - t0, history
    )
    return model, report
