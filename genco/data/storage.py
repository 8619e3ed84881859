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
import json
import os
import re
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from genco.errors import ConfigError, ContractError, NotFoundError

if TYPE_CHECKING:
    from typing import TypeAlias

    from google.cloud import storage

    # What ``client=`` accepts: a filesystem, or a GCS client to take settings from.
    Client: TypeAlias = AbstractFileSystem | storage.Client

__all__ = [
    "atomic_local_path",
    "download_dir",
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
    "upload_dir",
    "write_bytes",
    "write_json",
    "write_table",
    "write_text",
]

_SCHEMES = ("gs", "s3")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_EMULATOR_PROJECT = "genco-local"


def _read_umask() -> int:
    # mkstemp creates 0600 files; without restoring the usual mode, artefacts written
    # atomically would be unreadable to other users (e.g. a serving container user).
    # os.umask can only be read by setting it, so do it once at import time.
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_read_umask()

# --------------------------------------------------------------------------- paths


def _scheme(path: str) -> str | None:
    """``"gs"``/``"s3"`` for object-store URLs, None for local paths.

    Any other ``scheme://`` is refused rather than taken for a local relative path, which
    would silently create a directory called ``s3a:`` in the working directory.
    """
    match = _URL.match(path)
    if match is None:
        return None
    scheme = match.group(1).lower()
    if scheme not in _SCHEMES:
        raise ContractError(
            f"{path}: unsupported URL scheme '{scheme}://'; use a local path, gs:// or s3://"
        )
    return scheme


def is_gcs(path: str) -> bool:
    """True for ``gs://`` URLs."""
    return path.startswith("gs://")


def is_s3(path: str) -> bool:
    """True for ``s3://`` URLs."""
    return path.startswith("s3://")


def is_remote(path: str) -> bool:
    """True for object-store URLs (``gs://``, ``s3://``), which must never reach ``open()``."""
    return _scheme(path) is not None


def join(base: str, *parts: str) -> str:
    """Join path parts; URLs always use ``/`` whatever the host OS is.

    Leading/trailing slashes on URL parts are dropped so that ``join(url, "/x")`` cannot
    silently escape to the bucket root the way ``posixpath.join`` would.
    """
    if not is_remote(base):
        return os.path.join(base, *parts)
    pieces = [base.rstrip("/")]
    pieces.extend(p.strip("/") for p in parts if p.strip("/"))
    return "/".join(pieces)


def _split(path: str, *, need_object: bool = True) -> tuple[str, str]:
    """Split ``gs://bucket/name`` into ``(bucket, name)`` with errors naming the path."""
    scheme = cast(str, _scheme(path))
    rest = path[len(scheme) + 3 :]
    bucket, _, name = rest.partition("/")
    expected = f"expected {scheme}://bucket/object"
    if not bucket:
        raise ContractError(f"{path}: {scheme} URL has no bucket name ({expected})")
    if need_object and (not name.strip("/") or name.endswith("/")):
        raise ContractError(f"{path}: {scheme} URL has no object name ({expected})")
    return bucket, name.strip("/")


def _key(bucket: str, name: str) -> str:
    """fsspec's path for an object or prefix: ``bucket/name`` without the scheme."""
    return f"{bucket}/{name}" if name else bucket


# ---------------------------------------------------------------------- filesystems

_filesystems: dict[tuple[Any, ...], AbstractFileSystem] = {}
_filesystems_lock = threading.Lock()
_gcs_clients: dict[tuple[int, str | None, str | None], storage.Client] = {}
_client_filesystems: weakref.WeakKeyDictionary[storage.Client, AbstractFileSystem] = (
    weakref.WeakKeyDictionary()
)


def _emulator_host() -> str | None:
    host = os.environ.get("STORAGE_EMULATOR_HOST") or None
    if host and not host.startswith(("http://", "https://")):
        host = f"http://{host}"
    return host


def _s3_endpoint() -> str | None:
    for name in ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(name):
            return os.environ[name]
    return None


