"""Paths and filesystems under ``genco.data.storage``: which backend a path names (local,
``gs://``, ``s3://``), the fsspec filesystem that reaches it (emulator and endpoint settings
from the environment), and the errors that name the path."""

from __future__ import annotations

import contextlib
import os
import re
import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

from fsspec import AbstractFileSystem

from genco.errors import ConfigError, ContractError, NotFoundError

if TYPE_CHECKING:
    from typing import TypeAlias

    from google.cloud import storage

    Client: TypeAlias = AbstractFileSystem | storage.Client

_SCHEMES = ("gs", "s3")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_EMULATOR_PROJECT = "genco-local"


# --------------------------------------------------------------------------- paths


def url_scheme(path: str) -> str | None:
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
    return url_scheme(path) is not None


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


def split_url(path: str, *, need_object: bool = True) -> tuple[str, str]:
    """Split ``gs://bucket/name`` into ``(bucket, name)`` with errors naming the path."""
    scheme = cast(str, url_scheme(path))
    rest = path[len(scheme) + 3 :]
    bucket, _, name = rest.partition("/")
    expected = f"expected {scheme}://bucket/object"
    if not bucket:
        raise ContractError(f"{path}: {scheme} URL has no bucket name ({expected})")
    if need_object and (not name.strip("/") or name.endswith("/")):
        raise ContractError(f"{path}: {scheme} URL has no object name ({expected})")
    return bucket, name.strip("/")


def object_key(bucket: str, name: str) -> str:
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
    scheme = url_scheme(path)
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


def not_found(path: str, fs: AbstractFileSystem, what: str = "no such object") -> NotFoundError:
    """NotFoundError that says whether the object or the whole bucket is missing.

    Both stores answer 404 for both; a typo in the bucket name is the more common cause in
    a fresh deployment and deserves its own message. The extra lookup only runs on the
    error path, and a failing lookup (no permission to read the bucket) falls back to the
    plain message.
    """
    bucket, _ = split_url(path, need_object=False)
    try:
        bucket_missing = not bucket_exists(fs, bucket)
    except PermissionError:
        bucket_missing = False
    if bucket_missing:
        return NotFoundError(f"{path}: bucket '{bucket}' does not exist")
    return NotFoundError(f"{path}: {what}")


def bucket_exists(fs: AbstractFileSystem, bucket: str) -> bool:
    """Whether ``bucket`` exists; only a not-found answer means no.

    s3fs' own ``exists(bucket)`` answers False for any failure of its probes (a refused
    connection, missing credentials, a 403), which would turn an outage into "no such
    bucket". HeadBucket is asked directly instead, and everything but a 404 propagates.
    """
    if "s3" in _protocols(fs):
        try:
            fs.call_s3("head_bucket", Bucket=bucket)  # type: ignore[attr-defined]
        except FileNotFoundError:
            return False
        return True
    return bool(fs.exists(bucket))  # gcsfs and local: False only for a not-found answer


def _protocols(fs: AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


@contextlib.contextmanager
def naming(path: str, fs: AbstractFileSystem, what: str = "no such object") -> Iterator[None]:
    """Errors that name ``path`` rather than a request URL: a missing object or bucket is a
    NotFoundError, a refusal (HTTP 403) a PermissionError on both stores."""
    try:
        yield
    except FileNotFoundError:
        raise not_found(path, fs, what) from None
    except PermissionError as exc:  # s3fs: AccessDenied and friends
        raise denied(path, exc) from None
    except OSError as exc:
        # gcsfs raises a bare OSError("Forbidden: <url>\n<message>") for a 403.
        if not str(exc).startswith("Forbidden"):
            raise
        raise denied(path, exc) from None


def denied(path: str, exc: OSError) -> PermissionError:
    reason = " ".join(str(exc).split("\n")[-1].split()) or "forbidden"
    return PermissionError(
        f"{path}: access denied ({reason}); check that the credentials may use this bucket"
    )
