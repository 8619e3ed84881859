"""One I/O layer for local paths and ``gs://bucket/path`` URLs.

The pipeline runs the same code on a laptop (local directories) and on Vertex /
Kubeflow (Cloud Storage), so every reader and writer goes through here instead of
branching on the path scheme at each call site.

Writes are atomic on both backends because pipeline steps get preempted: a reader
must see either the old file or the complete new one, never a truncated one.
Locally that is a temp file in the destination directory plus ``os.replace``;
on GCS an upload only becomes visible once it is finalised, so a plain upload of a
complete local file is already atomic.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from typing import Any, BinaryIO, cast

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from google.api_core import exceptions as gexc
from google.api_core.retry import Retry
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY

from genco.errors import ContractError

__all__ = [
    "atomic_local_path",
    "download_dir",
    "exists",
    "gcs_client",
    "is_gcs",
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
    "upload_dir",
    "write_bytes",
    "write_json",
    "write_table",
    "write_text",
]

_SCHEME = "gs://"
_EMULATOR_PROJECT = "genco-local"

# The library does not retry uploads without a generation precondition, because a
# blind retry could overwrite a newer object from another writer. Our objects have
# a single writer and each upload carries the whole content, so a retried upload
# can only rewrite the same bytes; retrying is what keeps a transient 503 from
# failing a multi-hour training step.
_UPLOAD_RETRY: Retry = DEFAULT_RETRY


def _read_umask() -> int:
    # mkstemp creates 0600 files; without restoring the usual mode, artefacts written
    # atomically would be unreadable to other users (e.g. a serving container user).
    # os.umask can only be read by setting it, so do it once at import time.
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_read_umask()

# --------------------------------------------------------------------------- paths


def is_gcs(path: str) -> bool:
    """True for ``gs://`` URLs, which must never be handed to ``open()``."""
    return path.startswith(_SCHEME)


def join(base: str, *parts: str) -> str:
    """Join path parts; gs URLs always use ``/`` whatever the host OS is.

    Leading/trailing slashes on gs parts are dropped so that ``join(url, "/x")``
    cannot silently escape to the bucket root the way ``posixpath.join`` would.
    """
    if not is_gcs(base):
        return os.path.join(base, *parts)
    pieces = [base.rstrip("/")]
    pieces.extend(p.strip("/") for p in parts if p.strip("/"))
    return "/".join(pieces)


def _split(path: str, *, need_object: bool = True) -> tuple[str, str]:
    """Split ``gs://bucket/name`` into ``(bucket, name)`` with errors naming the path."""
    rest = path[len(_SCHEME) :]
    bucket, _, name = rest.partition("/")
    if not bucket:
        raise ContractError(f"{path}: gs URL has no bucket name (expected gs://bucket/object)")
    if need_object and (not name.strip("/") or name.endswith("/")):
        raise ContractError(f"{path}: gs URL has no object name (expected gs://bucket/object)")
    return bucket, name


def _dir_prefix(name: str) -> str:
    """Object-name prefix for a gs "directory": empty for the bucket root."""
    name = name.strip("/")
    return f"{name}/" if name else ""


# -------------------------------------------------------------------------- client

_clients: dict[tuple[int, str | None, str | None], storage.Client] = {}
_clients_lock = threading.Lock()


def gcs_client() -> storage.Client:
    """Process-wide default client.

    Building a client costs an auth round trip and a connection pool, so it is
    shared. The cache key includes the pid, because a client inherited across
    ``fork`` shares sockets with the parent, and the emulator settings, because
    tests switch ``STORAGE_EMULATOR_HOST`` on after other code may have built a
    client for real GCS.
    """
    emulator = os.environ.get("STORAGE_EMULATOR_HOST") or None
    project = os.environ.get("GOOGLE_CLOUD_PROJECT") or None
    key = (os.getpid(), emulator, project)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            if emulator:
                # The emulator has no auth; without anonymous credentials the
                # library would go looking for ADC and fail on a dev machine.
                client = storage.Client(
                    project=project or _EMULATOR_PROJECT,
                    credentials=AnonymousCredentials(),
                    client_options={"api_endpoint": emulator},
                )
            else:
                client = storage.Client(project=project)
            _clients[key] = client
        return client


