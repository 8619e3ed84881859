"""Copying whole directory trees between local disk and ``gs://`` or ``s3://``, file by file.

Each file is published atomically (``storage.atomic_local_path`` or one upload); a tree as a
whole is not, so writers mark completion with a file written last (a bundle's manifest).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING, cast

from genco.data import storage
from genco.data.fs import (
    filesystem,
    is_remote,
    join,
    naming,
    not_found,
    object_key,
    split_url,
    url_scheme,
)
from genco.data.storage import atomic_local_path
from genco.errors import ContractError, NotFoundError

if TYPE_CHECKING:
    from genco.data.fs import Client


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
    split_url(dest, need_object=False)
    for full, rel in _local_files(local_dir):
        storage.upload_file(full, join(dest, rel), client)


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
    scheme = cast(str, url_scheme(src))
    bucket, name = split_url(src, need_object=False)
    fs = filesystem(src, client)
    key = object_key(bucket, name)
    missing = "no such directory (no objects under this prefix)"
    with naming(src, fs, missing):
        found = [k for k in fs.find(key) if not k.endswith("/")]
    # ``find`` on an object returns the object itself; a directory needs objects *under* it.
    found = [k for k in found if k.startswith(key + "/")]
    if not found:
        raise not_found(src, fs, missing)
    # Validate every name before writing anything, so a bad name cannot leave a
    # half-populated directory behind.
    targets = []
    for k in found:
        url = f"{scheme}://{k}"
        targets.append((k, url, _safe_local_path(local_dir, k[len(key) + 1 :], url)))
    os.makedirs(local_dir, exist_ok=True)
    for k, url, local in targets:
        with atomic_local_path(local) as tmp, naming(url, fs):  # deleted since the listing
            fs.get_file(k, tmp)


def missing_dirs(path: str) -> list[str]:
    """The local directories a write to ``path`` would create, deepest first ([] for
    object stores, which have no directories): what ``undo_writes`` removes again."""
    if is_remote(path):
        return []
    out = []
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        out.append(parent)
        parent = os.path.dirname(parent)
    return out


def undo_writes(files: list[str], dirs: list[str], client: Client | None = None) -> None:
    """Remove files this process wrote (those that exist) and then the directories it created
    for them (``missing_dirs``, deepest first) if they are empty: a failed step leaves the
    tree as it found it."""
    for path in files:
        if storage.exists(path, client=client):
            storage.remove(path, client=client)
    for d in sorted(set(dirs), key=len, reverse=True):
        if os.path.isdir(d) and not os.listdir(d):
            os.rmdir(d)
