"""Streaming validation of impression logs against the catalog and constraints.

Rows that pass go to a Parquet file of valid impressions; rows that fail go to a quarantine
CSV with their original values, their row number and a reason. Nothing is dropped silently:
the summary counts every row in, valid, and quarantined by reason.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from genco.data import storage
from genco.data.checks import REASONS, RowValidator, check_header
from genco.data.contract import (
    AD,
    Catalog,
    Constraints,
    load_catalog,
    load_constraints,
)
from genco.data.readers import as_ids, chain, iter_chunks, prefetch
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
    validator = RowValidator(catalog, constraints, layout, check_dups)
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
        for t in prefetch(chain(first, chunks)):
            if t.column_names != list(layout.columns):
                raise ContractError(f"{impressions}: columns change within the file")
            ck, values = validator.check(t, row0)
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
    "validated_inputs",
]
