"""The data contract: catalog and constraints, loaded into compact integer-coded form.

Everything downstream (validation, simulator, models, serving) works on integer codes:
ads are coded by their position in ``Catalog.ads`` and elements by their position in the
component's vocabulary ``Catalog.elements[c]``. Ids are always strings on the way in and out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from genco.data import storage
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
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _fail(path: str, message: str) -> ContractError:
    return ContractError(f"{path}: {message}")


@dataclass(frozen=True)
class Catalog:
    """Candidate elements of every ad, integer coded.

    components: component names in order of first appearance (the generator's decoding order).
    ads: ad ids in order of first appearance.
    elements[c]: vocabulary of element ids of component c (shared by all ads).
    features[c]: (n_elements[c], n_features) float64, the ``feat_*`` columns (zeros when absent).
    candidates[a][c]: sorted int64 codes of the elements ad a may show in component c.
    """

    components: tuple[str, ...]
    ads: tuple[str, ...]
    elements: tuple[tuple[str, ...], ...]
    feature_names: tuple[str, ...]
    features: tuple[np.ndarray, ...]
    candidates: tuple[tuple[np.ndarray, ...], ...]
    _ad_index: dict[str, int] = field(repr=False, compare=False, default_factory=dict)
    _element_index: tuple[dict[str, int], ...] = field(
        repr=False, compare=False, default_factory=tuple
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ad_index", {a: i for i, a in enumerate(self.ads)})

    def _elements_index(self) -> tuple[dict[str, int], ...]:
        """Element id -> code per component, built on first use: at catalog scale (millions
        of elements) it is the catalog's largest structure, and bulk readers (ingest, batch
        recommend) look ids up in hash indexes of their own instead."""
        if not self._element_index:
            index = tuple({e: i for i, e in enumerate(v)} for v in self.elements)
            object.__setattr__(self, "_element_index", index)
        return self._element_index

    @property
    def n_components(self) -> int:
        return len(self.components)

    @property
    def n_ads(self) -> int:
        return len(self.ads)

    def ad_code(self, ad_id: str) -> int:
        """Code of an ad id; KeyError with the id when it is not in the catalog."""
        try:
            return self._ad_index[ad_id]
        except KeyError:
            raise UnknownIdError(f"ad_id '{ad_id}' is not in the catalog") from None

    def element_code(self, component: int, element_id: str) -> int:
        try:
            return self._elements_index()[component][element_id]
        except KeyError:
            raise UnknownIdError(
                f"element '{element_id}' is not in component '{self.components[component]}'"
            ) from None

    def has_element(self, component: int, element_id: str) -> bool:
        return element_id in self._elements_index()[component]

    def n_combinations(self, ad: int) -> int:
        """Size of the ad's combination space before constraints."""
        return int(np.prod([len(c) for c in self.candidates[ad]], dtype=np.float64))

    def candidate_keys(self, component: int) -> np.ndarray:
        """Sorted int64 keys ``ad * n_elements + element`` of every (ad, candidate) pair."""
        n = len(self.elements[component])
        keys = [a * n + cands[component] for a, cands in enumerate(self.candidates)]
        return np.sort(np.concatenate(keys)) if keys else np.zeros(0, np.int64)

    def to_frame(self) -> pd.DataFrame:
        """The catalog back in contract form (one row per ad x candidate)."""
        rows: list[tuple] = []
        for a, ad in enumerate(self.ads):
            for c, comp in enumerate(self.components):
                for e in self.candidates[a][c]:
                    rows.append((ad, comp, self.elements[c][e], *self.features[c][e].tolist()))
        cols = [AD, COMPONENT, ELEMENT, *self.feature_names]
        return pd.DataFrame(rows, columns=cols)

    @staticmethod
    def from_frame(df: pd.DataFrame, path: str = "catalog") -> Catalog:
        """Build and validate a catalog from its contract table. Errors name path, row, value."""
        ids = _checked_ids(df, path)
        feature_names, feats = _checked_features(df, path)
        components = tuple(pd.unique(ids[COMPONENT]))
        ads = tuple(pd.unique(ids[AD]))
        comp_code = pd.Categorical(ids[COMPONENT], categories=list(components)).codes
        ad_code = pd.Categorical(ids[AD], categories=list(ads)).codes
        elements, features, elem_codes = [], [], np.zeros(len(df), dtype=np.int64)
        for c in range(len(components)):
            rows = np.flatnonzero(comp_code == c)
            vocab, codes, f = _element_vocabulary(ids[ELEMENT].to_numpy()[rows], feats[rows])
            # The same element must carry the same features wherever it appears.
            mismatch = np.any(np.abs(f[codes] - feats[rows]) > 1e-9, axis=1)
            if mismatch.any():
                row = int(rows[np.flatnonzero(mismatch)[0]]) + 1
                raise _fail(
                    path,
                    f"row {row}: element '{ids[ELEMENT].iloc[row - 1]}' of component "
                    f"'{components[c]}' has features that differ from its earlier rows",
                )
            elem_codes[rows] = codes
            elements.append(vocab)
            features.append(f)
        candidates = _ad_candidates(ad_code, comp_code, elem_codes, len(ads), len(components))
        empty = [
            (a, c) for a, per in enumerate(candidates) for c, e in enumerate(per) if not len(e)
        ]
        if empty:
            a, c = empty[0]
            raise _fail(path, f"ad_id '{ads[a]}' has no candidate for component '{components[c]}'")
        return Catalog(
            components=components,
            ads=ads,
            elements=tuple(elements),
            feature_names=feature_names,
            features=tuple(features),
            candidates=tuple(candidates),
        )


