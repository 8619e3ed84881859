"""Partitioned Parquet datasets: a directory (or object-store prefix) of Parquet files in hive
layout, ``LOG/date=2026-01-01/part-0.parquet``, read as record batches with bounded memory.

This is how a log too large for one file arrives (``genco simulate --world catalog`` writes
one) and how every streaming reader reads it: ingest validates it batch by batch, and
training can stream the same way (``iter_batches``). Files are read in path order, so row
numbers and batch order are the same on every run; a batch never spans two files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from genco.data import fs as gfs
from genco.errors import ContractError

BATCH_ROWS = 262_144
_TABLE_EXTS = (".csv", ".csv.gz", ".parquet", ".pq")


def is_dataset(path: str) -> bool:
    """True for a local directory, or an object-store prefix (a URL without a table
    extension): a partitioned dataset rather than one file."""
    if gfs.is_remote(path):
        return not path.lower().rstrip("/").endswith(_TABLE_EXTS)
    return os.path.isdir(path)


class _WholeFiles(pafs.FSSpecHandler):
    """Object-store files read whole, one request each, when a reader opens them: a
    partitioned dataset's files are small (a day of one writer), and fsspec's streaming
    files leave background prefetch tasks behind."""

    def open_input_file(self, path: str) -> pa.BufferReader:
        return pa.BufferReader(self.fs.cat_file(path))


def _filesystem(path: str, client=None) -> tuple[pafs.FileSystem, str]:
    if gfs.is_remote(path):
        handler = _WholeFiles(gfs.filesystem(path, client))
        return pafs.PyFileSystem(handler), path.split("://", 1)[1].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(path)


@dataclass(frozen=True)
class Part:
    """One Parquet file of a dataset: its path, its hive partition values (``{"date":
    "2026-01-01"}``) and the partition directory it lies in (its key for grouping)."""

    path: str
    partition: dict[str, str]
    key: str
    fragment: ds.ParquetFileFragment


def open_dataset(path: str, client=None) -> ds.FileSystemDataset:
    """The Parquet dataset under ``path`` (hive partitioning); ContractError when it has no
    Parquet file or a file is not Parquet."""
    filesystem, root = _filesystem(path, client)
    try:
        dataset = ds.dataset(
            root,
            format="parquet",
            partitioning="hive",
            filesystem=filesystem,
            exclude_invalid_files=False,
            ignore_prefixes=[".", "_"],
        )
    except FileNotFoundError as exc:
        raise ContractError(f"{path}: dataset not found") from exc
    except (pa.ArrowInvalid, OSError) as exc:
        raise ContractError(f"{path}: cannot read as a Parquet dataset: {exc}") from exc
    if not dataset.files:
        raise ContractError(f"{path}: dataset has no Parquet files")
    return dataset


def parts(path: str, client=None) -> list[Part]:
    """The dataset's files in path order, with their partition values."""
    dataset = open_dataset(path, client)
    names = dataset.partitioning.schema.names if dataset.partitioning else []
    out = []
    for frag in sorted(dataset.get_fragments(), key=lambda f: f.path):
        values = ds.get_partition_keys(frag.partition_expression)
        partition = {n: str(values[n]) for n in names if n in values}
        key = os.path.dirname(frag.path)
        out.append(Part(frag.path, partition, key, frag))
    return out


def partition_columns(path: str, client=None) -> list[str]:
    """Names of the hive partition keys (``["date"]``)."""
    dataset = open_dataset(path, client)
    return list(dataset.partitioning.schema.names) if dataset.partitioning else []


def part_batches(
    part: Part, columns: list[str] | None = None, batch_rows: int = BATCH_ROWS
) -> Iterator[pa.RecordBatch]:
    """One file's record batches of at most ``batch_rows`` rows, its own columns only (the
    partition keys are not repeated); ContractError naming the file when it cannot be read."""
    try:
        physical = part.fragment.physical_schema
        cols = physical.names if columns is None else columns
        missing = [c for c in cols if c not in physical.names]
        if missing:
            raise ContractError(f"{part.path}: missing column '{missing[0]}'")
        yield from part.fragment.to_batches(
            columns=cols, batch_size=batch_rows, use_threads=False, schema=physical
        )
    except (pa.ArrowInvalid, OSError) as exc:
        raise ContractError(f"{part.path}: cannot read: {' '.join(str(exc).split())}") from exc


def iter_batches(
    path: str, columns: list[str] | None = None, batch_rows: int = BATCH_ROWS, client=None
) -> Iterator[pa.RecordBatch]:
    """Every row of a partitioned dataset (or one Parquet file) as record batches of at most
    ``batch_rows`` rows, files in path order; memory is O(batch), whatever the log's size.

    columns: the columns to read (default: each file's own); partition keys are not
    columns of the batches. The public reader for whatever streams a log (ingest, training).
    """
    if batch_rows < 1:
        raise ContractError(f"batch_rows must be >= 1, got {batch_rows}")
    for part in parts(path, client):
        yield from part_batches(part, columns, batch_rows)


def count_rows(path: str, client=None) -> int:
    """Rows in the dataset, from the Parquet footers (no data read)."""
    return sum(p.fragment.count_rows() for p in parts(path, client))


__all__ = [
    "BATCH_ROWS",
    "Part",
    "count_rows",
    "is_dataset",
    "iter_batches",
    "open_dataset",
    "part_batches",
    "partition_columns",
    "parts",
]
