"""Reading impression logs in chunks: CSV (values as written) or Parquet, local or gs://.

A CSV row that does not parse (a wrong number of fields, a truncated last line) is reported
with its 1-based data row number and raw text instead of failing the file; bytes that are not
valid UTF-8 are replaced by markers (``mark_invalid_utf8``) so the checks can quarantine
exactly the rows that hold them. Also the column conversions the checks share (numbers,
timestamps, ids) and a prefetching iterator that overlaps reading with checking.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import io
import queue
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from genco.data import dataset, storage
from genco.errors import ContractError

# An invalid byte b (0x80..0xFF) is read as the private-use character U+10FF00 + b: valid
# UTF-8, so Arrow keeps the row, and unmistakable, so the checks find it and the quarantine
# shows it back as \xNN.
_MARK0 = 0x10FF00
MARKED = "[\U0010ff80-\U0010ffff]"
_MARKED_RE = re.compile(MARKED)


def _mark_bytes(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    return "".join(chr(_MARK0 + b) for b in exc.object[exc.start : exc.end]), exc.end


codecs.register_error("genco-mark-invalid", _mark_bytes)


def unmark(text: str) -> str:
    """Marked invalid bytes back as ``\\xNN`` (for the quarantine and messages)."""
    return _MARKED_RE.sub(lambda m: f"\\x{ord(m.group()) - _MARK0:02x}", text)


class MarkInvalidUtf8(io.RawIOBase):
    """A binary stream passed through unchanged where it is valid UTF-8 (checked a block at
    a time, at C speed), with each invalid byte replaced by its marker character."""

    def __init__(self, raw, head: bytes = b"", block: int = 1 << 22) -> None:
        self._raw = raw
        self._pending = head
        self._out = memoryview(b"")
        self._block = block
        self._eof = False
        self.replaced = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not len(self._out) and not self._eof:
            self._fill()
        n = min(len(b), len(self._out))
        b[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def _fill(self) -> None:
        data = self._raw.read(self._block)
        self._eof = not data
        data = self._pending + data
        try:
            _, used = codecs.utf_8_decode(data, "strict", self._eof)
            out = data[:used]
        except UnicodeDecodeError:
            text, used = codecs.utf_8_decode(data, "genco-mark-invalid", self._eof)
            out = text.encode("utf-8")
            self.replaced = True
        self._pending = data[used:]
        self._out = memoryview(out)


@dataclass(frozen=True)
class MalformedRow:
    """A CSV row that does not parse: its 1-based data row number, field counts, raw text."""

    row: int
    expected: int
    actual: int
    text: str


@dataclass
class Chunk:
    """Up to chunk_rows parsed rows, their 1-based data row numbers, and the malformed rows
    found while reading them (reported with whichever chunk was read when they were seen)."""

    table: pa.Table
    rows: np.ndarray  # (n,) int64
    malformed: list[MalformedRow] = field(default_factory=list)
    marked: bool = False  # invalid UTF-8 was replaced somewhere up to here
    part: str = ""  # the partition directory it was read from (a partitioned dataset)


_NESTED = (
    pa.types.is_list,
    pa.types.is_large_list,
    pa.types.is_fixed_size_list,
    pa.types.is_struct,
    pa.types.is_map,
    pa.types.is_union,
)


def _check_parquet_schema(schema: pa.Schema, path: str) -> None:
    for f in schema:
        t = f.type.value_type if pa.types.is_dictionary(f.type) else f.type
        if any(is_(t) for is_ in _NESTED):
            raise ContractError(
                f"{path}: column '{f.name}' has nested type {t}; a log holds one plain value "
                "per cell (string, number or timestamp)"
            )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def iter_chunks(path: str, chunk_rows: int, client=None) -> Iterator[Chunk]:
    """Stream a CSV or Parquet log in chunks of at most chunk_rows rows.

    CSV columns are read as text (values exactly as written); Parquet keeps its types. A
    directory (or an object-store prefix) is a partitioned Parquet dataset
    (``genco.data.dataset``): its files in path order, rows numbered across them.
    """
    if dataset.is_dataset(path):
        # Before the extension check: a Spark-style dataset is a directory named x.parquet.
        yield from _dataset_chunks(path, chunk_rows, client)
        return
    fmt = storage.table_format(path)
    with contextlib.ExitStack() as stack:
        try:
            f = stack.enter_context(storage.open_read(path, client=client))
        except FileNotFoundError as exc:
            raise ContractError(f"{path}: file not found") from exc
        except OSError as exc:
            raise ContractError(f"{path}: cannot open: {exc.strerror or exc}") from exc
        try:
            if fmt == "parquet":
                yield from _parquet_chunks(f, path, chunk_rows)
            else:
                yield from _csv_chunks(f, path, chunk_rows)
        except (pa.ArrowInvalid, OSError) as exc:
            raise ContractError(f"{path}: cannot read: {_one_line(exc)}") from exc


def _parquet_chunks(f, path: str, chunk_rows: int) -> Iterator[Chunk]:
    head = f.read(4)
    f.seek(0)
    if head != b"PAR1":
        raise ContractError(f"{path}: not a Parquet file (it does not start with 'PAR1')")
    pf = pq.ParquetFile(f)
    _check_parquet_schema(pf.schema_arrow, path)
    names = pf.schema_arrow.names
    if pf.metadata.num_rows == 0:
        yield Chunk(pa.table({n: pa.array([], pa.string()) for n in names}), np.zeros(0, np.int64))
    row0 = 0
    for batch in pf.iter_batches(batch_size=chunk_rows):
        n = batch.num_rows
        yield Chunk(pa.Table.from_batches([batch]), np.arange(row0 + 1, row0 + n + 1))
        row0 += n


def _dataset_chunks(path: str, chunk_rows: int, client=None) -> Iterator[Chunk]:
    """Batches of a partitioned dataset, coalesced up to chunk_rows within a partition
    directory (a date's many small files become one chunk; a chunk never spans two)."""
    row0 = 0
    found = dataset.parts(path, client)
    pending: list[pa.RecordBatch] = []
    key = ""

    def flush() -> Iterator[Chunk]:
        nonlocal row0
        n = sum(b.num_rows for b in pending)
        if n:
            table = pa.Table.from_batches(pending).combine_chunks()
            yield Chunk(table, np.arange(row0 + 1, row0 + n + 1), part=key)
            row0 += n
        pending.clear()

    for part in found:
        _check_parquet_schema(part.fragment.physical_schema, part.path)
        for batch in dataset.part_batches(part, None, chunk_rows):
            same = not pending or (part.key == key and batch.schema.equals(pending[0].schema))
            if not same or sum(b.num_rows for b in pending) + batch.num_rows > chunk_rows:
                yield from flush()
            key = part.key
            pending.append(batch)
    yield from flush()
    if row0 == 0:  # every file empty: the header still gets checked
        names = found[0].fragment.physical_schema.names
        yield Chunk(pa.table({n: pa.array([], pa.string()) for n in names}), np.zeros(0, np.int64))


def _csv_chunks(f, path: str, chunk_rows: int) -> Iterator[Chunk]:
    raw = f
    if path.lower().endswith(".gz"):
        if f.read(2) != b"\x1f\x8b":
            raise ContractError(f"{path}: named .gz but not gzip-compressed; rename it .csv")
        f.seek(0)
        raw = pa.input_stream(f, compression="gzip")
    head = raw.read(1 << 16)
    header = _csv_header(head, path)
    stream = MarkInvalidUtf8(raw, head)
    found: collections.deque[MalformedRow] = collections.deque()

    def on_invalid(row: pacsv.InvalidRow) -> str:
        if row.number is None:  # only with use_threads=True, which is not used here
            return "error"
        found.append(
            MalformedRow(row.number - 1, row.expected_columns, row.actual_columns, row.text)
        )
        return "skip"

    reader = pacsv.open_csv(
        pa.PythonFile(stream, mode="r"),
        # Serial parsing: the only mode in which Arrow reports a bad row's number.
        read_options=pacsv.ReadOptions(block_size=1 << 22, use_threads=False),
        parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid),
        convert_options=pacsv.ConvertOptions(
            column_types={n: pa.string() for n in header},
            strings_can_be_null=False,
        ),
    )
    numbers = _RowNumbers()
    empty = True
    for batch in reader:
        empty = False
        bad = [found.popleft() for _ in range(len(found))]  # each pop atomic
        rows = numbers.next(batch.num_rows, [m.row for m in bad])
        t = pa.Table.from_batches([batch])
        for start in range(0, t.num_rows, chunk_rows):
            yield Chunk(
                t.slice(start, chunk_rows),
                rows[start : start + chunk_rows],
                bad if start == 0 else [],
                stream.replaced,
            )
    bad = list(found)
    if empty or bad:
        t = pa.table({n: pa.array([], pa.string()) for n in header})
        yield Chunk(t, np.zeros(0, np.int64), bad, stream.replaced)