def _cached(key: tuple[Any, ...], build: Any) -> Any:
    # Building a filesystem costs an auth round trip and a connection pool, so it is
    # shared. The key includes the pid, because a client inherited across ``fork`` shares
    # sockets with the parent, and the settings read from the environment, because tests
    # switch an emulator on after other code may have built a client for the real cloud.
    with _filesystems_lock:
        fs = _filesystems.get(key)
        if fs is None:
            fs = _filesystems[key] = build()
        return fs


def _gcsfs(project: str | None, token: Any, endpoint: str | None) -> AbstractFileSystem:
    # gcsfs' experimental hierarchical-namespace layer probes bucket APIs that emulators
    # do not implement; it is chosen at import time, so say no before the first import.
    # The plain GCSFileSystem is used either way: genco needs no HNS-only operation.
    if endpoint:
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    from gcsfs.core import GCSFileSystem

    return cast(
        AbstractFileSystem,
        GCSFileSystem(
            project=project or "",
            token=token,
            endpoint_url=endpoint,
            use_listings_cache=False,
            skip_instance_cache=True,
        ),
    )


def _gcs_filesystem() -> AbstractFileSystem:
    emulator = _emulator_host()
    project = os.environ.get("GOOGLE_CLOUD_PROJECT") or None
    if emulator:
        # The emulator has no auth; looking for credentials would fail on a dev machine.
        return cast(
            AbstractFileSystem,
            _cached(
                ("gs", os.getpid(), emulator, project),
                lambda: _gcsfs(project or _EMULATOR_PROJECT, "anon", emulator),
            ),
        )
    # "google_default" (ADC), not gcsfs' default chain, which ends in anonymous access:
    # without credentials a private bucket would answer a confusing 401 per object
    # instead of one DefaultCredentialsError up front.
    return cast(
        AbstractFileSystem,
        _cached(
            ("gs", os.getpid(), None, project),
            lambda: _gcsfs(project, "google_default", None),
        ),
    )


def _s3_filesystem() -> AbstractFileSystem:
    endpoint = _s3_endpoint()

    def build() -> AbstractFileSystem:
        from s3fs import S3FileSystem

        kwargs: dict[str, Any] = {}
        if endpoint:
            # MinIO and other S3-compatible servers address buckets by path, not by
            # virtual host (which needs wildcard DNS).
            kwargs = {
                "endpoint_url": endpoint,
                "config_kwargs": {"s3": {"addressing_style": "path"}},
            }
        return cast(
            AbstractFileSystem,
            S3FileSystem(use_listings_cache=False, skip_instance_cache=True, **kwargs),
        )

    return cast(AbstractFileSystem, _cached(("s3", os.getpid(), endpoint), build))


def _from_gcs_client(client: storage.Client) -> AbstractFileSystem:
    """A gcsfs filesystem with the project, credentials and endpoint of ``client``, one per
    client for as long as the client lives (weakly keyed: an id could be reused)."""
    with _filesystems_lock:
        fs = _client_filesystems.get(client)
    if fs is None:
        endpoint = client.api_endpoint
        fs = _gcsfs(
            client.project,
            client._credentials,  # no public accessor; the client's own auth is the point
            None if endpoint == "https://storage.googleapis.com" else endpoint,
        )
        with _filesystems_lock:
            fs = _client_filesystems.setdefault(client, fs)
    return fs


def filesystem(path: str, client: Client | None = None) -> AbstractFileSystem:
    """The fsspec filesystem that serves the object-store URL ``path``.

    ``client``: an fsspec filesystem (used as is), a ``google.cloud.storage.Client`` (its
    project, credentials and endpoint), or None for the shared default of the scheme.
    """
    scheme = _scheme(path)
    if scheme is None:
        raise ConfigError(f"{path}: a local path has no object-store filesystem")
    if isinstance(client, AbstractFileSystem):
        return client
    if client is not None:
        from google.cloud import storage as gcs

        if not isinstance(client, gcs.Client):
            raise ConfigError(
                f"client: expected an fsspec filesystem or a google.cloud.storage.Client, "
                f"got {type(client).__name__}"
            )
        if scheme != "gs":
            raise ConfigError(f"{path}: a google.cloud.storage.Client cannot reach {scheme}://")
        return _from_gcs_client(client)
    return _gcs_filesystem() if scheme == "gs" else _s3_filesystem()


