"""What both models are trained on and bound to: the vocabulary, encoded impressions, scalers.

Vocab names ids in code order (ads, components, elements) plus the feature and context
columns; encode maps a validated impression table to those codes; the buffers and scalers
here are shared by the reward model and the generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from genco.data.contract import AD, CLICK, CONTEXT_PREFIX, PROPENSITY, TIMESTAMP, Catalog
from genco.data.ids import Ids
from genco.errors import CatalogMismatchError, ContractError


@dataclass(frozen=True)
class Vocab:
    """What the model was trained on: ids in code order, feature and context columns."""

    ads: Ids
    components: tuple[str, ...]
    elements: tuple[Ids, ...]
    feature_names: tuple[str, ...]
    context_columns: tuple[str, ...]

    def __post_init__(self) -> None:
        # ids in Arrow arrays, as the catalog's: no Python string per id once loaded
        if not isinstance(self.ads, Ids):
            object.__setattr__(self, "ads", Ids(self.ads))
        elements = tuple(e if isinstance(e, Ids) else Ids(e) for e in self.elements)
        object.__setattr__(self, "elements", elements)

    @staticmethod
    def from_catalog(catalog: Catalog, context_columns: tuple[str, ...]) -> Vocab:
        return Vocab(
            catalog.ads,
            catalog.components,
            catalog.elements,
            catalog.feature_names,
            context_columns,
        )

    def to_dict(self) -> dict:
        return {
            "ads": self.ads.tolist(),
            "components": list(self.components),
            "elements": [e.tolist() for e in self.elements],
            "feature_names": list(self.feature_names),
            "context_columns": list(self.context_columns),
        }

    @staticmethod
    def from_dict(d: dict) -> Vocab:
        return Vocab(
            Ids(d["ads"]),
            tuple(d["components"]),
            tuple(Ids(e) for e in d["elements"]),
            tuple(d["feature_names"]),
            tuple(d["context_columns"]),
        )


@dataclass
class Encoded:
    """Impressions in catalog codes, ready for tensors."""

    ads: np.ndarray  # (n,) int64
    combos: np.ndarray  # (n, K) int64
    ctx: np.ndarray  # (n, C) float32
    click: np.ndarray  # (n,) float32
    propensity: np.ndarray | None
    timestamp: np.ndarray | None
    context_columns: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.ads)

    def take(self, idx: np.ndarray) -> Encoded:
        return Encoded(
            self.ads[idx],
            self.combos[idx],
            self.ctx[idx],
            self.click[idx],
            None if self.propensity is None else self.propensity[idx],
            None if self.timestamp is None else self.timestamp[idx],
            self.context_columns,
        )


def encode(
    impressions: pd.DataFrame, catalog: Catalog, context_columns: tuple[str, ...] | None = None
) -> Encoded:
    """Map a validated impression table to catalog codes; errors name the column and value."""
    if len(impressions) == 0:
        raise ContractError("impressions: no rows to learn from")
    for col in (AD, *catalog.components, CLICK):
        if col not in impressions.columns:
            raise ContractError(f"impressions: missing column '{col}'")
    ads = catalog.ads.codes(impressions[AD].astype(str).to_numpy(dtype=object))
    if (ads < 0).any():
        bad = impressions[AD].astype(str).to_numpy()[np.flatnonzero(ads < 0)[0]]
        raise ContractError(f"impressions: ad_id '{bad}' is not in the catalog")
    combos = np.zeros((len(impressions), catalog.n_components), dtype=np.int64)
    for k, comp in enumerate(catalog.components):
        codes = catalog.elements[k].codes(impressions[comp].astype(str).to_numpy(dtype=object))
        if (codes < 0).any():
            bad = impressions[comp].astype(str).to_numpy()[np.flatnonzero(codes < 0)[0]]
            raise ContractError(f"impressions: {comp} '{bad}' is not an element of '{comp}'")
        combos[:, k] = codes
    if context_columns is None:
        context_columns = tuple(c for c in impressions.columns if c.startswith(CONTEXT_PREFIX))
    missing = [c for c in context_columns if c not in impressions.columns]
    if missing:
        raise ContractError(f"impressions: missing context column '{missing[0]}'")
    ctx = (
        impressions[list(context_columns)]
        .to_numpy(dtype=np.float32)
        .reshape(len(impressions), len(context_columns))
    )
    click = impressions[CLICK].to_numpy(dtype=np.float32)
    prop = impressions[PROPENSITY].to_numpy(np.float64) if PROPENSITY in impressions else None
    ts = impressions[TIMESTAMP].to_numpy(np.float64) if TIMESTAMP in impressions else None
    return Encoded(ads.astype(np.int64), combos, ctx, click, prop, ts, tuple(context_columns))


def id_map(model_ids: Ids, catalog_ids: Ids) -> np.ndarray:
    """(len(catalog_ids),) int64 code in the model's vocabulary of each catalog id, -1 where
    the model does not know it: one vectorized lookup (the same ids: no lookup at all)."""
    if model_ids is catalog_ids or model_ids == catalog_ids:
        return np.arange(len(catalog_ids), dtype=np.int64)
    return model_ids.codes(catalog_ids.array)


def register_vocab_buffers(module: nn.Module, vocab: Vocab) -> tuple[int, int, int]:
    """Buffers both models share: global element offsets and the feature/context scalers.

    Returns (K, F, C): components, element features, context columns.
    """
    K, F, C = len(vocab.components), len(vocab.feature_names), len(vocab.context_columns)
    sizes = [len(e) for e in vocab.elements]
    module.n_elements = sum(sizes)
    module.register_buffer("offsets", torch.tensor(np.cumsum([0, *sizes[:-1]]), dtype=torch.long))
    module.register_buffer("feat_mean", torch.zeros(K, max(F, 1)))
    module.register_buffer("feat_std", torch.ones(K, max(F, 1)))
    module.register_buffer("ctx_mean", torch.zeros(C))
    module.register_buffer("ctx_std", torch.ones(C))
    return K, F, C


@torch.no_grad()
def fit_scalers(module: nn.Module, catalog: Catalog, contexts: np.ndarray | None) -> None:
    """Standardise features over each component's vocabulary and contexts over given rows."""
    if len(catalog.feature_names):
        for k in range(catalog.n_components):
            f = torch.as_tensor(catalog.features[k], dtype=torch.float32)
            module.feat_mean[k] = f.mean(0)
            module.feat_std[k] = f.std(0, unbiased=False).clamp_min(1e-6)
    if contexts is not None and contexts.shape[1]:
        c = torch.tensor(np.asarray(contexts), dtype=torch.float32)
        module.ctx_mean.copy_(c.mean(0))
        module.ctx_std.copy_(c.std(0, unbiased=False).clamp_min(1e-6))


def check_catalog(vocab: Vocab, catalog: Catalog, who: str) -> None:
    """A model binds to a catalog only with the same components and feature columns."""
    if catalog.components != vocab.components:
        raise CatalogMismatchError(
            f"catalog components {list(catalog.components)} differ from the {who}'s "
            f"{list(vocab.components)}"
        )
    if catalog.feature_names != vocab.feature_names:
        raise CatalogMismatchError(
            f"catalog features {list(catalog.feature_names)} differ from the {who}'s "
            f"{list(vocab.feature_names)}"
        )