def _checked_ids(df: pd.DataFrame, path: str) -> pd.DataFrame:
    """The id columns as strings, after the table-level checks: columns, empties, component
    names, duplicates."""
    for col in (AD, COMPONENT, ELEMENT):
        if col not in df.columns:
            raise _fail(path, f"missing required column '{col}'")
    if len(df) == 0:
        raise _fail(path, "file has no rows")
    extra = [
        c
        for c in df.columns
        if c not in (AD, COMPONENT, ELEMENT) and not c.startswith(FEATURE_PREFIX)
    ]
    if extra:
        raise _fail(
            path,
            f"unexpected column '{extra[0]}' (allowed: ad_id, component, element_id, feat_*)",
        )
    ids = df[[AD, COMPONENT, ELEMENT]].astype("string")
    for col in (AD, COMPONENT, ELEMENT):
        empty = ids[col].isna() | (ids[col].str.strip() == "")
        if empty.any():
            row = int(np.flatnonzero(empty.to_numpy())[0]) + 1
            raise _fail(path, f"row {row}: column '{col}' is empty")
    bad_comp = ~ids[COMPONENT].str.match(_NAME_RE.pattern)
    if bad_comp.any():
        row = int(np.flatnonzero(bad_comp.to_numpy())[0]) + 1
        raise _fail(
            path,
            f"row {row}: component '{ids[COMPONENT].iloc[row - 1]}' must be a column-safe "
            "name (letters, digits, underscore; not starting with a digit)",
        )
    reserved = {AD, CLICK, PROPENSITY, TIMESTAMP, REVENUE, "rank", "score"}
    for comp in ids[COMPONENT].unique():
        if comp in reserved or comp.startswith((CONTEXT_PREFIX, FEATURE_PREFIX)):
            raise _fail(path, f"component '{comp}' clashes with a contract column name")
    dup = ids.duplicated(keep="first")
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0]) + 1
        r = ids.iloc[row - 1]
        raise _fail(
            path,
            f"row {row}: duplicate candidate (ad_id '{r[AD]}', component '{r[COMPONENT]}', "
            f"element_id '{r[ELEMENT]}')",
        )
    return ids


def _checked_features(df: pd.DataFrame, path: str) -> tuple[tuple[str, ...], np.ndarray]:
    """The ``feat_*`` column names and values, (n_rows, n_features) float64, all finite."""
    feature_names = tuple(c for c in df.columns if c.startswith(FEATURE_PREFIX))
    feats = np.zeros((len(df), len(feature_names)), dtype=np.float64)
    for j, col in enumerate(feature_names):
        raw = df[col]
        num = pd.to_numeric(raw, errors="coerce")
        bad = num.isna() | ~np.isfinite(num.to_numpy(dtype=np.float64, na_value=np.nan))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0]) + 1
            raise _fail(
                path, f"row {row}: column '{col}' value '{raw.iloc[row - 1]}' is not numeric"
            )
        feats[:, j] = num.to_numpy(dtype=np.float64)
    return feature_names, feats