def _resolve(client: storage.Client | None) -> storage.Client:
    return gcs_client() if client is None else client


def _not_found(path: str, bucket: storage.Bucket) -> FileNotFoundError:
    """FileNotFoundError that says whether the object or the whole bucket is missing.

    GCS answers 404 for both; a typo in the bucket name is the more common cause in
    a fresh deployment and deserves its own message. The extra lookup only runs on
    the error path, and a failing lookup (no buckets.get permission) falls back to
    the plain message.
    """
    try:
        bucket_missing = not bucket.exists()
    except gexc.GoogleAPICallError:
        bucket_missing = False
    if bucket_missing:
        return FileNotFoundError(f"{path}: bucket {bucket.name!r} does not exist")
    return FileNotFoundError(f"{path}: no such object")


# --------------------------------------------------------------- existence / listing


def exists(path: str, client: storage.Client | None = None) -> bool:
    """True if the file/object exists, or if it is a non-empty gs "directory".

    GCS has no directories; treating a prefix with objects under it as existing
    keeps ``exists(run_dir)`` meaning the same thing on both backends.
    """
    if not is_gcs(path):
        return os.path.exists(path)
    bucket_name, name = _split(path, need_object=False)
    c = _resolve(client)
    bucket = c.bucket(bucket_name)
    if not name.strip("/"):
        return bool(bucket.exists())
    if not name.endswith("/") and bucket.blob(name).exists():
        return True
    try:
        blobs = c.list_blobs(bucket_name, prefix=_dir_prefix(name), max_results=1)
        return any(True for _ in blobs)
    except gexc.NotFound:
        return False


def listdir(path: str, client: storage.Client | None = None) -> list[str]:
    """Sorted names of direct children.

    A gs prefix with nothing under it raises FileNotFoundError, like a missing
    local directory, so callers get the same failure on both backends instead of
    an empty list that hides a wrong path.
    """
    if not is_gcs(path):
        return sorted(os.listdir(path))
    bucket_name, name = _split(path, need_object=False)
    c = _resolve(client)
    prefix = _dir_prefix(name)
    names: set[str] = set()
    placeholder = False
    try:
        pages = c.list_blobs(bucket_name, prefix=prefix, delimiter="/")
        for blob in pages:
            child = blob.name[len(prefix) :]
            if child:
                names.add(child)
            else:
                # A zero-byte "folder" object made by the console or gsutil.
                placeholder = True
        # ``prefixes`` is only complete after the iterator has been exhausted.
        names.update(p[len(prefix) :].rstrip("/") for p in pages.prefixes)
    except gexc.NotFound:
        raise _not_found(path, c.bucket(bucket_name)) from None
    if not names and not placeholder and prefix:
        raise FileNotFoundError(f"{path}: no such directory (no objects under this prefix)")
    return sorted(names)


def remove(path: str, client: storage.Client | None = None) -> None:
    """Delete one file/object; a missing one is an error so typos do not pass silently."""
    if not is_gcs(path):
        os.remove(path)
        return
    bucket_name, name = _split(path)
    bucket = _resolve(client).bucket(bucket_name)
    try:
        bucket.blob(name).delete()
    except gexc.NotFound:
        raise _not_found(path, bucket) from None


def makedirs(path: str) -> None:
    """Create a local directory tree; GCS needs none because prefixes are implicit."""
    if not is_gcs(path):
        os.makedirs(path, exist_ok=True)


# ---------------------------------------------------------------------- raw I/O


@contextlib.contextmanager
def open_read(path: str, client: storage.Client | None = None) -> Iterator[BinaryIO]:
    """Stream a file/object without holding all of it in memory.

    The gs object's metadata is fetched up front for two reasons: a missing object
    then fails here with FileNotFoundError rather than on the first ``read()``,
    and the generation it returns pins every chunked range read to the same
    version even if a writer replaces the object mid-stream.
    """
    if not is_gcs(path):
        with open(path, "rb") as f:
            yield f
        return
    bucket_name, name = _split(path)
    bucket = _resolve(client).bucket(bucket_name)
    blob = bucket.blob(name)
    try:
        blob.reload()
    except gexc.NotFound:
        raise _not_found(path, bucket) from None
    with blob.open("rb") as reader:
        yield cast(BinaryIO, reader)


