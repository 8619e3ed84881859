"""A catalog table (Arrow) checked and coded column by column, with no per-row Python object.

The checks and their messages are the contract's (README "Data contract"): path, row (1-based)
and value. Ids are coded by Arrow's dictionary encoding, which numbers values in order of
first appearance: ads, components, and each component's elements keep the codes they had
when the catalog was a pandas frame. One sort of the rows by (ad, component, element) finds
duplicates and lays out every ad's candidates as one ragged array.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from genco.data.contract import (
    AD,
    CLICK,
    COMPONENT,
    CONTEXT_PREFIX,
    ELEMENT,
    FEATURE_PREFIX,
    PROPENSITY,
    REVENUE,
    TIMESTAMP,
)
from genco.data.ids import Candidates, Ids
from genco.errors import ContractError

RESERVED = {AD, CLICK, PROPENSITY, TIMESTAMP, REVENUE, "rank", "score"}
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# What pandas.to_numeric accepts as a finite number, after trimming whitespace.
_NUMBER = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"


@dataclass(frozen=True)
class CatalogParts:
    components: tuple[str, ...]
    ads: Ids
    elements: tuple[Ids, ...]
    feature_names: tuple[str, ...]
    features: tuple[np.ndarray, ...]
    candidates: Candidates


def _fail(path: str, message: str) -> ContractError:
    return ContractError(f"{path}: {message}")


def _first(mask: np.ndarray) -> int:
    """1-based row of the first True."""
    return int(np.flatnonzero(mask)[0]) + 1


def _bools(a: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(pc.fill_null(a, False).to_numpy(zero_copy_only=False), bool)


def _string_column(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """The column as text, chunks kept (no copy): ids given as numbers become their text
    (``0`` -> ``"0"``)."""
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = pc.cast(col, pa.string())
    return col


def _dictionary(col: pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """(distinct values in order of first appearance, (n,) int32 code of each row). Arrow
    encodes a chunked column with one dictionary for all its chunks."""
    enc = pc.dictionary_encode(col)
    dictionary = enc.chunk(0).dictionary if enc.num_chunks else pa.array([], pa.string())
    codes = [c.indices.to_numpy(zero_copy_only=False) for c in enc.chunks]
    return dictionary, np.concatenate(codes).astype(np.int32) if codes else np.zeros(0, np.int32)


def _checked_table(table: pa.Table, path: str) -> dict[str, pa.ChunkedArray]:
    """The id columns as strings, after the table-level checks: columns, rows, empties."""
    for col in (AD, COMPONENT, ELEMENT):
        if col not in table.column_names:
            raise _fail(path, f"missing required column '{col}'")
    if table.num_rows == 0:
        raise _fail(path, "file has no rows")
    extra = [
        c
        for c in table.column_names
        if c not in (AD, COMPONENT, ELEMENT) and not c.startswith(FEATURE_PREFIX)
    ]
    if extra:
        raise _fail(
            path,
            f"unexpected column '{extra[0]}' (allowed: ad_id, component, element_id, feat_*)",
        )
    ids = {}
    for col in (AD, COMPONENT, ELEMENT):
        ids[col] = _string_column(table.column(col))
        empty = pc.or_kleene(pc.is_null(ids[col]), pc.equal(pc.utf8_trim_whitespace(ids[col]), ""))
        if pc.any(empty).as_py():
            raise _fail(path, f"row {_first(_bools(empty))}: column '{col}' is empty")
    return ids


def _checked_components(col: pa.Array, path: str) -> tuple[tuple[str, ...], np.ndarray]:
    dictionary, codes = _dictionary(col)
    components = tuple(dictionary.to_pylist())
    bad = [i for i, c in enumerate(components) if not NAME_RE.match(c)]
    if bad:
        row = _first(np.isin(codes, bad))
        raise _fail(
            path,
            f"row {row}: component '{components[codes[row - 1]]}' must be a column-safe "
            "name (letters, digits, underscore; not starting with a digit)",
        )
    for comp in components:
        if comp in RESERVED or comp.startswith((CONTEXT_PREFIX, FEATURE_PREFIX)):
            raise _fail(path, f"component '{comp}' clashes with a contract column name")
    return components, codes


def _numeric(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(n,) float64 values and (n,) bool "not a finite number" of one feature column."""
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        text = pc.utf8_trim_whitespace(col)
        matched = pc.match_substring_regex(text, _NUMBER)
        ok = _bools(matched)
        num = pc.cast(pc.if_else(pc.fill_null(matched, False), text, "0"), pa.float64())
    else:
        num = pc.cast(col, pa.float64())
        ok = ~_bools(pc.is_null(num))
    values = np.array(num.to_numpy(zero_copy_only=False), dtype=np.float64)  # writable copy
    values[~ok] = 0.0
    return values, ~ok | ~np.isfinite(values)


