"""The contract checks of an impression log: its header once, then its rows chunk by chunk.

``check_header`` fails the whole file (a missing or unexpected column); ``RowValidator``
flags each bad row with the first reason it fails (``REASONS``, in checking order) so that
ingest can quarantine it with its original values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from genco.data.contract import (
    AD,
    CLICK,
    CONTEXT_PREFIX,
    PROPENSITY,
    REVENUE,
    TIMESTAMP,
    Catalog,
    Constraints,
)
from genco.data.readers import MARKED, as_float, as_ids, shown, timestamps
from genco.errors import ContractError

REASONS = (
    "malformed_row",  # found by the reader (a row that does not parse), never by RowValidator
    "bad_encoding",
    "missing_value",
    "unknown_ad",
    "unknown_element",
    "wrong_component",
    "not_a_candidate",
    "bad_click",
    "bad_propensity",
    "bad_context",
    "bad_timestamp",
    "bad_revenue",
    "illegal_combination",
    "duplicate",
)

# Timestamps before this are a unit or parsing mistake, not an impression (2000-01-01 UTC).
EARLIEST_TIMESTAMP = 946_684_800.0
# Allowed clock skew of a logger ahead of this run's clock.
FUTURE_SLACK_SECONDS = 86_400.0


@dataclass(frozen=True)
class Layout:
    """Which contract columns a log has (decided once from its header)."""

    columns: tuple[str, ...]
    components: tuple[str, ...]
    contexts: tuple[str, ...]
    has_propensity: bool
    has_timestamp: bool
    has_revenue: bool

    def valid_schema(self) -> pa.Schema:
        fields = [pa.field(AD, pa.string())]
        fields += [pa.field(c, pa.string()) for c in self.components]
        fields.append(pa.field(CLICK, pa.int8()))
        if self.has_propensity:
            fields.append(pa.field(PROPENSITY, pa.float64()))
        if self.has_timestamp:
            fields.append(pa.field(TIMESTAMP, pa.float64()))
        fields += [pa.field(c, pa.float64()) for c in self.contexts]
        if self.has_revenue:
            fields.append(pa.field(REVENUE, pa.float64()))
        return pa.schema(fields)


def check_header(columns: list[str], catalog: Catalog, path: str) -> Layout:
    """Whole-file column checks: fail at once, naming the file and the column."""
    required = [AD, *catalog.components, CLICK]
    for col in required:
        if col not in columns:
            what = "component column" if col in catalog.components else "column"
            raise ContractError(f"{path}: missing required {what} '{col}'")
    optional = {PROPENSITY, TIMESTAMP, REVENUE}
    for col in columns:
        if col not in required and col not in optional and not col.startswith(CONTEXT_PREFIX):
            raise ContractError(
                f"{path}: unexpected column '{col}': not a catalog component "
                f"({', '.join(catalog.components)}) nor a contract column "
                "(ad_id, click, propensity, timestamp, revenue, ctx_*)"
            )
    if len(set(columns)) != len(columns):
        dup = next(c for c in columns if columns.count(c) > 1)
        raise ContractError(f"{path}: column '{dup}' appears twice")
    return Layout(
        columns=tuple(columns),
        components=catalog.components,
        contexts=tuple(c for c in columns if c.startswith(CONTEXT_PREFIX)),
        has_propensity=PROPENSITY in columns,
        has_timestamp=TIMESTAMP in columns,
        has_revenue=REVENUE in columns,
    )


class SeenHashes:
    """Set of 64-bit row hashes kept as sorted runs, merged like a binary counter.

    8 bytes per distinct row: the one piece of ingest state that grows with the log.
    """

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []

    def contains(self, h: np.ndarray) -> np.ndarray:
        """h must be sorted (searchsorted is much faster on sorted needles)."""
        out = np.zeros(len(h), dtype=bool)
        for run in self.runs:
            i = np.minimum(np.searchsorted(run, h), len(run) - 1)
            out |= run[i] == h
        return out

    def add(self, h: np.ndarray) -> None:
        """h: sorted, distinct, and disjoint from the set."""
        run = h
        while self.runs and len(self.runs[-1]) <= 2 * len(run):
            # Two sorted runs: the stable sort (timsort) merges them in linear time.
            run = np.sort(np.concatenate([self.runs.pop(), run]), kind="stable")
        self.runs.append(run)


def _mix(h: np.ndarray, v: np.ndarray) -> np.ndarray:
    """splitmix64-style combine of a running row hash with one int64/uint64 column."""
    x = (h ^ v.astype(np.uint64)) * np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(31)
    return x * np.uint64(0xBF58476D1CE4E5B9)


class ChunkCheck:
    """Runs the row checks on one chunk and records the first failure of each row."""

    def __init__(self, n: int) -> None:
        self.reason = np.full(n, -1, dtype=np.int16)
        self.message = np.empty(n, dtype=object)

    def flag(self, reason: str, bad: np.ndarray, fmt: Callable[[np.ndarray], list[str]]) -> None:
        new = np.flatnonzero(bad & (self.reason < 0))
        if len(new):
            self.reason[new] = REASONS.index(reason)
            self.message[new] = fmt(new)

    @property
    def ok(self) -> np.ndarray:
        return self.reason < 0


def _allowed(catalog: Catalog, c: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Vectorized test "element e is a candidate of ad a" for component c (-1 codes fail).

    A dense (ads x elements) table when it fits in 64 MiB, else sorted keys + searchsorted.
    """
    n_el = len(catalog.elements[c])
    keys = catalog.candidate_keys(c)
    if catalog.n_ads * n_el <= 1 << 26:
        table = np.zeros(catalog.n_ads * n_el + 1, dtype=bool)  # last slot: unknown codes
        table[keys] = True

        def dense(a: np.ndarray, e: np.ndarray) -> np.ndarray:
            return table[np.where((a >= 0) & (e >= 0), a * n_el + e, len(table) - 1)]

        return dense

    def sparse(a: np.ndarray, e: np.ndarray) -> np.ndarray:
        key = np.where((a >= 0) & (e >= 0), a * n_el + e, -1)
        pos = np.minimum(np.searchsorted(keys, key), len(keys) - 1)
        return keys[pos] == key

    return sparse


