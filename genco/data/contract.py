"""The data contract: catalog and constraints, loaded into compact integer-coded form.

Everything downstream (validation, simulator, models, serving) works on integer codes:
ads are coded by their position in ``Catalog.ads`` and elements by their position in the
component's vocabulary ``Catalog.elements[c]``. Ids are always strings on the way in and out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from genco.data import storage
from genco.data.ids import Candidates, Ids
from genco.errors import ContractError, UnknownIdError

AD = "ad_id"
COMPONENT = "component"
ELEMENT = "element_id"
CLICK = "click"
PROPENSITY = "propensity"
TIMESTAMP = "timestamp"
REVENUE = "revenue"
FEATURE_PREFIX = "feat_"
CONTEXT_PREFIX = "ctx_"
ANY_AD = "*"
# The served log (README "Served log"): one row per impression an ad server showed, as the
# recommend response gave it (``genco.inference.predictor.Served.log_fields``), plus a clicks
# file of impression ids; ``genco.data.served.join_served_log`` turns both into impressions.
IMPRESSION_ID = "impression_id"
MODEL_VERSION = "model_version"
SERVED_MODE = "mode"
SERVED_REQUIRED = (IMPRESSION_ID, MODEL_VERSION, AD, PROPENSITY)  # + one column per component
SERVED_OPTIONAL = (SERVED_MODE, TIMESTAMP)  # + ctx_*
CLICKS_COLUMNS = (IMPRESSION_ID, CLICK)
CONSTRAINT_COLUMNS = (AD, "component_a", "element_a", "component_b", "element_b")


def _fail(path: str, message: str) -> ContractError:
    return ContractError(f"{path}: {message}")


@dataclass(frozen=True, eq=False)
class Catalog:
    """Candidate elements of every ad, integer coded, held in arrays (no Python object per
    id or per row, so a 15M-row catalog fits in a few hundred MB).

    components: component names in order of first appearance (the generator's decoding order).
    ads: ad ids in order of first appearance (``Ids``: one Arrow string array, a sequence of
        str; codes through its hash index).
    elements[c]: vocabulary of element ids of component c (shared by all ads), an ``Ids``.
    features[c]: (n_elements[c], n_features) float64, the ``feat_*`` columns (zeros when absent).
    candidates[a][c]: sorted int64 codes of the elements ad a may show in component c
        (``Candidates``: one ragged array; ``candidates.component(c)`` gives them all at once).

    Built from tuples of str and nested tuples of arrays too (small catalogs, tests).
    """

    components: tuple[str, ...]
    ads: Ids
    elements: tuple[Ids, ...]
    feature_names: tuple[str, ...]
    features: tuple[np.ndarray, ...]
    candidates: Candidates

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "components", tuple(self.components))
        set_(self, "feature_names", tuple(self.feature_names))
        if not isinstance(self.ads, Ids):
            set_(self, "ads", Ids(self.ads))
        set_(self, "elements", tuple(e if isinstance(e, Ids) else Ids(e) for e in self.elements))
        if not isinstance(self.candidates, Candidates):
            set_(self, "candidates", Candidates.from_nested(self.candidates, len(self.components)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Catalog):
            return NotImplemented
        return (
            self.components == other.components
            and self.feature_names == other.feature_names
            and self.ads == other.ads
            and self.elements == other.elements
            and self.candidates == other.candidates
            and all(np.array_equal(a, b) for a, b in zip(self.features, other.features))
        )

    __hash__ = None  # type: ignore[assignment]

    @property
    def n_components(self) -> int:
        return len(self.components)

    @property
    def n_ads(self) -> int:
        return len(self.ads)

    @property
    def nbytes(self) -> int:
        """Bytes held by the catalog's arrays (and the hash indexes built so far)."""
        return (
            self.ads.nbytes
            + sum(e.nbytes for e in self.elements)
            + sum(f.nbytes for f in self.features)
            + self.candidates.nbytes
        )

    def ad_code(self, ad_id: str) -> int:
        """Code of an ad id; UnknownIdError with the id when it is not in the catalog."""
        code = self.ads.code(ad_id) if isinstance(ad_id, str) else -1
        if code < 0:
            raise UnknownIdError(f"ad_id '{ad_id}' is not in the catalog")
        return code

    def element_code(self, component: int, element_id: str) -> int:
        code = self.elements[component].code(element_id) if isinstance(element_id, str) else -1
        if code < 0:
            raise UnknownIdError(
                f"element '{element_id}' is not in component '{self.components[component]}'"
            )
        return code

    def has_element(self, component: int, element_id: str) -> bool:
        return element_id in self.elements[component]

    def n_combinations(self, ad: int) -> int:
        """Size of the ad's combination space before constraints."""
        return int(np.prod([len(c) for c in self.candidates[ad]], dtype=np.float64))

    def candidate_keys(self, component: int) -> np.ndarray:
        """Sorted int64 keys ``ad * n_elements + element`` of every (ad, candidate) pair."""
        ads, elems = self.candidates.component(component)
        return np.sort(ads * len(self.elements[component]) + elems)

    def to_arrow(self) -> pa.Table:
        """The catalog back in contract form (one row per ad x candidate, ad-major)."""
        K, cands = self.n_components, self.candidates
        sizes = np.diff(cands.offsets)  # (n_ads * K,) in (ad, component) order
        comp = np.tile(np.arange(K), self.n_ads).repeat(sizes)
        ad = np.arange(self.n_ads).repeat(sizes.reshape(self.n_ads, K).sum(1))
        elem_ids = pa.chunked_array(
            [self.elements[k].array.cast(pa.large_string()) for k in range(K)]
        ).combine_chunks()
        offsets = np.cumsum([0, *(len(e) for e in self.elements[:-1])])
        glob = offsets[comp] + cands.values  # position in the concatenated vocabularies
        cols = {
            AD: self.ads.array.take(pa.array(ad)),
            COMPONENT: pa.array(np.asarray(self.components, dtype=object)[comp], pa.string()),
            ELEMENT: elem_ids.take(pa.array(glob)).cast(pa.string()),
        }
        feats = np.concatenate(self.features) if K else np.zeros((0, 0))
        for j, name in enumerate(self.feature_names):
            cols[name] = pa.array(feats[glob, j])
        return pa.table(cols)

    def to_frame(self) -> pd.DataFrame:
        """The catalog back in contract form (one row per ad x candidate)."""
        return self.to_arrow().to_pandas()

    @staticmethod
    def from_arrow(table: pa.Table, path: str = "catalog") -> Catalog:
        """Build and validate a catalog from its contract table. Errors name path, row, value."""
        from genco.data.catalog_table import catalog_parts  # it reads this module's names

        p = catalog_parts(table, path)
        return Catalog(p.components, p.ads, p.elements, p.feature_names, p.features, p.candidates)

    @staticmethod
    def from_frame(df: pd.DataFrame, path: str = "catalog") -> Catalog:
        """Build and validate a catalog from its contract table. Errors name path, row, value."""
        df = df.copy(deep=False)
        for col in df.columns:  # ids as text; a mixed feature column as text, checked per row
            if col in (AD, COMPONENT, ELEMENT) or not pd.api.types.is_numeric_dtype(df[col]):
                df[col] = df[col].astype("string")
        return Catalog.from_arrow(pa.Table.from_pandas(df, preserve_index=False), path)


def code_maps(
    ads: Sequence[str],
    components: Sequence[str],
    elements: Sequence[Sequence[str]],
    catalog: Catalog,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Maps from ``catalog``'s codes to the codes of the same ids in (ads, components,
    elements): ad code map (n_ads,) and, per catalog component, an element code map."""
    ad_map = _code_map(ads, catalog.ads)
    elem_maps = [
        _code_map(elements[list(components).index(comp)], catalog.elements[k])
        for k, comp in enumerate(catalog.components)
    ]
    return ad_map, elem_maps


def _code_map(target: Sequence[str], ids: Ids) -> np.ndarray:
    """(len(ids),) code in ``target`` of each of ``ids``; KeyError naming one that is absent."""
    target = target if isinstance(target, Ids) else Ids(target)
    codes = target.codes(ids.array)
    if (codes < 0).any():
        raise KeyError(ids[int(np.flatnonzero(codes < 0)[0])])
    return codes


@dataclass(frozen=True)
class Constraints:
    """Forbidden element pairs, integer coded; ``ad == -1`` means every ad.

    Pairs are stored with ``comp_a < comp_b`` so that a pair is checked when its later
    component is decoded.
    """

    ad: np.ndarray  # (n_pairs,) int64
    comp_a: np.ndarray
    elem_a: np.ndarray
    comp_b: np.ndarray
    elem_b: np.ndarray

    @staticmethod
    def empty() -> Constraints:
        z = np.zeros(0, dtype=np.int64)
        return Constraints(z, z, z, z, z)

    def __len__(self) -> int:
        return len(self.ad)

    def to_frame(self, catalog: Catalog) -> pd.DataFrame:
        return pd.DataFrame(
            {
                AD: [ANY_AD if a < 0 else catalog.ads[a] for a in self.ad],
                "component_a": [catalog.components[c] for c in self.comp_a],
                "element_a": [catalog.elements[c][e] for c, e in zip(self.comp_a, self.elem_a)],
                "component_b": [catalog.components[c] for c in self.comp_b],
                "element_b": [catalog.elements[c][e] for c, e in zip(self.comp_b, self.elem_b)],
            }
        )

    def violations(self, ads: np.ndarray, combos: np.ndarray) -> np.ndarray:
        """Index of the first forbidden pair each combination contains, or -1 when legal.

        ads: (n,) ad codes; combos: (n, n_components) element codes. Pairs for every ad are
        tested one by one (a catalog has few); per-ad pairs, of which a large catalog has one
        or more per product, are found by binary search on sorted (ad, element_a) keys, so
        the cost grows with the rows, not with rows x pairs.
        """
        ads = np.asarray(ads, np.int64)
        combos = np.asarray(combos, np.int64)
        out = np.full(len(ads), len(self.ad), dtype=np.int64)  # len = none yet
        for i in np.flatnonzero(self.ad < 0):
            hit = (combos[:, self.comp_a[i]] == self.elem_a[i]) & (
                combos[:, self.comp_b[i]] == self.elem_b[i]
            )
            out[hit] = np.minimum(out[hit], i)
        for ca, cb, idx, keys in self._per_ad_index():
            ok = (ads >= 0) & (combos[:, ca] >= 0)
            q = np.where(ok, (ads << 32) | np.maximum(combos[:, ca], 0), -1)
            lo = np.searchsorted(keys, q, "left")
            n_match = np.searchsorted(keys, q, "right") - lo
            for r in range(int(n_match.max(initial=0))):
                rows = np.flatnonzero(n_match > r)
                at = idx[lo[rows] + r]
                hit = self.elem_b[at] == combos[rows, cb]
                rows, at = rows[hit], at[hit]
                out[rows] = np.minimum(out[rows], at)
        out[out == len(self.ad)] = -1
        return out

    def _per_ad_index(self) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
        """Per (component_a, component_b): the per-ad pairs' indices sorted by (ad, element_a,
        element_b) and their sorted keys ``ad << 32 | element_a``; built on first use."""
        cached = self.__dict__.get("_per_ad")
        if cached is None:
            cached = []
            per_ad = np.flatnonzero(self.ad >= 0)
            pairs = np.unique(np.stack([self.comp_a[per_ad], self.comp_b[per_ad]], 1), axis=0)
            for ca, cb in pairs:
                idx = per_ad[(self.comp_a[per_ad] == ca) & (self.comp_b[per_ad] == cb)]
                idx = idx[np.lexsort((self.elem_b[idx], self.elem_a[idx], self.ad[idx]))]
                keys = (self.ad[idx] << 32) | self.elem_a[idx]  # ad < 2^31, elements < 2^32
                cached.append((int(ca), int(cb), idx, keys))
            object.__setattr__(self, "_per_ad", cached)
        return cached

    def forbidden_after(
        self, ad: int, component: int, chosen: Sequence[int], n_elements: int
    ) -> np.ndarray:
        """Boolean (n_elements,) mask of component's elements forbidden by the earlier picks."""
        mask = np.zeros(n_elements, dtype=bool)
        sel = (self.comp_b == component) & ((self.ad < 0) | (self.ad == ad))
        for i in np.flatnonzero(sel):
            if chosen[self.comp_a[i]] == self.elem_a[i]:
                mask[self.elem_b[i]] = True
        return mask

    @staticmethod
    def from_frame(df: pd.DataFrame, catalog: Catalog, path: str = "constraints") -> Constraints:
        for col in CONSTRAINT_COLUMNS:
            if col not in df.columns:
                raise _fail(path, f"missing required column '{col}'")
        extra = [c for c in df.columns if c not in CONSTRAINT_COLUMNS]
        if extra:
            raise _fail(path, f"unexpected column '{extra[0]}'")
        return _constraints(df.astype("string"), catalog, path)