def read_bytes(path: str, client: storage.Client | None = None) -> bytes:
    """Whole file/object as bytes."""
    if not is_gcs(path):
        with open(path, "rb") as f:
            return f.read()
    bucket_name, name = _split(path)
    bucket = _resolve(client).bucket(bucket_name)
    try:
        return bytes(bucket.blob(name).download_as_bytes())
    except gexc.NotFound:
        raise _not_found(path, bucket) from None


def _upload_file(local: str, path: str, client: storage.Client | None) -> None:
    bucket_name, name = _split(path)
    bucket = _resolve(client).bucket(bucket_name)
    try:
        # One finalised upload (multipart below 8 MiB, resumable above): the object
        # is not visible until the last byte is committed, which is the atomic step.
        bucket.blob(name).upload_from_filename(local, retry=_UPLOAD_RETRY)
    except gexc.NotFound:
        raise FileNotFoundError(f"{path}: bucket {bucket_name!r} does not exist") from None


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
def atomic_local_path(
    path: str, client: storage.Client | None = None, suffix: str = ""
) -> Iterator[str]:
    """Yield a local temp path to write; publish it to ``path`` only on success.

    Exists for writers that insist on a real filename (pyarrow's ParquetWriter,
    ``torch.save``, ``to_csv`` with compression). ``suffix`` is appended to the
    temp name for writers that pick a format from the extension.

    Local: the temp file lives in the destination directory so ``os.replace`` is
    a same-filesystem rename, i.e. atomic; it is fsynced first, otherwise a crash
    right after the rename can leave a zero-length file on ext4/xfs.
    GCS: the finished temp file is uploaded in one go. On an exception the temp
    file is deleted and the destination is left exactly as it was.
    """
    if is_gcs(path):
        _split(path)  # fail before the caller spends time producing the data
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
        if is_gcs(path):
            _upload_file(tmp, path, client)
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


def write_bytes(path: str, data: bytes, client: storage.Client | None = None) -> None:
    """Atomically replace ``path`` with ``data``."""
    if is_gcs(path):
        bucket_name, name = _split(path)
        bucket = _resolve(client).bucket(bucket_name)
        try:
            # Straight from memory: a single upload is already atomic on GCS, so a
            # temp file would only add a disk round trip.
            bucket.blob(name).upload_from_string(data, retry=_UPLOAD_RETRY)
        except gexc.NotFound:
            raise FileNotFoundError(f"{path}: bucket {bucket_name!r} does not exist") from None
        return
    with atomic_local_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def read_text(path: str, client: storage.Client | None = None) -> str:
    """UTF-8 text; fixed encoding so results don't depend on the container locale."""
    return read_bytes(path, client).decode("utf-8")


def write_text(path: str, text: str, client: storage.Client | None = None) -> None:
    """Atomically write UTF-8 text."""
    write_bytes(path, text.encode("utf-8"), client)


def read_json(path: str, client: storage.Client | None = None) -> Any:
    """Parse a JSON file/object."""
    return json.loads(read_bytes(path, client))


def write_json(path: str, obj: Any, client: storage.Client | None = None) -> None:
    """Atomically write human-diffable JSON (indented, key order kept, final newline).

    ``ensure_ascii=False`` keeps non-ASCII creative text (e.g. Japanese headlines)
    readable in configs and reports instead of ``\\uXXXX`` escapes.
    """
    text = json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n"
    write_text(path, text, client)


# ------------------------------------------------------------------ directories


def _local_files(local_dir: str) -> Iterator[tuple[str, str]]:
    """(absolute file path, ``/``-separated relative path) for every file below."""
    if not os.path.isdir(local_dir):
        if os.path.exists(local_dir):
            raise NotADirectoryError(f"{local_dir}: not a directory")
        raise FileNotFoundError(f"{local_dir}: no such directory")
    for root, _dirs, files in os.walk(local_dir):
        for fname in sorted(files):
            full = os.path.join(root, fname)
            rel = os.path.relpath(full, local_dir).replace(os.sep, "/")
            yield full, rel


