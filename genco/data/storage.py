"""One I/O layer for local paths, ``gs://bucket/path`` and ``s3://bucket/path`` URLs.

The pipeline runs the same code on a laptop (local directories), on Vertex (Cloud Storage)
and on Kubeflow installs whose artifact store is MinIO (S3), so every reader and writer goes
through here instead of branching on the path scheme at each call site. Object stores are
reached through fsspec (``gcsfs``, ``s3fs``), so both behave alike: a missing object, prefix
or bucket is a ``NotFoundError`` naming the path, a prefix with objects under it "exists"
like a directory, and listings are never served from a cache (another process may have
written since).

Writes are atomic on every backend because pipeline steps get preempted: a reader must see
either the old file or the complete new one, never a truncated one. Locally that is a temp
file in the destination directory plus ``os.replace``; on GCS an upload only becomes visible
once it is finalised, and on S3 a single PUT or a multipart upload only once it completes, so
one upload of complete content is already atomic.

Settings come from the environment, as for the clouds' own tools: ``STORAGE_EMULATOR_HOST``
(a GCS emulator, anonymous), ``GOOGLE_CLOUD_PROJECT``, and ``S3_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``) for MinIO or another S3-compatible server.
Functions take ``client=``: an fsspec filesystem, or a ``google.cloud.storage.Client`` whose
project, credentials and endpoint are reused; by default one shared filesystem per scheme.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import os
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from genco.data.fs import (
    bucket_exists,
    filesystem,
    gcs_client,
    is_gcs,
    is_remote,
    is_s3,
    join,
    naming,
    not_found,
    object_key,
    split_url,
)
from genco.errors import ContractError, NotFoundError

if TYPE_CHECKING:
    from typing import TypeAlias

    from google.cloud import storage

    # What ``client=`` accepts: a filesystem, or a GCS client to take settings from.
    Client: TypeAlias = AbstractFileSystem | storage.Client

__all__ = [
    "atomic_local_path",
    "exists",
    "filesystem",
    "gcs_client",
    "is_gcs",
    "is_remote",
    "is_s3",
    "join",
    "listdir",
    "makedirs",
    "open_read",
    "read_bytes",
    "read_json",
    "read_table",
    "read_text",
    "remove",
    "table_format",
    "write_bytes",
    "write_json",
    "write_table",
    "write_text",
]


def _read_umask() -> int:
    # mkstemp creates 0600 files; without restoring the usual mode, artefacts written
    # atomically would be unreadable to other users (e.g. a serving container user).
    # os.umask can only be read by setting it, so do it once at import time.
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_read_umask()

# --------------------------------------------------------------- existence / listing


def exists(path: str, client: Client | None = None) -> bool:
    """True if the file/object exists, or if it is a non-empty object-store "directory".

    Object stores have no directories; treating a prefix with objects under it as existing
    keeps ``exists(run_dir)`` meaning the same thing on every backend.
    """
    if not is_remote(path):
        return os.path.exists(path)
    bucket, name = split_url(path, need_object=False)
    fs = filesystem(path, client)
    with naming(path, fs):
        if not name:
            return bucket_exists(fs, bucket)
        return bool(fs.exists(object_key(bucket, name)))


def listdir(path: str, client: Client | None = None) -> list[str]:
    """Sorted names of direct children.

    A missing directory, an object-store prefix with nothing under it, and a missing bucket
    raise ``NotFoundError`` naming the path, so callers get the same failure on every
    backend instead of an empty list that hides a wrong path.
    """
    if not is_remote(path):
        if not os.path.isdir(path):
            if os.path.exists(path):
                raise NotADirectoryError(f"{path}: not a directory")
            raise NotFoundError(f"{path}: no such directory")
        return sorted(os.listdir(path))
    bucket, name = split_url(path, need_object=False)
    fs = filesystem(path, client)
    key = object_key(bucket, name)
    with naming(path, fs, "no such directory (no objects under this prefix)"):
        entries = fs.ls(key, detail=True)
    names: set[str] = set()
    for entry in entries:
        raw = str(entry["name"])
        full = raw.rstrip("/")
        if full == key:
            if entry.get("type") == "file" and not raw.endswith("/") and len(entries) == 1:
                raise NotADirectoryError(f"{path}: not a directory (an object)")
            continue  # the prefix itself, or a zero-byte "folder" object made by a console
        names.add(full[len(key) + 1 :] if name else full[len(bucket) + 1 :])
    return sorted(names)


def remove(path: str, client: Client | None = None) -> None:
    """Delete one file/object; a missing one is an error so typos do not pass silently."""
    if not is_remote(path):
        os.remove(path)
        return
    bucket, name = split_url(path)
    fs = filesystem(path, client)
    # S3 deletes a missing key without complaint, so ask first.
    if not fs.isfile(object_key(bucket, name)):
        raise not_found(path, fs)
    with naming(path, fs):
        fs.rm_file(object_key(bucket, name))


def makedirs(path: str) -> None:
    """Create a local directory tree; object stores need none because prefixes are implicit."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