def _element_vocabulary(
    element_ids: np.ndarray, feats: np.ndarray
) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """One component's rows -> (vocabulary in first-appearance order, each row's element code,
    (n_elements, n_features) features of each element's first row).

    First-appearance order keeps codes stable for a given file."""
    vocab, inv = np.unique(element_ids.astype(str), return_inverse=True)
    first = np.full(len(vocab), len(element_ids), dtype=np.int64)
    np.minimum.at(first, inv, np.arange(len(element_ids)))
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    f = np.zeros((len(vocab), feats.shape[1]), dtype=np.float64)
    f[rank] = feats[first]
    return tuple(vocab[order].tolist()), rank[inv], f


def _ad_candidates(
    ad_code: np.ndarray, comp_code: np.ndarray, elem_codes: np.ndarray, n_ads: int, n_comp: int
) -> tuple[tuple[np.ndarray, ...], ...]:
    """Rows -> per ad, per component, the sorted element codes (empty where it has none): one
    sort of the rows by (ad, component, element), then slices, so the cost grows with the
    rows, not with ads x rows."""
    order = np.lexsort((elem_codes, comp_code, ad_code))
    key = ad_code[order].astype(np.int64) * n_comp + comp_code[order]
    bounds = np.searchsorted(key, np.arange(n_ads * n_comp + 1))
    codes = elem_codes[order]
    return tuple(
        tuple(codes[bounds[a * n_comp + c] : bounds[a * n_comp + c + 1]] for c in range(n_comp))
        for a in range(n_ads)
    )


def code_maps(
    ads: Sequence[str],
    components: Sequence[str],
    elements: Sequence[Sequence[str]],
    catalog: Catalog,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Maps from ``catalog``'s codes to the codes of the same ids in (ads, components,
    elements): ad code map (n_ads,) and, per catalog component, an element code map."""
    ad_index = {a: i for i, a in enumerate(ads)}
    ad_map = np.array([ad_index[a] for a in catalog.ads], dtype=np.int64)
    elem_maps = []
    for k, comp in enumerate(catalog.components):
        index = {e: i for i, e in enumerate(elements[list(components).index(comp)])}
        elem_maps.append(np.array([index[e] for e in catalog.elements[k]], dtype=np.int64))
    return ad_map, elem_maps


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
        cols: dict[str, list[int]] = {k: [] for k in ("ad", "ca", "ea", "cb", "eb")}
        comp_index = {c: i for i, c in enumerate(catalog.components)}
        for i, rec in enumerate(df.astype("string").itertuples(index=False), start=1):
            ad, ca, ea, cb, eb = (None if pd.isna(v) else str(v) for v in rec)
            for name, v in zip(CONSTRAINT_COLUMNS, (ad, ca, ea, cb, eb)):
                if v is None or v.strip() == "":
                    raise _fail(path, f"row {i}: column '{name}' is empty")
            if ad == ANY_AD:
                a = -1
            elif ad in catalog._ad_index:
                a = catalog._ad_index[ad]
            else:
                raise _fail(path, f"row {i}: ad_id '{ad}' is not in the catalog")
            codes = []
            for cname, ename, comp, elem in (
                ("component_a", "element_a", ca, ea),
                ("component_b", "element_b", cb, eb),
            ):
                if comp not in comp_index:
                    raise _fail(path, f"row {i}: {cname} '{comp}' is not a catalog component")
                c = comp_index[comp]
                if not catalog.has_element(c, elem):
                    raise _fail(
                        path, f"row {i}: {ename} '{elem}' is not an element of component '{comp}'"
                    )
                codes.append((c, catalog.element_code(c, elem)))
            (c1, e1), (c2, e2) = codes
            if c1 == c2:
                raise _fail(path, f"row {i}: component_a and component_b are both '{ca}'")
            if c1 > c2:
                (c1, e1), (c2, e2) = (c2, e2), (c1, e1)
            for k, v in zip(cols, (a, c1, e1, c2, e2)):
                cols[k].append(v)
        arr = {k: np.asarray(v, dtype=np.int64) for k, v in cols.items()}
        return Constraints(arr["ad"], arr["ca"], arr["ea"], arr["cb"], arr["eb"])


def load_catalog(path: str, client=None) -> Catalog:
    """Read and validate a catalog file (CSV or Parquet, local or gs://)."""
    return Catalog.from_frame(_read_strings(path, client), path)


def load_constraints(path: str | None, catalog: Catalog, client=None) -> Constraints:
    """Read and validate a constraints file; ``None`` means no constraints."""
    if path is None:
        return Constraints.empty()
    return Constraints.from_frame(_read_strings(path, client), catalog, path)


def _read_strings(path: str, client=None) -> pd.DataFrame:
    """Read a small table with every id column as string (``0`` stays ``"0"``)."""
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