def _copy_local_tree(src: str, dest: str) -> None:
    src_abs, dest_abs = os.path.abspath(src), os.path.abspath(dest)
    if dest_abs == src_abs or dest_abs.startswith(src_abs + os.sep):
        # os.walk would keep finding the files it is copying.
        raise ContractError(f"{dest}: destination is inside the source directory {src}")
    files = list(_local_files(src))
    os.makedirs(dest, exist_ok=True)
    for root, dirs, _files in os.walk(src):
        for d in dirs:  # keep empty directories: some readers expect them
            rel = os.path.relpath(os.path.join(root, d), src)
            os.makedirs(os.path.join(dest, rel), exist_ok=True)
    for full, rel in files:
        with atomic_local_path(os.path.join(dest, *rel.split("/"))) as tmp:
            shutil.copyfile(full, tmp)


def upload_dir(local_dir: str, dest: str, client: storage.Client | None = None) -> None:
    """Copy a local directory tree to a local or gs destination, file by file.

    Each file is published atomically; the tree as a whole is not, so write a
    marker file last if readers need to know the copy is complete.
    """
    if not is_gcs(dest):
        _copy_local_tree(local_dir, dest)
        return
    bucket_name, name = _split(dest, need_object=False)
    prefix = _dir_prefix(name)
    c = _resolve(client)
    for full, rel in _local_files(local_dir):
        _upload_file(full, f"{_SCHEME}{bucket_name}/{prefix}{rel}", c)


def _safe_local_path(local_dir: str, rel: str, url: str) -> str:
    """Local path for object-relative name ``rel``; refuses names that escape ``local_dir``.

    Object names are untrusted input: ``a/../../x`` is a valid GCS name.
    """
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ContractError(f"{url}: unsafe object name for a local path")
    return os.path.join(local_dir, *parts)


def download_dir(src: str, local_dir: str, client: storage.Client | None = None) -> None:
    """Copy a local or gs directory tree into ``local_dir``, each file atomically."""
    if not is_gcs(src):
        _copy_local_tree(src, local_dir)
        return
    bucket_name, name = _split(src, need_object=False)
    prefix = _dir_prefix(name)
    c = _resolve(client)
    try:
        blobs = [b for b in c.list_blobs(bucket_name, prefix=prefix) if not b.name.endswith("/")]
    except gexc.NotFound:
        raise _not_found(src, c.bucket(bucket_name)) from None
    if not blobs:
        raise FileNotFoundError(f"{src}: no such directory (no objects under this prefix)")
    # Validate every name before writing anything, so a bad name cannot leave a
    # half-populated directory behind.
    targets: list[tuple[storage.Blob, str, str]] = []
    for blob in blobs:
        url = f"{_SCHEME}{bucket_name}/{blob.name}"
        targets.append((blob, url, _safe_local_path(local_dir, blob.name[len(prefix) :], url)))
    os.makedirs(local_dir, exist_ok=True)
    for blob, url, local in targets:
        with atomic_local_path(local) as tmp:
            try:
                blob.download_to_filename(tmp)
            except gexc.NotFound:
                # Deleted between listing and download.
                raise FileNotFoundError(f"{url}: no such object") from None


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
    client: storage.Client | None = None,
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
    if is_gcs(path):
        # Parquet needs random access (footer first); one download beats many
        # small ranged reads through a streaming reader.
        table = pq.read_table(pa.BufferReader(read_bytes(path, client)))
    else:
        table = pq.read_table(path)
    df = table.to_pandas()
    return df.astype(dtype) if dtype else df


def write_table(df: pd.DataFrame, path: str, client: storage.Client | None = None) -> None:
    """Atomically write a table in the format its extension names."""
    fmt = table_format(path)
    # Through a temp file rather than bytes in memory: click-log tables can be
    # large, and a file lets GCS use a resumable upload for them.
    suffix = ".csv.gz" if path.lower().endswith(".gz") else f".{fmt}"
    with atomic_local_path(path, client, suffix=suffix) as tmp:
        if fmt == "csv":
            # mtime=0 keeps .csv.gz bytes identical for identical tables.
            compression = {"method": "gzip", "mtime": 0} if suffix.endswith(".gz") else None
            df.to_csv(tmp, index=False, compression=compression)
        else:
            df.to_parquet(tmp, engine="pyarrow")