# ---------------------------------------------------------------------- raw I/O


@contextlib.contextmanager
def open_read(path: str, client: Client | None = None) -> Iterator[BinaryIO]:
    """Stream a file/object without holding all of it in memory.

    Objects are read in ranged requests of the filesystem's block size; a missing object
    fails here, on open, with NotFoundError rather than on the first ``read()``.
    """
    if not is_remote(path):
        with open(path, "rb") as f:
            yield f
        return
    bucket, name = split_url(path)
    fs = filesystem(path, client)
    with naming(path, fs):
        reader = fs.open(object_key(bucket, name), "rb")
    with reader:
        yield cast(BinaryIO, reader)


def read_bytes(path: str, client: Client | None = None) -> bytes:
    """Whole file/object as bytes (one request: a concurrent overwrite cannot mix versions)."""
    if not is_remote(path):
        with open(path, "rb") as f:
            return f.read()
    bucket, name = split_url(path)
    fs = filesystem(path, client)
    with naming(path, fs):
        return bytes(fs.cat_file(object_key(bucket, name)))


def upload_file(local: str, path: str, client: Any) -> None:
    bucket, name = split_url(path)
    fs = filesystem(path, client)
    # One upload: GCS finalises it (single or resumable) and S3 completes it (PUT or
    # multipart) in one step, and nothing is visible before; that is the atomic step.
    # Both filesystems retry transient failures; a retried upload rewrites the same bytes.
    with naming(path, fs):
        fs.put_file(local, object_key(bucket, name))


def _fsync_dir(directory: str) -> None:
    # Makes the rename itself survive power loss; not every filesystem allows it.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_local_path(path: str, client: Client | None = None, suffix: str = "") -> Iterator[str]:
    """Yield a local temp path to write; publish it to ``path`` only on success.

    Exists for writers that insist on a real filename (pyarrow's ParquetWriter,
    ``torch.save``, ``to_csv`` with compression). ``suffix`` is appended to the
    temp name for writers that pick a format from the extension.

    Local: the temp file lives in the destination directory so ``os.replace`` is
    a same-filesystem rename, i.e. atomic; it is fsynced first, otherwise a crash
    right after the rename can leave a zero-length file on ext4/xfs.
    Object stores: the finished temp file is uploaded in one go. On an exception the temp
    file is deleted and the destination is left exactly as it was.
    """
    remote = is_remote(path)
    if remote:
        split_url(path)  # fail before the caller spends time producing the data
        fd, tmp = tempfile.mkstemp(prefix="genco-", suffix=suffix)
    else:
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        base = os.path.basename(path)
        # Hidden and ``.tmp``-marked so globbing readers don't pick it up mid-write.
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{suffix}", dir=directory)
    os.close(fd)
    try:
        yield tmp
        if remote:
            upload_file(tmp, path, client)
        else:
            os.chmod(tmp, _FILE_MODE)
            sync_fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(sync_fd)
            finally:
                os.close(sync_fd)
            os.replace(tmp, path)
            _fsync_dir(os.path.dirname(os.path.abspath(path)))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_bytes(path: str, data: bytes, client: Client | None = None) -> None:
    """Atomically replace ``path`` with ``data``."""
    if is_remote(path):
        bucket, name = split_url(path)
        fs = filesystem(path, client)
        # Straight from memory: one upload is already atomic on both stores, so a temp
        # file would only add a disk round trip.
        with naming(path, fs):
            fs.pipe_file(object_key(bucket, name), data)
        return
    with atomic_local_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def read_text(path: str, client: Client | None = None) -> str:
    """UTF-8 text; fixed encoding so results don't depend on the container locale."""
    return read_bytes(path, client).decode("utf-8")


def write_text(path: str, text: str, client: Client | None = None) -> None:
    """Atomically write UTF-8 text."""
    write_bytes(path, text.encode("utf-8"), client)


def read_json(path: str, client: Client | None = None) -> Any:
    """Parse a JSON file/object."""
    return json.loads(read_bytes(path, client))


