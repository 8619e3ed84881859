"""Streaming validation of impression logs against the catalog and constraints.

Rows that pass go to a Parquet file of valid impressions; rows that fail (including rows that
do not parse and rows with bytes that are not UTF-8) go to a quarantine CSV with their
original values, their row number and a reason. Nothing is dropped silently: the summary
counts every row in, valid, and quarantined by reason. The quarantine is meant to be opened
in a spreadsheet: a cell that would start a formula is prefixed with ``'``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from genco.data import storage
from genco.data.checks import REASONS, RowValidator, SeenHashes, check_header
from genco.data.contract import (
    AD,
    Catalog,
    Constraints,
    load_catalog,
    load_constraints,
)
from genco.data.readers import Chunk, MalformedRow, as_ids, chain, iter_chunks, prefetch, unmark
from genco.errors import ConfigError, ContractError

VALID_FILE = "impressions.parquet"
QUARANTINE_FILE = "quarantine.csv"
SUMMARY_FILE = "summary.json"

# Checks run in this order; a row is quarantined with the first reason it fails.


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


def ingest(
    impressions: str,
    catalog: Catalog,
    constraints: Constraints,
    out_dir: str,
    config: IngestConfig | None = None,
    client=None,
    progress: bool = False,
    clock: Callable[[], float] = time.time,
) -> IngestSummary:
    """Validate an impression log, writing valid rows, quarantine and summary under out_dir.

    Raises ContractError for whole-file problems and TooManyBadRows (after writing every
    output, so the quarantine can be inspected) when the bad fraction exceeds the limit.
    clock: epoch seconds now; timestamps later than a day after it are quarantined.
    """
    config = config or IngestConfig()
    _check_out_dir(out_dir)
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
    layout = check_header(first.table.column_names, catalog, impressions)
    summary.context_columns = list(layout.contexts)
    check_dups = (
        layout.has_timestamp if config.check_duplicates is None else config.check_duplicates
    )
    validator = RowValidator(catalog, constraints, layout, check_dups, now=clock())
    schema = layout.valid_schema()
    bar = _progress(impressions, progress)
    with (
        storage.atomic_local_path(valid_path, client=client, suffix=".parquet") as vtmp,
        storage.atomic_local_path(quarantine_path, client=client, suffix=".csv") as qtmp,
        pq.ParquetWriter(vtmp, schema) as vwriter,
        open(qtmp, "w", encoding="utf-8", newline="") as qfile,
    ):
        # CRLF line ends (RFC 4180): csv quotes a cell holding a CR only when CR ends lines.
        pd.DataFrame(columns=["row", *layout.columns, "reason_code", "reason"]).to_csv(
            qfile, index=False, lineterminator="\r\n"
        )
        # Reading/parsing the next chunk and writing the last one release the GIL in Arrow:
        # overlap them with the checks of the current chunk.
        writer = ThreadPoolExecutor(max_workers=1)
        pending: Future | None = None
        part = first.part
        try:
            for chunk in prefetch(chain(first, chunks)):
                t = chunk.table
                if t.column_names != list(layout.columns):
                    where = chunk.part or impressions
                    raise ContractError(f"{where}: columns change within the file")
                if chunk.part != part and validator.seen is not None:
                    # A copy of a row carries its timestamp, so its date partition: duplicates
                    # are looked for within a partition, and the hashes stay O(partition).
                    validator.seen = SeenHashes()
                part = chunk.part
                ck, values = validator.check(t, chunk.marked)
                ok = ck.ok
                n_ok = int(ok.sum())
                if n_ok:
                    arrays = [
                        pc.filter(as_ids(t.column(c).combine_chunks()), ok)
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
                if len(bad) or chunk.malformed:
                    _quarantine(chunk, bad, ck.reason, ck.message, layout.columns).to_csv(
                        qfile, index=False, header=False, lineterminator="\r\n"
                    )
                    for r, cnt in zip(*np.unique(ck.reason[bad], return_counts=True)):
                        summary.quarantined_by_reason[REASONS[r]] += int(cnt)
                    summary.quarantined_by_reason["malformed_row"] += len(chunk.malformed)
                n_in = t.num_rows + len(chunk.malformed)
                summary.rows_in += n_in
                summary.rows_valid += n_ok
                summary.rows_quarantined += n_in - n_ok
                bar.update(n_in)
        finally:
            # An error mid-file must not close the Parquet writer under a write in flight.
            writer.shutdown(wait=True)
        if pending is not None:
            pending.result()
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


# OWASP CSV injection: a cell starting with one of these is a formula in a spreadsheet.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: str) -> str:
    """The value, prefixed with ``'`` when a spreadsheet would read it as a formula."""
    return "'" + value if value.startswith(_FORMULA_START) else value


def _texts(col: pa.ChunkedArray | pa.Array, marked: bool) -> list[str]:
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if not pa.types.is_string(col.type):
        col = pc.cast(col, pa.string())
    out = ["" if v is None else v for v in col.to_pylist()]
    return [unmark(v) for v in out] if marked else out


def _quarantine(
    chunk: Chunk,
    bad: np.ndarray,
    reason: np.ndarray,
    message: np.ndarray,
    columns: tuple[str, ...],
) -> pd.DataFrame:
    """Quarantine rows of one chunk (flagged rows and malformed ones), in row order, every
    text cell spreadsheet-safe."""
    q = chunk.table.take(pa.array(bad, pa.int64()))
    cells: dict[str, list] = {"row": chunk.rows[bad].tolist()}
    for c in columns:
        cells[c] = _texts(q.column(c), chunk.marked)
    cells["reason_code"] = [REASONS[r] for r in reason[bad]]
    cells["reason"] = list(message[bad])
    for m in chunk.malformed:
        fields = _malformed_fields(m, len(columns))
        cells["row"].append(m.row)
        for c, v in zip(columns, fields):
            cells[c].append(v)
        cells["reason_code"].append("malformed_row")
        text = unmark(m.text)
        text = text if len(text) <= 200 else text[:200] + "..."
        cells["reason"].append(f"row has {m.actual} fields, expected {m.expected}: {text}")
    frame = pd.DataFrame(cells)
    for c in frame.columns[1:]:
        frame[c] = [spreadsheet_safe(v) for v in frame[c]]
    return frame.sort_values("row", kind="stable")


def _malformed_fields(m: MalformedRow, n: int) -> list[str]:
    """The first n fields of a row that did not parse (its raw text is in the reason)."""
    try:
        fields = next(csv.reader(io.StringIO(m.text)), [])
    except csv.Error:
        fields = m.text.split(",")
    fields = [unmark(v) for v in fields[:n]]
    return fields + [""] * (n - len(fields))


def _check_out_dir(out_dir: str) -> None:
    """A local out_dir, or its nearest existing parent, must be a directory."""
    if storage.is_gcs(out_dir):
        return
    path = os.path.abspath(out_dir)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        where = "exists" if path == os.path.abspath(out_dir) else f"is under {path}, which exists"
        raise ContractError(f"{out_dir}: {where} and is not a directory; pass an output directory")


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
    "ingest",
    "spreadsheet_safe",
    "validated_inputs",
]