class RowValidator:
    """Per-run state: catalog lookups built once, duplicate hashes across chunks."""

    def __init__(
        self,
        catalog: Catalog,
        constraints: Constraints,
        layout: Layout,
        check_dups: bool,
        now: float,
    ) -> None:
        """now: this run's clock, epoch seconds; timestamps after now + 1 day are bad."""
        self.catalog = catalog
        self.constraints = constraints
        self.layout = layout
        # The catalog's own hash indexes (built once, kept by the catalog for later readers)
        self.ads = catalog.ads.hash_index
        self.vocab = [v.hash_index for v in catalog.elements]
        self.allowed = [_allowed(catalog, c) for c in range(catalog.n_components)]
        self.seen = SeenHashes() if check_dups else None
        self.latest = now + FUTURE_SLACK_SECONDS

    def check(self, t: pa.Table, marked: bool = False) -> tuple[ChunkCheck, dict[str, np.ndarray]]:
        """Flag every bad row of one chunk (first failing reason wins, in ``REASONS`` order)
        and return the parsed numeric columns of the chunk. marked: the reader replaced
        invalid UTF-8 in or before this chunk, so look for its markers."""
        col = self._columns(t)
        ck = ChunkCheck(t.num_rows)
        if marked:
            self._flag_encoding(ck, col)
        self._flag_missing(ck, col)
        ad = self._flag_unknown_ads(ck, col)
        combos = self._flag_elements(ck, col, ad)
        values = self._flag_values(ck, col)
        if len(self.constraints):
            self._flag_forbidden_pairs(ck, ad, combos)
        if self.seen is not None:
            self._flag_duplicates(ck, ad, combos, values)
        return ck, values

    # ------------------------------------------------------------------ steps

    def _columns(self, t: pa.Table) -> dict[str, pa.Array]:
        col = {name: t.column(name).combine_chunks() for name in self.layout.columns}
        for name in (AD, *self.layout.components):
            col[name] = as_ids(col[name])
        return col

    @staticmethod
    def _raw(col: dict[str, pa.Array], name: str) -> Callable[[np.ndarray], list[str]]:
        return lambda idx: shown(col[name], idx)

    def _flag_encoding(self, ck: ChunkCheck, col: dict[str, pa.Array]) -> None:
        for name in self.layout.columns:
            c = col[name]
            if not pa.types.is_string(c.type):
                continue
            hit = pc.fill_null(pc.match_substring_regex(c, MARKED), False)
            ck.flag(
                "bad_encoding",
                hit.to_numpy(zero_copy_only=False),
                lambda idx, name=name: [
                    f"{name} '{v}' is not valid UTF-8" for v in shown(col[name], idx)
                ],
            )

    def _flag_missing(self, ck: ChunkCheck, col: dict[str, pa.Array]) -> None:
        for name in (AD, *self.layout.components, CLICK):
            c = col[name]
            if pa.types.is_string(c.type):
                empty = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(c), ""), True)
            else:
                empty = pc.is_null(c)
            ck.flag(
                "missing_value",
                empty.to_numpy(zero_copy_only=False),
                lambda idx, name=name: [f"column '{name}' is empty"] * len(idx),
            )

    def _flag_unknown_ads(self, ck: ChunkCheck, col: dict[str, pa.Array]) -> np.ndarray:
        """Ad codes, (n,) int64, -1 where the ad is not in the catalog."""
        raw = self._raw(col, AD)
        ad = self.ads(col[AD])
        ck.flag(
            "unknown_ad",
            ad < 0,
            lambda idx: [f"ad_id '{v}' is not in the catalog" for v in raw(idx)],
        )
        return ad

    def _flag_elements(
        self, ck: ChunkCheck, col: dict[str, pa.Array], ad: np.ndarray
    ) -> np.ndarray:
        """Element codes, (n, n_components) int64, -1 where unknown to the component."""
        cat = self.catalog
        combos = np.zeros((len(ad), cat.n_components), dtype=np.int64)
        raw_ad = self._raw(col, AD)
        for c, comp in enumerate(self.layout.components):
            e = self.vocab[c](col[comp])
            combos[:, c] = e
            if (e < 0).any():
                self._flag_unknown_elements(ck, col, c, e < 0)
            raw = self._raw(col, comp)
            ck.flag(
                "not_a_candidate",
                ~self.allowed[c](ad, e),
                lambda idx, comp=comp, raw=raw: [
                    f"{comp} '{v}' is not a candidate of ad '{a}'"
                    for v, a in zip(raw(idx), raw_ad(idx))
                ],
            )
        return combos

    def _flag_unknown_elements(
        self, ck: ChunkCheck, col: dict[str, pa.Array], c: int, unknown: np.ndarray
    ) -> None:
        """An element unknown to component c: unknown anywhere, or another component's."""
        cat = self.catalog
        comp = cat.components[c]
        raw = self._raw(col, comp)
        elsewhere = np.full(len(unknown), -1, dtype=np.int64)
        for c2 in range(cat.n_components):
            if c2 == c:
                continue
            hit = self.vocab[c2](col[comp]) >= 0
            elsewhere[(elsewhere < 0) & hit & unknown] = c2
        ck.flag(
            "unknown_element",
            unknown & (elsewhere < 0),
            lambda idx: [f"{comp} '{v}' is not an element of any component" for v in raw(idx)],
        )
        ck.flag(
            "wrong_component",
            unknown,
            lambda idx: [
                f"{comp} '{v}' is an element of component "
                f"'{cat.components[elsewhere[i]]}', not '{comp}'"
                for i, v in zip(idx, raw(idx))
            ],
        )

    def _flag_values(self, ck: ChunkCheck, col: dict[str, pa.Array]) -> dict[str, np.ndarray]:
        """Click, propensity, contexts, timestamp and revenue, parsed (NaN where invalid)."""
        lay = self.layout
        click = as_float(col[CLICK])
        self._flag_numbers(ck, col, CLICK, ~((click == 0) | (click == 1)), "is not 0 or 1")
        values: dict[str, np.ndarray] = {CLICK: np.nan_to_num(click).astype(np.int8)}
        if lay.has_propensity:
            p = as_float(col[PROPENSITY])
            self._flag_numbers(ck, col, PROPENSITY, ~((p > 0) & (p <= 1)), "is not in (0, 1]")
            values[PROPENSITY] = p
        for name in lay.contexts:
            x = as_float(col[name])
            self._flag_numbers(ck, col, name, np.isnan(x), "is not numeric")
            values[name] = x
        if lay.has_timestamp:
            ts = timestamps(col[TIMESTAMP])
            why = "is neither epoch seconds nor ISO-8601"
            self._flag_numbers(ck, col, TIMESTAMP, np.isnan(ts), why)
            latest = datetime.fromtimestamp(self.latest, UTC)
            why = (
                "is outside 2000-01-01 .. now + 1 day "
                f"({latest.isoformat(timespec='seconds').replace('+00:00', 'Z')})"
            )
            out = ~np.isnan(ts) & ((ts < EARLIEST_TIMESTAMP) | (ts > self.latest))
            self._flag_numbers(ck, col, TIMESTAMP, out, why)
            values[TIMESTAMP] = ts
        if lay.has_revenue:
            r = as_float(col[REVENUE])
            self._flag_numbers(ck, col, REVENUE, ~(r >= 0), "is not a number >= 0")
            values[REVENUE] = r
        return values

    def _flag_numbers(
        self, ck: ChunkCheck, col: dict[str, pa.Array], name: str, bad: np.ndarray, why: str
    ) -> None:
        reason = "bad_context" if name.startswith(CONTEXT_PREFIX) else f"bad_{name}"
        raw = self._raw(col, name)
        ck.flag(reason, bad, lambda idx: [f"{name} '{v}' {why}" for v in raw(idx)])

    def _flag_forbidden_pairs(self, ck: ChunkCheck, ad: np.ndarray, combos: np.ndarray) -> None:
        cat, cons = self.catalog, self.constraints
        live = np.flatnonzero(ck.ok)
        viol = np.full(len(ad), -1, dtype=np.int64)
        viol[live] = cons.violations(ad[live], combos[live])

        def fmt_pair(idx: np.ndarray) -> list[str]:
            out = []
            for i in idx:
                k = viol[i]
                ca, cb = cons.comp_a[k], cons.comp_b[k]
                out.append(
                    f"illegal combination: {cat.components[ca]} "
                    f"'{cat.elements[ca][cons.elem_a[k]]}' with {cat.components[cb]} "
                    f"'{cat.elements[cb][cons.elem_b[k]]}' is forbidden"
                )
            return out

        ck.flag("illegal_combination", viol >= 0, fmt_pair)

    def _flag_duplicates(
        self, ck: ChunkCheck, ad: np.ndarray, combos: np.ndarray, values: dict[str, np.ndarray]
    ) -> None:
        """Rows identical to an earlier live row, in this chunk or any earlier one."""
        h = _mix(np.zeros(len(ad), dtype=np.uint64), ad)
        for c in range(self.catalog.n_components):
            h = _mix(h, combos[:, c])
        for v in values.values():
            h = _mix(
                h,
                np.ascontiguousarray(v, dtype=np.float64).view(np.int64)
                if v.dtype.kind == "f"
                else v.astype(np.int64),
            )
        live = np.flatnonzero(ck.ok)
        order = np.argsort(h[live], kind="stable")
        hs = h[live][order]  # sorted hashes of live rows, ties in row order
        dup_sorted = np.zeros(len(hs), dtype=bool)
        dup_sorted[1:] = hs[1:] == hs[:-1]  # a later copy within the chunk
        dup_sorted |= self.seen.contains(hs)  # a copy of an earlier chunk's row
        self.seen.add(hs[~dup_sorted])
        bad = np.zeros(len(ad), dtype=bool)
        bad[live[order]] = dup_sorted
        ck.flag("duplicate", bad, lambda idx: ["identical to an earlier row"] * len(idx))