def write_json(path: str, obj: Any, client: Client | None = None) -> None:
    """Atomically write human-diffable JSON (indented, key order kept, final newline).

    ``ensure_ascii=False`` keeps non-ASCII creative text (e.g. Japanese headlines)
    readable in configs and reports instead of ``\\uXXXX`` escapes.
    """
    text = json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n"
    write_text(path, text, client)


# ------------------------------------------------------------------------ tables

_CSV_EXTS = (".csv", ".csv.gz")
_PARQUET_EXTS = (".parquet", ".pq")


def table_format(path: str) -> str:
    """``"csv"`` or ``"parquet"``, decided by extension so no content sniffing is needed."""
    lower = path.lower()
    if lower.endswith(_CSV_EXTS):
        return "csv"
    if lower.endswith(_PARQUET_EXTS):
        return "parquet"
    raise ContractError(f"{path}: unsupported extension; use .csv, .csv.gz or .parquet")


def read_table(
    path: str,
    client: Client | None = None,
    dtype: dict[str, str] | None = None,
) -> pd.DataFrame:
    """Read a csv / csv.gz / parquet table.

    CSV is read with only the empty field as missing: the pandas default also
    turns strings such as ``"NA"`` or ``"null"`` into NaN, which corrupts creative
    text and ids. Pass ``dtype={"id": "str"}`` to keep ids like ``"007"`` intact.
    ``dtype`` is applied to parquet too, so callers get the same dtypes whichever
    format a step happened to write.
    """
    fmt = table_format(path)
    if fmt == "csv":
        with open_read(path, client) as f:
            return pd.read_csv(
                f,
                compression="gzip" if path.lower().endswith(".gz") else None,
                keep_default_na=False,
                na_values=[""],
                dtype=dtype,
            )
    if is_remote(path):
        # Parquet needs random access (footer first); one download beats many
        # small ranged reads through a streaming reader.
        table = pq.read_table(pa.BufferReader(read_bytes(path, client)))
    else:
        table = pq.read_table(path)
    df = table.to_pandas()
    return df.astype(dtype) if dtype else df


def read_arrow(path: str, client: Client | None = None) -> pa.Table:
    """Read a csv / csv.gz / parquet table as an Arrow table, without pandas (catalog scale:
    15M rows as a frame of Python strings cost GiBs). CSV columns are all read as text, with
    only the empty field as missing, as ``read_table(dtype=str)``; parquet keeps its types."""
    if table_format(path) == "parquet":
        if is_remote(path):
            return pq.read_table(pa.BufferReader(read_bytes(path, client)))
        return pq.read_table(path)
    with open_read(path, client) as raw:
        f = gzip.GzipFile(fileobj=raw) if path.lower().endswith(".gz") else raw
        header = f.readline().decode("utf-8-sig").rstrip("\r\n")
        if not header:
            raise ValueError("no header line")
        names = next(csv.reader([header]))
        try:
            return pacsv.read_csv(
                f,
                read_options=pacsv.ReadOptions(column_names=names),
                convert_options=pacsv.ConvertOptions(
                    column_types={n: pa.string() for n in names},
                    null_values=[""],
                    strings_can_be_null=True,
                ),
            )
        except pa.ArrowInvalid as exc:
            if not str(exc).startswith("Empty CSV file"):
                raise
            return pa.table({n: pa.array([], pa.string()) for n in names})  # a header alone


def write_table(df: pd.DataFrame | pa.Table, path: str, client: Client | None = None) -> None:
    """Atomically write a table in the format its extension names. An Arrow table is
    written by pyarrow (no pandas frame: a catalog snapshot at scale)."""
    fmt = table_format(path)
    # Through a temp file rather than bytes in memory: click-log tables can be
    # large, and a file lets the stores use resumable / multipart uploads for them.
    suffix = ".csv.gz" if path.lower().endswith(".gz") else f".{fmt}"
    with atomic_local_path(path, client, suffix=suffix) as tmp:
        if isinstance(df, pa.Table):
            if fmt != "csv":
                pq.write_table(df, tmp)
                return
            options = pacsv.WriteOptions(quoting_style="needed")
            if suffix.endswith(".gz"):
                with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
                    pacsv.write_csv(df, f, options)
            else:
                pacsv.write_csv(df, tmp, options)
        elif fmt == "csv":
            # mtime=0 keeps .csv.gz bytes identical for identical tables.
            compression = {"method": "gzip", "mtime": 0} if suffix.endswith(".gz") else None
            df.to_csv(tmp, index=False, compression=compression)
        else:
            df.to_parquet(tmp, engine="pyarrow")