def _checked_features(
    table: pa.Table, path: str, per_component: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
) -> tuple[tuple[str, ...], list[np.ndarray], list[np.ndarray]]:
    """The ``feat_*`` column names, each component's (n_elements, n_features) float64 features
    (an element's first row's) and each component's rows whose features differ from their
    element's first row. A column at a time: never an (n_rows, n_features) matrix.

    per_component[c]: (rows of component c, their element codes, first row of each element
    among those rows)."""
    names = tuple(c for c in table.column_names if c.startswith(FEATURE_PREFIX))
    features = [np.zeros((len(first), len(names))) for _, _, first in per_component]
    mismatch = [np.zeros(len(rows), bool) for rows, _, _ in per_component]
    for j, name in enumerate(names):
        values, bad = _numeric(table.column(name))
        if bad.any():
            row = _first(bad)
            raw = table.column(name)[row - 1].as_py()
            raise _fail(
                path,
                f"row {row}: column '{name}' value '{'nan' if raw is None else raw}' is not "
                "numeric",
            )
        for c, (rows, codes, first) in enumerate(per_component):
            v = values[rows]
            features[c][:, j] = v[first]
            # The same element must carry the same features wherever it appears.
            mismatch[c] |= np.abs(v - features[c][codes, j]) > 1e-9
        del values, bad
    return names, features, mismatch


def catalog_parts(table: pa.Table, path: str) -> CatalogParts:
    """Check and code a catalog table; errors name path, row and value."""
    ids = _checked_table(table, path)
    components, comp_code = _checked_components(ids[COMPONENT], path)
    ad_dict, ad_code = _dictionary(ids[AD])
    elements: list[Ids] = []
    per_component = []
    elem_code = np.zeros(table.num_rows, np.int32 if table.num_rows < 2**31 else np.int64)
    for c in range(len(components)):
        rows = np.flatnonzero(comp_code == c)
        vocab, codes = _dictionary(ids[ELEMENT].take(pa.array(rows)))
        elem_code[rows] = codes
        _, first = np.unique(codes, return_index=True)  # each element's first row
        per_component.append((rows, codes, first))
        elements.append(Ids(vocab))
    # (ad, component, element) order, rows in file order within a key (lexsort is stable)
    order = np.lexsort((elem_code, comp_code, ad_code))
    same = ad_code[order[1:]] == ad_code[order[:-1]]
    same &= comp_code[order[1:]] == comp_code[order[:-1]]
    same &= elem_code[order[1:]] == elem_code[order[:-1]]
    if same.any():
        row = int(order[1:][same].min()) + 1
        ad, comp, elem = (ids[c][row - 1].as_py() for c in (AD, COMPONENT, ELEMENT))
        raise _fail(
            path,
            f"row {row}: duplicate candidate (ad_id '{ad}', component '{comp}', "
            f"element_id '{elem}')",
        )
    del same
    feature_names, features, mismatch = _checked_features(table, path, per_component)
    for c, (rows, _, _) in enumerate(per_component):
        if mismatch[c].any():
            row = int(rows[np.flatnonzero(mismatch[c])[0]]) + 1
            raise _fail(
                path,
                f"row {row}: element '{ids[ELEMENT][row - 1].as_py()}' of component "
                f"'{components[c]}' has features that differ from its earlier rows",
            )
    del per_component, mismatch
    n_ads, K = len(ad_dict), len(components)
    key = ad_code[order].astype(np.int64) * K + comp_code[order]
    offsets = np.searchsorted(key, np.arange(n_ads * K + 1))
    del key
    empty = np.flatnonzero(np.diff(offsets) == 0)
    if len(empty):
        a, c = divmod(int(empty[0]), K)
        raise _fail(
            path, f"ad_id '{ad_dict[a].as_py()}' has no candidate for component '{components[c]}'"
        )
    return CatalogParts(
        components=components,
        ads=Ids(ad_dict),
        elements=tuple(elements),
        feature_names=feature_names,
        features=tuple(features),
        candidates=Candidates(offsets, elem_code[order], K),
    )
