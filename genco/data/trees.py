"""Copying whole directory trees between local disk and ``gs://``, file by file.

Each file is published atomically (``storage.atomic_local_path`` or one upload); a tree as a
whole is not, so writers mark completion with a file written last (a bundle's manifest).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

from google.api_core import exceptions as gexc
from google.cloud.storage import Blob, Client

from genco.data import storage
from genco.errors import ContractError


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
        with storage.atomic_local_path(os.path.join(dest, *rel.split("/"))) as tmp:
            shutil.copyfile(full, tmp)


def _gcs_dir(url: str, client: Client | None) -> tuple[str, str, Client]:
    """A gs:// directory URL as (bucket, object prefix ending in "/", client)."""
    bucket_name, name = storage._split(url, need_object=False)
    return bucket_name, storage._dir_prefix(name), storage._resolve(client)


def upload_dir(local_dir: str, dest: str, client: Client | None = None) -> None:
    """Copy a local directory tree to a local or gs destination, file by file.

    Each file is published atomically; the tree as a whole is not, so write a
    marker file last if readers need to know the copy is complete.
    """
    if not storage.is_gcs(dest):
        _copy_local_tree(local_dir, dest)
        return
    bucket_name, prefix, c = _gcs_dir(dest, client)
    for full, rel in _local_files(local_dir):
        storage._upload_file(full, f"{storage._SCHEME}{bucket_name}/{prefix}{rel}", c)


def _safe_local_path(local_dir: str, rel: str, url: str) -> str:
    """Local path for object-relative name ``rel``; refuses names that escape ``local_dir``.

    Object names are untrusted input: ``a/../../x`` is a valid GCS name.
    """
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ContractError(f"{url}: unsafe object name for a local path")
    return os.path.join(local_dir, *parts)


def download_dir(src: str, local_dir: str, client: Client | None = None) -> None:
    """Copy a local or gs directory tree into ``local_dir``, each file atomically."""
    if not storage.is_gcs(src):
        _copy_local_tree(src, local_dir)
        return
    bucket_name, prefix, c = _gcs_dir(src, client)
    try:
        blobs = [b for b in c.list_blobs(bucket_name, prefix=prefix) if not b.name.endswith("/")]
    except gexc.NotFound:
        raise storage._not_found(src, c.bucket(bucket_name)) from None
    if not blobs:
        raise FileNotFoundError(f"{src}: no such directory (no objects under this prefix)")
    # Validate every name before writing anything, so a bad name cannot leave a
    # half-populated directory behind.
    targets: list[tuple[Blob, str, str]] = []
    for blob in blobs:
        url = f"{storage._SCHEME}{bucket_name}/{blob.name}"
        targets.append((blob, url, _safe_local_path(local_dir, blob.name[len(prefix) :], url)))
    os.makedirs(local_dir, exist_ok=True)
    for blob, url, local in targets:
        with storage.atomic_local_path(local) as tmp:
            try:
                blob.download_to_filename(tmp)
            except gexc.NotFound:
                # Deleted between listing and download.
                raise FileNotFoundError(f"{url}: no such object") from None