def gcs_client() -> storage.Client:
    """Process-wide ``google.cloud.storage.Client`` for what fsspec does not do (creating
    buckets in tests, admin scripts); anonymous on an emulator. Cached like the filesystems."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    emulator = _emulator_host()
    project = os.environ.get("GOOGLE_CLOUD_PROJECT") or None
    key = (os.getpid(), emulator, project)
    with _filesystems_lock:
        client = _gcs_clients.get(key)
        if client is None:
            if emulator:
                client = gcs.Client(
                    project=project or _EMULATOR_PROJECT,
                    credentials=AnonymousCredentials(),
                    client_options={"api_endpoint": emulator},
                )
            else:
                client = gcs.Client(project=project)
            _gcs_clients[key] = client
        return client


def _not_found(path: str, fs: AbstractFileSystem, what: str = "no such object") -> NotFoundError:
    """NotFoundError that says whether the object or the whole bucket is missing.

    Both stores answer 404 for both; a typo in the bucket name is the more common cause in
    a fresh deployment and deserves its own message. The extra lookup only runs on the
    error path, and a failing lookup (no permission to read the bucket) falls back to the
    plain message.
    """
    bucket, _ = _split(path, need_object=False)
    try:
        bucket_missing = not fs.exists(bucket)
    except OSError:
        bucket_missing = False
    if bucket_missing:
        return NotFoundError(f"{path}: bucket '{bucket}' does not exist")
    return NotFoundError(f"{path}: {what}")


@contextlib.contextmanager
def _naming(path: str, fs: AbstractFileSystem, what: str = "no such object") -> Iterator[None]:
    """Errors that name ``path`` rather than a request URL: a missing object or bucket is a
    NotFoundError, a refusal (HTTP 403) a PermissionError on both stores."""
    try:
        yield
    except FileNotFoundError:
        raise _not_found(path, fs, what) from None
    except PermissionError as exc:  # s3fs: AccessDenied and friends
        raise _denied(path, exc) from None
    except OSError as exc:
        # gcsfs raises a bare OSError("Forbidden: <url>\n<message>") for a 403.
        if not str(exc).startswith("Forbidden"):
            raise
        raise _denied(path, exc) from None


def _denied(path: str, exc: OSError) -> PermissionError:
    reason = " ".join(str(exc).split("\n")[-1].split()) or "forbidden"
    return PermissionError(
        f"{path}: access denied ({reason}); check that the credentials may use this bucket"
    )


# --------------------------------------------------------------- existence / listing


def exists(path: str, client: Client | None = None) -> bool:
    """True if the file/object exists, or if it is a non-empty object-store "directory".

    Object stores have no directories; treating a prefix with objects under it as existing
    keeps ``exists(run_dir)`` meaning the same thing on every backend.
    """
    if not is_remote(path):
        return os.path.exists(path)
    bucket, name = _split(path, need_object=False)
    fs = filesystem(path, client)
    with _naming(path, fs):
        return bool(fs.exists(_key(bucket, name)))


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
    bucket, name = _split(path, need_object=False)
    fs = filesystem(path, client)
    key = _key(bucket, name)
    with _naming(path, fs, "no such directory (no objects under this prefix)"):
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
    bucket, name = _split(path)
    fs = filesystem(path, client)
    # S3 deletes a missing key without complaint, so ask first.
    if not fs.isfile(_key(bucket, name)):
        raise _not_found(path, fs)
    with _naming(path, fs):
        fs.rm_file(_key(bucket, name))


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
    bucket, name = _split(path)
    fs = filesystem(path, client)
    with _naming(path, fs):
        reader = fs.open(_key(bucket, name), "rb")
    with reader:
        yield cast(BinaryIO, reader)


def read_bytes(path: str, client: Client | None = None) -> bytes:
    """Whole file/object as bytes (one request: a concurrent overwrite cannot mix versions)."""
    if not is_remote(path):
        with open(path, "rb") as f:
            return f.read()
    bucket, name = _split(path)
    fs = filesystem(path, client)
    with _naming(path, fs):
        return bytes(fs.cat_file(_key(bucket, name)))


def _upload_file(local: str, path: str, client: Any) -> None:
    bucket, name = _split(path)
    fs = filesystem(path, client)
    # One upload: GCS finalises it (single or resumable) and S3 completes it (PUT or
    # multipart) in one step, and nothing is visible before; that is the atomic step.
    # Both filesystems retry transient failures; a retried upload rewrites the same bytes.
    with _naming(path, fs):
        fs.put_file(local, _key(bucket, name))


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
        if remote:
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


def write_bytes(path: str, data: bytes, client: Client | None = None) -> None:
    """Atomically replace ``path`` with ``data``."""
    if is_remote(path):
        bucket, name = _split(path)
        fs = filesystem(path, client)
        # Straight from memory: one upload is already atomic on both stores, so a temp
        # file would only add a disk round trip.
        with _naming(path, fs):
            fs.pipe_file(_key(bucket, name), data)
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


# ------------------------------------------------------------------ directories


def _local_files(local_dir: str) -> Iterator[tuple[str, str]]:
    """(absolute file path, ``/``-separated relative path) for every file below."""
    if not os.path.isdir(local_dir):
        if os.path.exists(local_dir):
            raise NotADirectoryError(f"{local_dir}: not a directory")
        raise NotFoundError(f"{local_dir}: no such directory")
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


def upload_dir(local_dir: str, dest: str, client: Client | None = None) -> None:
    """Copy a local directory tree to a local or object-store destination, file by file.

    Each file is published atomically; the tree as a whole is not, so write a
    marker file last if readers need to know the copy is complete.
    """
    if not is_remote(dest):
        _copy_local_tree(local_dir, dest)
        return
    _split(dest, need_object=False)
    for full, rel in _local_files(local_dir):
        _upload_file(full, join(dest, rel), client)


def _safe_local_path(local_dir: str, rel: str, url: str) -> str:
    """Local path for object-relative name ``rel``; refuses names that escape ``local_dir``.

    Object names are untrusted input: ``a/../../x`` is a valid GCS and S3 name.
    """
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ContractError(f"{url}: unsafe object name for a local path")
    return os.path.join(local_dir, *parts)


def download_dir(src: str, local_dir: str, client: Client | None = None) -> None:
    """Copy a local or object-store directory tree into ``local_dir``, each file atomically."""
    if not is_remote(src):
        _copy_local_tree(src, local_dir)
        return
    scheme = cast(str, _scheme(src))
    bucket, name = _split(src, need_object=False)
    fs = filesystem(src, client)
    key = _key(bucket, name)
    missing = "no such directory (no objects under this prefix)"
    with _naming(src, fs, missing):
        found = [k for k in fs.find(key) if not k.endswith("/")]
    # ``find`` on an object returns the object itself; a directory needs objects *under* it.
    found = [k for k in found if k.startswith(key + "/")]
    if not found:
        raise _not_found(src, fs, missing)
    # Validate every name before writing anything, so a bad name cannot leave a
    # half-populated directory behind.
    targets = []
    for k in found:
        url = f"{scheme}://{k}"
        targets.append((k, url, _safe_local_path(local_dir, k[len(key) + 1 :], url)))
    os.makedirs(local_dir, exist_ok=True)
    for k, url, local in targets:
        with atomic_local_path(local) as tmp, _naming(url, fs):  # deleted since the listing
            fs.get_file(k, tmp)


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


def write_table(df: pd.DataFrame, path: str, client: Client | None = None) -> None:
    """Atomically write a table in the format its extension names."""
    fmt = table_format(path)
    # Through a temp file rather than bytes in memory: click-log tables can be
    # large, and a file lets the stores use resumable / multipart uploads for them.
    suffix = ".csv.gz" if path.lower().endswith(".gz") else f".{fmt}"
    with atomic_local_path(path, client, suffix=suffix) as tmp:
        if fmt == "csv":
            # mtime=0 keeps .csv.gz bytes identical for identical tables.
            compression = {"method": "gzip", "mtime": 0} if suffix.endswith(".gz") else None
            df.to_csv(tmp, index=False, compression=compression)
        else:
            df.to_parquet(tmp, engine="pyarrow")
