"""Streaming validation of impression logs against the catalog and constraints.

Rows that pass go to a Parquet file of valid impressions; rows that fail go to a quarantine
CSV with their original values, their row number and a reason. Nothing is dropped silently:
the summary counts every row in, valid, and quarantined by reason.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from genco.data import storage
from genco.data.contract import (
    AD,
    CLICK,
    CONTEXT_PREFIX,
    PROPENSITY,
    REVENUE,
    TIMESTAMP,
    Catalog,
    Constraints,
    load_catalog,
    load_constraints,
)
from genco.errors import ConfigError, ContractError

VALID_FILE = "impressions.parquet"
QUARANTINE_FILE = "quarantine.csv"
SUMMARY_FILE = "summary.json"

# Checks run in this order; a row is quarantined with the first reason it fails.
REASONS = (
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


class TooManyBadRows(ContractError):
    """The quarantined fraction exceeded the configured limit."""


@dataclass(frozen=True)
class IngestConfig:
    max_bad_fraction: float = field(
        default=0.05, metadata={"help": "Fail the run when more than this fraction is bad."}
    )
    chunk_rows: int = field(
        default=262_144, metadata={"help": "Rows per streamed chunk (memory is O(chunk))."}
    )
    check_duplicates: bool | None = field(
        default=None,
        metadata={
            "help": "Quarantine rows identical to an earlier row. None: only when the log has "
            "a timestamp column (without one, identical impressions are legitimate repeats)."
        },
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.chunk_rows < 1:
            raise ConfigError(f"chunk_rows must be >= 1, got {self.chunk_rows}")


@dataclass
class IngestSummary:
    source: str
    rows_in: int = 0
    rows_valid: int = 0
    rows_quarantined: int = 0
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)
    bad_fraction: float = 0.0
    max_bad_fraction: float = 0.0
    valid_path: str = ""
    quarantine_path: str = ""
    context_columns: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Layout:
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


def check_header(columns: list[str], catalog: Catalog, path: str) -> _Layout:
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
    return _Layout(
        columns=tuple(columns),
        components=catalog.components,
        contexts=tuple(c for c in columns if c.startswith(CONTEXT_PREFIX)),
        has_propensity=PROPENSITY in columns,
        has_timestamp=TIMESTAMP in columns,
        has_revenue=REVENUE in columns,
    )


def iter_chunks(path: str, chunk_rows: int, client=None) -> Iterator[pa.Table]:
    """Stream a CSV or Parquet log in tables of at most chunk_rows rows.

    CSV columns are read as text (values exactly as written); Parquet keeps its types.
    """
    fmt = storage.table_format(path)
    with contextlib.ExitStack() as stack:
        try:
            f = stack.enter_context(storage.open_read(path, client=client))
        except FileNotFoundError as exc:
            raise ContractError(f"{path}: file not found") from exc
        try:
            if fmt == "parquet":
                pf = pq.ParquetFile(f)
                names = pf.schema_arrow.names
                if pf.metadata.num_rows == 0:
                    yield pa.table({n: pa.array([], pa.string()) for n in names})
                for batch in pf.iter_batches(batch_size=chunk_rows):
                    yield pa.Table.from_batches([batch])
                return
            header = _csv_header(f, path)
            compression = "gzip" if path.endswith(".gz") else None
            stream = pa.input_stream(f, compression=compression)
            reader = pacsv.open_csv(
                stream,
                read_options=pacsv.ReadOptions(block_size=1 << 22),
                convert_options=pacsv.ConvertOptions(
                    column_types={n: pa.string() for n in header},
                    strings_can_be_null=False,
                ),
            )
            empty = True
            for batch in reader:
                empty = False
                t = pa.Table.from_batches([batch])
                for start in range(0, t.num_rows, chunk_rows):
                    yield t.slice(start, chunk_rows)
            if empty:
                yield pa.table({n: pa.array([], pa.string()) for n in header})
        except (pa.ArrowInvalid, OSError) as exc:
            raise ContractError(f"{path}: cannot read: {exc}") from exc


def _csv_header(f, path: str) -> list[str]:
    """Peek the header without consuming the stream."""
    pos = f.tell()
    head = f.read(1 << 16)
    f.seek(pos)
    if path.endswith(".gz"):
        import gzip

        with contextlib.suppress(EOFError, OSError):
            head = gzip.decompress(head)
        if isinstance(head, bytes) and head[:2] == b"\x1f\x8b":
            # Truncated gzip prefix: read the header through a decompressing stream instead.
            g = gzip.GzipFile(fileobj=f)
            head = g.readline()
            f.seek(pos)
    line = head.split(b"\n", 1)[0].decode("utf-8-sig").rstrip("\r")
    if not line.strip():
        raise ContractError(f"{path}: file is empty (no header)")
    return [c.strip().strip('"') for c in line.split(",")]


class _SeenHashes:
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


class _ChunkCheck:
    """Runs the row checks on one chunk and records the first failure of each row."""

    def __init__(self, n: int, row0: int) -> None:
        self.reason = np.full(n, -1, dtype=np.int16)
        self.message = np.empty(n, dtype=object)
        self.row0 = row0

    def flag(self, reason: str, bad: np.ndarray, fmt: Callable[[np.ndarray], list[str]]) -> None:
        new = np.flatnonzero(bad & (self.reason < 0))
        if len(new):
            self.reason[new] = REASONS.index(reason)
            self.message[new] = fmt(new)

    @property
    def ok(self) -> np.ndarray:
        return self.reason < 0


def _as_float(col: pa.Array) -> np.ndarray:
    """Numbers or numeric strings to float64; NaN where missing or not a finite number."""
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        try:
            x = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            # Some value does not parse: let pandas mark exactly those rows.
            s = pd.to_numeric(pd.Series(col.to_numpy(zero_copy_only=False)), errors="coerce")
            x = s.to_numpy(dtype=np.float64, na_value=np.nan)
    elif (
        pa.types.is_integer(col.type)
        or pa.types.is_floating(col.type)
        or pa.types.is_boolean(col.type)
    ):
        x = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
    else:
        x = np.full(len(col), np.nan)
    x = np.array(x, dtype=np.float64, copy=True)
    x[~np.isfinite(x)] = np.nan
    return x


def _timestamps(col: pa.Array) -> np.ndarray:
    """Epoch seconds, ISO-8601 strings or Arrow timestamps to float64 seconds; NaN when none."""
    if pa.types.is_timestamp(col.type):
        us = pc.cast(pc.cast(col, pa.timestamp("us", tz="UTC")), pa.int64())
        return us.to_numpy(zero_copy_only=False).astype(np.float64) / 1e6
    x = _as_float(col)
    todo = np.isnan(x)
    if todo.any() and pa.types.is_string(col.type):
        raw = pd.Series(col.to_numpy(zero_copy_only=False)[todo])
        t = pd.to_datetime(raw, errors="coerce", utc=True, format="ISO8601")
        secs = (t - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
        x[todo] = secs.to_numpy(dtype=np.float64, na_value=np.nan)
    return x


def _as_ids(col: pa.Array) -> pa.Array:
    """Id columns as strings: Parquet may store integer ids; ``0`` becomes ``"0"``."""
    if pa.types.is_string(col.type):
        return col
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    return pc.cast(col, pa.string())


def _shown(col: pa.Array, idx: np.ndarray) -> list[str]:
    """Values as the user wrote them, for messages (nulls shown as empty)."""
    return ["" if v is None else str(v) for v in col.take(pa.array(idx)).to_pylist()]


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


class _Validator:
    """Per-run state: catalog lookups built once, duplicate hashes across chunks."""

    def __init__(
        self, catalog: Catalog, constraints: Constraints, layout: _Layout, check_dups: bool
    ) -> None:
        self.catalog = catalog
        self.constraints = constraints
        self.layout = layout
        self.ads = pa.array(catalog.ads, pa.string())
        self.vocab = [pa.array(v, pa.string()) for v in catalog.elements]
        self.allowed = [_allowed(catalog, c) for c in range(catalog.n_components)]
        self.seen = _SeenHashes() if check_dups else None

    def check(self, t: pa.Table, row0: int) -> tuple[_ChunkCheck, dict[str, np.ndarray]]:
        lay, cat = self.layout, self.catalog
        n = t.num_rows
        ck = _ChunkCheck(n, row0)
        col = {name: t.column(name).combine_chunks() for name in lay.columns}
        for name in (AD, *lay.components):
            col[name] = _as_ids(col[name])

        def raw(name: str) -> Callable[[np.ndarray], list[str]]:
            return lambda idx: _shown(col[name], idx)

        for name in (AD, *lay.components, CLICK):
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

        ad = pc.index_in(col[AD], value_set=self.ads).to_numpy(zero_copy_only=False)
        ad = np.nan_to_num(ad.astype(np.float64), nan=-1).astype(np.int64)
        ck.flag(
            "unknown_ad",
            ad < 0,
            lambda idx: [f"ad_id '{v}' is not in the catalog" for v in raw(AD)(idx)],
        )

        combos = np.zeros((n, cat.n_components), dtype=np.int64)
        for c, comp in enumerate(lay.components):
            e = pc.index_in(col[comp], value_set=self.vocab[c]).to_numpy(zero_copy_only=False)
            e = np.nan_to_num(e.astype(np.float64), nan=-1).astype(np.int64)
            combos[:, c] = e
            unknown = e < 0
            if unknown.any():
                elsewhere = np.full(n, -1, dtype=np.int64)
                for c2 in range(cat.n_components):
                    if c2 == c:
                        continue
                    hit = pc.is_in(col[comp], value_set=self.vocab[c2]).to_numpy(
                        zero_copy_only=False
                    )
                    elsewhere[(elsewhere < 0) & hit & unknown] = c2
                ck.flag(
                    "unknown_element",
                    unknown & (elsewhere < 0),
                    lambda idx, comp=comp: [
                        f"{comp} '{v}' is not an element of any component" for v in raw(comp)(idx)
                    ],
                )
                ck.flag(
                    "wrong_component",
                    unknown,
                    lambda idx, comp=comp, el=elsewhere: [
                        f"{comp} '{v}' is an element of component "
                        f"'{cat.components[el[i]]}', not '{comp}'"
                        for i, v in zip(idx, raw(comp)(idx))
                    ],
                )
            ok = self.allowed[c](ad, e)
            ck.flag(
                "not_a_candidate",
                ~ok,
                lambda idx, comp=comp: [
                    f"{comp} '{v}' is not a candidate of ad '{a}'"
                    for v, a in zip(raw(comp)(idx), raw(AD)(idx))
                ],
            )

        click = _as_float(col[CLICK])
        ck.flag(
            "bad_click",
            ~((click == 0) | (click == 1)),
            lambda idx: [f"click '{v}' is not 0 or 1" for v in raw(CLICK)(idx)],
        )
        values: dict[str, np.ndarray] = {CLICK: np.nan_to_num(click).astype(np.int8)}

        if lay.has_propensity:
            p = _as_float(col[PROPENSITY])
            bad = ~((p > 0) & (p <= 1))
            ck.flag(
                "bad_propensity",
                bad,
                lambda idx: [f"propensity '{v}' is not in (0, 1]" for v in raw(PROPENSITY)(idx)],
            )
            values[PROPENSITY] = p
        for name in lay.contexts:
            x = _as_float(col[name])
            ck.flag(
                "bad_context",
                np.isnan(x),
                lambda idx, name=name: [f"{name} '{v}' is not numeric" for v in raw(name)(idx)],
            )
            values[name] = x
        if lay.has_timestamp:
            ts = _timestamps(col[TIMESTAMP])
            ck.flag(
                "bad_timestamp",
                np.isnan(ts),
                lambda idx: [
                    f"timestamp '{v}' is neither epoch seconds nor ISO-8601"
                    for v in raw(TIMESTAMP)(idx)
                ],
            )
            values[TIMESTAMP] = ts
        if lay.has_revenue:
            r = _as_float(col[REVENUE])
            ck.flag(
                "bad_revenue",
                ~(r >= 0),
                lambda idx: [f"revenue '{v}' is not a number >= 0" for v in raw(REVENUE)(idx)],
            )
            values[REVENUE] = r

        if len(self.constraints):
            live = np.flatnonzero(ck.ok)
            viol = np.full(n, -1, dtype=np.int64)
            viol[live] = self.constraints.violations(ad[live], combos[live])
            cons = self.constraints

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

        if self.seen is not None:
            h = np.zeros(n, dtype=np.uint64)
            h = _mix(h, ad)
            for c in range(cat.n_components):
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
            bad = np.zeros(n, dtype=bool)
            bad[live[order]] = dup_sorted
            ck.flag(
                "duplicate",
                bad,
                lambda idx: ["identical to an earlier row"] * len(idx),
            )
        return ck, values


def ingest(
    impressions: str,
    catalog: Catalog,
    constraints: Constraints,
    out_dir: str,
    config: IngestConfig | None = None,
    client=None,
    progress: bool = False,
) -> IngestSummary:
    """Validate an impression log, writing valid rows, quarantine and summary under out_dir.

    Raises ContractError for whole-file problems and TooManyBadRows (after writing every
    output, so the quarantine can be inspected) when the bad fraction exceeds the limit.
    """
    config = config or IngestConfig()
    valid_path = storage.join(out_dir, VALID_FILE)
    quarantine_path = storage.join(out_dir, QUARANTINE_FILE)
    summary = IngestSummary(
        source=impressions,
        valid_path=valid_path,
        quarantine_path=quarantine_path,
        max_bad_fraction=config.max_bad_fraction,
        quarantined_by_reason=dict.fromkeys(REASONS, 0),
    )
    chunks = iter_chunks(impressions, config.chunk_rows, client)
    first = next(chunks)
    layout = check_header(first.column_names, catalog, impressions)
    summary.context_columns = list(layout.contexts)
    check_dups = (
        layout.has_timestamp if config.check_duplicates is None else config.check_duplicates
    )
    validator = _Validator(catalog, constraints, layout, check_dups)
    schema = layout.valid_schema()
    bar = _progress(impressions, progress)
    with (
        storage.atomic_local_path(valid_path, client=client, suffix=".parquet") as vtmp,
        storage.atomic_local_path(quarantine_path, client=client, suffix=".csv") as qtmp,
        pq.ParquetWriter(vtmp, schema) as vwriter,
        open(qtmp, "w", encoding="utf-8", newline="") as qfile,
    ):
        pd.DataFrame(columns=["row", *layout.columns, "reason_code", "reason"]).to_csv(
            qfile, index=False
        )
        row0 = 0
        # Reading/parsing the next chunk and writing the last one release the GIL in Arrow:
        # overlap them with the checks of the current chunk.
        writer = ThreadPoolExecutor(max_workers=1)
        pending: Future | None = None
        for t in _prefetch(_chain(first, chunks)):
            if t.column_names != list(layout.columns):
                raise ContractError(f"{impressions}: columns change within the file")
            ck, values = validator.check(t, row0)
            ok = ck.ok
            n_ok = int(ok.sum())
            if n_ok:
                arrays = [
                    pc.filter(_as_ids(t.column(c).combine_chunks()), ok)
                    for c in (AD, *layout.components)
                ]
                for f in schema:
                    if f.name in values:
                        arrays.append(pa.array(values[f.name][ok], f.type))
                if pending is not None:
                    pending.result()
                pending = writer.submit(
                    vwriter.write_table, pa.Table.from_arrays(arrays, schema=schema)
                )
            bad = np.flatnonzero(~ok)
            if len(bad):
                q = t.take(pa.array(bad)).to_pandas()
                q.insert(0, "row", row0 + bad + 1)
                q["reason_code"] = [REASONS[r] for r in ck.reason[bad]]
                q["reason"] = ck.message[bad]
                q.to_csv(qfile, index=False, header=False)
                for r, cnt in zip(*np.unique(ck.reason[bad], return_counts=True)):
                    summary.quarantined_by_reason[REASONS[r]] += int(cnt)
            summary.rows_in += t.num_rows
            summary.rows_valid += n_ok
            summary.rows_quarantined += len(bad)
            row0 += t.num_rows
            bar.update(t.num_rows)
        if pending is not None:
            pending.result()
        writer.shutdown()
    bar.close()
    if summary.rows_in == 0:
        raise ContractError(f"{impressions}: file has no rows")
    summary.quarantined_by_reason = {k: v for k, v in summary.quarantined_by_reason.items() if v}
    summary.bad_fraction = summary.rows_quarantined / summary.rows_in
    storage.write_json(storage.join(out_dir, SUMMARY_FILE), summary.to_dict(), client=client)
    if summary.bad_fraction > config.max_bad_fraction:
        raise TooManyBadRows(
            f"{impressions}: {summary.rows_quarantined} of {summary.rows_in} rows "
            f"({summary.bad_fraction:.1%}) failed validation, over max_bad_fraction "
            f"{config.max_bad_fraction:.1%}; by reason: "
            f"{json.dumps(summary.quarantined_by_reason)}; see {quarantine_path}"
        )
    return summary


def validated_inputs(
    catalog_path: str,
    impressions_path: str,
    constraints_path: str | None,
    out_dir: str,
    config: IngestConfig | None = None,
    progress: bool = False,
    client=None,
) -> tuple[Catalog, Constraints, IngestSummary, pd.DataFrame]:
    """Load catalog and constraints, validate the log into out_dir, read the valid rows back:
    the first step of every command that learns from a log."""
    catalog = load_catalog(catalog_path, client=client)
    constraints = load_constraints(constraints_path, catalog, client=client)
    summary = ingest(impressions_path, catalog, constraints, out_dir, config, client, progress)
    return catalog, constraints, summary, storage.read_table(summary.valid_path, client=client)


def _chain(first: pa.Table, rest: Iterator[pa.Table]) -> Iterator[pa.Table]:
    yield first
    yield from rest


def _prefetch(it: Iterator[pa.Table], depth: int = 2) -> Iterator[pa.Table]:
    """Run an iterator in a background thread, up to depth items ahead; errors re-raised."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def run() -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as exc:  # handed to the consumer, raised there
            q.put(exc)

    th = threading.Thread(target=run, daemon=True, name="genco-ingest-read")
    th.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        th.join(timeout=5)


def _progress(path: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        desc=f"validate {path.rsplit('/', 1)[-1]}",
        unit=" rows",
        unit_scale=True,
        disable=not enabled,
        mininterval=0.5,
    )


__all__ = [
    "REASONS",
    "IngestConfig",
    "IngestSummary",
    "TooManyBadRows",
    "check_header",
    "ingest",
    "iter_chunks",
    "validated_inputs",
]