def _constraints(df: pd.DataFrame, catalog: Catalog, path: str) -> Constraints:
    """Code every row at once (the catalog's hash indexes); on a bad row, the row-by-row
    checks of the first one name it."""
    text = {c: df[c].to_numpy(dtype=object, na_value=None) for c in CONSTRAINT_COLUMNS}
    bad = np.zeros(len(df), bool)
    for c in CONSTRAINT_COLUMNS:
        bad |= df[c].isna().to_numpy() | (df[c].str.strip() == "").fillna(True).to_numpy()
    text = {c: np.where(bad, "", v) for c, v in text.items()}
    any_ad = text[AD] == ANY_AD
    ad = np.where(any_ad, -1, catalog.ads.codes(text[AD]))
    bad |= ~any_ad & (ad < 0)
    comp_index = {c: i for i, c in enumerate(catalog.components)}
    comp, elem = {}, {}
    for side in ("a", "b"):
        comp[side] = np.array([comp_index.get(c, -1) for c in text[f"component_{side}"]], np.int64)
        elem[side] = np.full(len(df), -1, np.int64)
        for k in range(catalog.n_components):
            rows = np.flatnonzero(comp[side] == k)
            elem[side][rows] = catalog.elements[k].codes(text[f"element_{side}"][rows])
        bad |= (comp[side] < 0) | (elem[side] < 0)
    bad |= comp["a"] == comp["b"]
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise _row_error(df.iloc[i], i + 1, catalog, comp_index, path)
    swap = comp["a"] > comp["b"]
    ca, cb = np.where(swap, comp["b"], comp["a"]), np.where(swap, comp["a"], comp["b"])
    ea, eb = np.where(swap, elem["b"], elem["a"]), np.where(swap, elem["a"], elem["b"])
    return Constraints(ad.astype(np.int64), ca, ea, cb, eb)


