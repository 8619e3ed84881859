"""Reading impression logs in chunks: CSV (values as written) or Parquet, local or gs://.

Also the column conversions the checks share (numbers, timestamps, ids) and a prefetching
iterator that overlaps reading with checking.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from genco.data import storage
from genco.errors import ContractError


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


def as_float(col: pa.Array) -> np.ndarray:
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


def timestamps(col: pa.Array) -> np.ndarray:
    """Epoch seconds, ISO-8601 strings or Arrow timestamps to float64 seconds; NaN when none."""
    if pa.types.is_timestamp(col.type):
        us = pc.cast(pc.cast(col, pa.timestamp("us", tz="UTC")), pa.int64())
        return us.to_numpy(zero_copy_only=False).astype(np.float64) / 1e6
    x = as_float(col)
    todo = np.isnan(x)
    if todo.any() and pa.types.is_string(col.type):
        raw = pd.Series(col.to_numpy(zero_copy_only=False)[todo])
        t = pd.to_datetime(raw, errors="coerce", utc=True, format="ISO8601")
        secs = (t - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
        x[todo] = secs.to_numpy(dtype=np.float64, na_value=np.nan)
    return x


def as_ids(col: pa.Array) -> pa.Array:
    """Id columns as strings: Parquet may store integer ids; ``0`` becomes ``"0"``."""
    if pa.types.is_string(col.type):
        return col
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    return pc.cast(col, pa.string())


def shown(col: pa.Array, idx: np.ndarray) -> list[str]:
    """Values as the user wrote them, for messages (nulls shown as empty)."""
    return ["" if v is None else str(v) for v in col.take(pa.array(idx)).to_pylist()]


def chain(first: pa.Table, rest: Iterator[pa.Table]) -> Iterator[pa.Table]:
    yield first
    yield from rest


def prefetch(it: Iterator[pa.Table], depth: int = 2) -> Iterator[pa.Table]:
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