class _RowNumbers:
    """1-based data row numbers of parsed rows: consecutive, skipping the malformed rows'
    numbers (which Arrow may report a block ahead of the rows around them)."""

    def __init__(self) -> None:
        self.next_row = 1
        self.skip: np.ndarray = np.zeros(0, np.int64)

    def next(self, n: int, malformed: list[int]) -> np.ndarray:
        self.skip = np.union1d(self.skip, np.asarray(malformed, np.int64))
        cand = np.arange(self.next_row, self.next_row + n + len(self.skip), dtype=np.int64)
        rows = cand[~np.isin(cand, self.skip)][:n]
        if n:
            self.next_row = int(rows[-1]) + 1
        self.skip = self.skip[self.skip >= self.next_row]
        return rows


def _csv_header(head: bytes, path: str) -> list[str]:
    """The header from the first bytes of the (decompressed) stream."""
    if head[:2] == b"\x1f\x8b":
        raise ContractError(
            f"{path}: looks gzip-compressed (it starts with the gzip magic bytes); "
            "name it .csv.gz or decompress it"
        )
    if head[:4] == b"PAR1":
        raise ContractError(f"{path}: looks like a Parquet file; name it .parquet")
    try:
        line = head.split(b"\n", 1)[0].decode("utf-8-sig").rstrip("\r")
    except UnicodeDecodeError as exc:
        raise ContractError(f"{path}: header is not valid UTF-8 ({exc.reason})") from exc
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


_PER_SECOND = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}


def timestamps(col: pa.Array) -> np.ndarray:
    """Epoch seconds, ISO-8601 strings or Arrow timestamps (any unit; naive ones read as UTC)
    to float64 seconds; NaN when none."""
    if pa.types.is_timestamp(col.type):
        ticks = pc.cast(col, pa.int64()).to_numpy(zero_copy_only=False)
        return np.asarray(ticks, dtype=np.float64) / _PER_SECOND[col.type.unit]
    if pa.types.is_date(col.type):
        return timestamps(pc.cast(pc.cast(col, pa.date32()), pa.timestamp("s")))
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
    return ["" if v is None else unmark(str(v)) for v in col.take(pa.array(idx)).to_pylist()]


def chain(first: Chunk, rest: Iterator[Chunk]) -> Iterator[Chunk]:
    yield first
    yield from rest


def prefetch(it: Iterator[Chunk], depth: int = 2) -> Iterator[Chunk]:
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