def _row_error(rec: pd.Series, i: int, catalog: Catalog, comp_index: dict, path: str):
    """The first failing check of one constraints row, as its ContractError."""
    ad, ca, ea, cb, eb = (None if pd.isna(rec[c]) else str(rec[c]) for c in CONSTRAINT_COLUMNS)
    for name, v in zip(CONSTRAINT_COLUMNS, (ad, ca, ea, cb, eb)):
        if v is None or v.strip() == "":
            return _fail(path, f"row {i}: column '{name}' is empty")
    if ad != ANY_AD and ad not in catalog.ads:
        return _fail(path, f"row {i}: ad_id '{ad}' is not in the catalog")
    for cname, ename, comp, elem in (
        ("component_a", "element_a", ca, ea),
        ("component_b", "element_b", cb, eb),
    ):
        if comp not in comp_index:
            return _fail(path, f"row {i}: {cname} '{comp}' is not a catalog component")
        if not catalog.has_element(comp_index[comp], elem):
            return _fail(path, f"row {i}: {ename} '{elem}' is not an element of component '{comp}'")
    return _fail(path, f"row {i}: component_a and component_b are both '{ca}'")


def load_catalog(path: str, client=None) -> Catalog:
    """Read and validate a catalog file (CSV or Parquet, local or gs://), with pyarrow
    directly: no pandas frame of the catalog's rows."""
    try:
        table = storage.read_arrow(path, client=client)
    except FileNotFoundError as exc:
        raise ContractError(f"{path}: file not found") from exc
    except (ValueError, OSError) as exc:  # the reader's (or storage's) word for a bad file
        raise ContractError(f"{path}: cannot read: {exc}") from exc
    catalog = Catalog.from_arrow(table, path)
    del table
    pa.default_memory_pool().release_unused()  # the file's table: back to the system now
    return catalog


def load_constraints(path: str | None, catalog: Catalog, client=None) -> Constraints:
    """Read and validate a constraints file; ``None`` means no constraints."""
    if path is None:
        return Constraints.empty()
    return Constraints.from_frame(_read_strings(path, client), catalog, path)


def _read_strings(path: str, client=None) -> pd.DataFrame:
    """Read a small table (constraints) with every id column as string (``0`` stays
    ``"0"``)."""
    try:
        if storage.table_format(path) == "csv":
            # Read everything as text; numeric columns are converted by the caller so that a
            # bad value can be reported with its row.
            return storage.read_table(path, client=client, dtype=str)
        df = storage.read_table(path, client=client)
    except FileNotFoundError as exc:
        raise ContractError(f"{path}: file not found") from exc
    except (ValueError, OSError) as exc:  # the reader's (or storage's) word for a bad file
        raise ContractError(f"{path}: cannot read: {exc}") from exc
    for col in (AD, COMPONENT, ELEMENT, *CONSTRAINT_COLUMNS):
        if col in df.columns:
            df[col] = df[col].astype("string")
    return df
