"""The model store: versioned bundles, one atomic pointer to production, rollback.

Layout (local directory or ``gs://bucket/prefix``)::

    STORE/versions/<version>/      a complete bundle (manifest.json written last)
    STORE/CURRENT.json             {"version", "path", "previous": [...], "updated_at", ...}

Readers (the pipeline's warm start and evaluation, ``genco recommend``, the serving
container) follow ``CURRENT.json`` and never list ``versions/``: a version becomes
production only when the pointer names it, and the pointer is replaced in one atomic write
after every file of the version is in place. So a reader sees either the old production
or the complete new one, even if a deploy dies half way. Versions are never deleted:
rollback is a pointer change.

The pointer update is a compare-and-swap: a deploy remembers the pointer it read (the
sha256 of the local file, or the GCS object's generation) and replaces it only if it is
unchanged, under an ``fcntl`` lock on ``STORE/.CURRENT.json.lock`` locally (the kernel
drops it if the process dies) and with an ``if_generation_match`` precondition on GCS. Of
two racing deploys exactly one moves the pointer; the other gets a ``StoreError`` and
changes nothing. The pointer is the commit point: serving (``on_promote``) is prepared
before it and switched to it after it, and leftovers of runs that died (version
directories without a manifest, ``.tmp`` files) older than the current deploy are removed
after it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from google.api_core import exceptions as gexc

from genco.data import storage, trees
from genco.errors import BundleError, StoreError
from genco.models.checkpoint import (
    MANIFEST,
    VERSION_RE,
    check_version,
    read_manifest,
    verify_bundle,
    version_id,
)

if TYPE_CHECKING:
    from google.cloud.storage import Client

POINTER = "CURRENT.json"
LOCK = ".CURRENT.json.lock"
VERSIONS = "versions"
STORE_FORMAT = "genco.model_store/1"
DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
# atomic_local_path's temp files: ``.<name>.<random>.tmp[suffix]``.
TMP_RE = re.compile(r"^\..+\.tmp[^/]*$")

# on_promote(version_dir, version) prepares serving before the pointer moves (if it raises,
# production is unchanged) and may return a step to run once the pointer has moved.
OnPromote = Callable[[str, str], "Callable[[], object] | None"]


@dataclass(frozen=True)
class DeployResult:
    """What a promote or rollback did; ``deployed`` is False when the pointer did not move."""

    deployed: bool
    version: str | None
    version_dir: str | None
    previous: str | None
    reason: str
    removed: tuple[str, ...] = field(default=())  # leftovers of dead runs cleaned up

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------- reading


def read_pointer(store: str, client: Client | None = None) -> dict | None:
    """The parsed ``CURRENT.json``, or None for a store that never had a production model."""
    return _read_seen(store, client).pointer


def current_version(store: str, client: Client | None = None) -> str | None:
    """Id of the production version, or None when the store has none yet."""
    pointer = read_pointer(store, client=client)
    return None if pointer is None else pointer["version"]


def current(store: str, client: Client | None = None) -> str | None:
    """Directory of the production bundle, or None when the store has none yet."""
    version = current_version(store, client=client)
    return None if version is None else version_dir(store, version)


def version_dir(store: str, version: str) -> str:
    check_version(version)
    return storage.join(store, VERSIONS, version)


def list_versions(store: str, client: Client | None = None) -> list[dict]:
    """Every complete version, oldest first: ``{version, created_at, current}``.

    A directory without a manifest is a copy that died half way; it is skipped, not
    reported as a version, because it can never be promoted or served.
    """
    root = storage.join(store, VERSIONS)
    if not storage.exists(root, client=client):
        return []
    now = current_version(store, client=client)
    out = []
    for name in storage.listdir(root, client=client):
        name = name.rstrip("/")
        manifest_path = storage.join(root, name, MANIFEST)
        if not VERSION_RE.match(name) or not storage.exists(manifest_path, client=client):
            continue
        manifest = storage.read_json(manifest_path, client=client)
        out.append(
            {"version": name, "created_at": manifest.get("created_at"), "current": name == now}
        )
    return out


# ------------------------------------------------------------------------ promote


def bundle_digest(bundle_dir: str, client: Client | None = None) -> str:
    """sha256 of the bundle's manifest: it names every file's sha256, so it names the bundle."""
    return hashlib.sha256(read_manifest(bundle_dir, client)[1]).hexdigest()


def promote(
    bundle_dir: str,
    store: str,
    version: str | None = None,
    gate: dict | None = None,
    on_promote: OnPromote | None = None,
    client: Client | None = None,
) -> DeployResult:
    """Copy a bundle into the store as a new version and point production at it.

    gate: an evaluation result (``genco.evaluation.evaluate.EvalResult.to_dict()``). A gate that did
    not pass, that names no bundle digest or another bundle's, or that was computed against
    a production model that has since changed refuses the deploy: nothing is written and
    the pointer stays. Without a gate the deploy is unconditional (a person promoting by hand).
    on_promote(version_dir, version): runs after the version is fully copied and verified
    and before the pointer moves, e.g. to archive and register the model with a model
    server; if it raises, production is unchanged. What it returns (if anything) runs after
    the pointer moved: switching what serves to the new production.
    Raises ``StoreError`` when another deploy moved the pointer meanwhile.
    """
    started = time.time()
    manifest, raw, files = verify_bundle(bundle_dir, client, complete=True)
    digest = hashlib.sha256(raw).hexdigest()
    version = version_id(manifest, digest) if version is None else check_version(version)
    target = version_dir(store, version)
    seen = _read_seen(store, client)
    pointer = seen.pointer
    now = None if pointer is None else pointer["version"]

    if now == version:
        return DeployResult(True, version, target, now, "already the current version")
    if gate is not None:
        refusal = _gate_refusal(gate, digest, now)
        if refusal:
            return DeployResult(False, None, None, now, refusal)

    # a version this call copied (and the folders it made): removed if on_promote fails
    written, created = _place(target, version, files, raw, client)
    try:
        finish = on_promote(target, version) if on_promote is not None else None
    except BaseException:
        # e.g. TorchServe refused the registration: the store stays exactly as it was,
        # without an orphan version nobody promoted.
        if written:
            trees.undo_writes(written, created, client)
        raise
    previous = [] if pointer is None else [now, *pointer.get("previous", [])]
    _write_pointer(store, seen, version, previous, client, gate=_gate_summary(gate, digest))
    if finish is not None:
        finish()
    removed = clean_leftovers(store, started, client)
    return DeployResult(True, version, target, now, "promoted", removed)


def add_version(bundle_dir: str, store: str, client: Client | None = None) -> str:
    """Copy a bundle in as a version without moving production (a canary); its version id."""
    manifest, raw, files = verify_bundle(bundle_dir, client, complete=True)
    version = version_id(manifest, hashlib.sha256(raw).hexdigest())
    _place(version_dir(store, version), version, files, raw, client)
    return version


def _place(target: str, version: str, files: dict, raw: bytes, client) -> tuple[list, list]:
    """Copy a verified bundle to ``target`` unless there; the files and folders it created."""
    if storage.exists(storage.join(target, MANIFEST), client=client):
        if storage.read_bytes(storage.join(target, MANIFEST), client=client) != raw:
            raise StoreError(f"{target}: version '{version}' exists with different content")
        try:
            verify_bundle(target, client, complete=True)
        except BundleError:  # a copy damaged since: write it again, manifest last
            _copy(target, files, raw, client)
        return [], []
    written = [storage.join(target, name) for name in [*files, MANIFEST]]
    created = [d for w in written for d in trees.missing_dirs(w)]
    _copy(target, files, raw, client)
    return written, created


def rollback(
    store: str,
    to_version: str | None = None,
    on_promote: OnPromote | None = None,
    client: Client | None = None,
) -> DeployResult:
    """Point production back at the previous version (or at ``to_version``).

    Without ``to_version`` this undoes the last promotion: the pointer's ``previous`` stack
    is popped, so repeated rollbacks walk back through the history. The target is verified
    against its manifest first. on_promote: the same hook as ``promote``'s, so a model
    server follows the pointer back; the pointer moves by the same compare-and-swap.
    """
    started = time.time()
    seen = _read_seen(store, client)
    pointer = seen.pointer
    if pointer is None:
        raise StoreError(f"{store}: no production model to roll back ({POINTER} is missing)")
    now = pointer["version"]
    history = [v for v in pointer.get("previous", []) if v != now]
    if to_version is None:
        if not history:
            raise StoreError(f"{store}: version '{now}' has no previous version to roll back to")
        to_version, rest = history[0], history[1:]
    else:
        if to_version == now:
            return DeployResult(False, now, version_dir(store, now), now, "already current")
        rest = [now, *(v for v in history if v != to_version)]
    target = version_dir(store, to_version)
    if not storage.exists(storage.join(target, MANIFEST), client=client):
        raise StoreError(f"{store}: version '{to_version}' does not exist (see list_versions)")
    verify_bundle(target, client, complete=True)
    finish = on_promote(target, to_version) if on_promote is not None else None
    _write_pointer(store, seen, to_version, rest, client, rolled_back_from=now)
    if finish is not None:
        finish()
    removed = clean_leftovers(store, started, client)
    return DeployResult(True, to_version, target, now, f"rolled back from {now}", removed)


def run_deploy(
    bundle_dir: str,
    store: str,
    gate_path: str | None = None,
    version: str | None = None,
    on_promote: OnPromote | None = None,
    client: Client | None = None,
) -> DeployResult:
    """``genco deploy`` and the pipeline's deploy step: ``promote`` with the gate read from a
    file (written by the evaluate step), so the gate is re-checked where the pointer moves."""
    gate = read_gate(gate_path, client) if gate_path else None
    return promote(bundle_dir, store, version, gate, on_promote, client)


def read_gate(gate_path: str, client: Client | None = None) -> dict:
    """A gate file (``genco evaluate``'s gate.json) as a dict; StoreError when it is not one."""
    try:
        gate = storage.read_json(gate_path, client=client)
    except ValueError as exc:
        raise StoreError(f"{gate_path}: not a gate file (invalid JSON: {exc})") from None
    if not isinstance(gate, dict):
        raise StoreError(f"{gate_path}: a gate file must hold a JSON object")
    return gate


def _check_pointer_backend(path: str) -> None:
    """The pointer's compare-and-swap exists locally (a lock) and on GCS (generation
    preconditions); an s3:// store can be read but not promoted into yet."""
    if storage.is_s3(path):
        raise StoreError(
            f"{path}: deploy and rollback on an s3:// model store are not supported yet (no "
            "compare-and-swap for the pointer); use a local or gs:// store"
        )


def clean_leftovers(store: str, before: float, client: Client | None = None) -> tuple[str, ...]:
    """Remove what runs that died left behind, if last written before ``before`` (epoch
    seconds; a deploy passes its start, so a run still writing is left alone): version
    directories without a manifest and atomic writes' hidden ``.tmp`` files. Returns the
    removed paths."""
    if storage.is_s3(store):
        return ()
    if storage.is_gcs(store):
        return _clean_gcs(store, before, client)
    removed: list[str] = []
    if not os.path.isdir(store):
        return ()
    for root, _, names in os.walk(store):
        for name in names:
            path = os.path.join(root, name)
            if TMP_RE.match(name) and _mtime(path) < before:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                    removed.append(path)
    versions = os.path.join(store, VERSIONS)
    for name in sorted(os.listdir(versions)) if os.path.isdir(versions) else []:
        path = os.path.join(versions, name)
        if not os.path.isdir(path) or os.path.exists(os.path.join(path, MANIFEST)):
            continue
        stamps = [_mtime(path)] + [_mtime(os.path.join(path, n)) for n in os.listdir(path)]
        if max(stamps) < before:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return tuple(removed)


# ------------------------------------------------------------------------ private


@dataclass(frozen=True)
class _Seen:
    """The pointer as a deploy read it, and what identifies that exact content: the sha256
    of the local file or the GCS object's generation (None: no pointer yet)."""

    pointer: dict | None
    token: str | int | None


def _read_seen(store: str, client: Client | None) -> _Seen:
    path = storage.join(store, POINTER)
    _check_pointer_backend(path)
    if storage.is_gcs(path):
        blob = _gcs_bucket(path, client).get_blob(_gcs_name(path))
        if blob is None:
            return _Seen(None, None)
        token = blob.generation  # before the download, which may reset it from headers
        try:
            raw = blob.download_as_bytes(if_generation_match=token)
        except gexc.PreconditionFailed:
            raise StoreError(f"{path}: replaced while it was being read; run again") from None
    else:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return _Seen(None, None)
        token = hashlib.sha256(raw).hexdigest()
    try:
        pointer = json.loads(raw)
    except ValueError:
        pointer = None
    if not isinstance(pointer, dict) or not isinstance(pointer.get("version"), str):
        raise StoreError(f"{path}: not a model store pointer (no 'version')")
    return _Seen(pointer, token)


def _write_pointer(
    store: str,
    seen: _Seen,
    version: str,
    previous: list[str],
    client: Client | None,
    **extra: object,
) -> None:
    """Replace the pointer if it still is what ``seen`` read (compare-and-swap)."""
    unique: set[str] = set()
    history = [v for v in previous if v != version and not (v in unique or unique.add(v))]
    pointer = {
        "format": STORE_FORMAT,
        "version": version,
        "path": f"{VERSIONS}/{version}",
        "previous": history,
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **{k: v for k, v in extra.items() if v is not None},
    }
    data = (json.dumps(pointer, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    path = storage.join(store, POINTER)
    if storage.is_gcs(path):
        bucket, name = _gcs_bucket(path, client), _gcs_name(path)
        blob = bucket.get_blob(name)  # fails fast; the precondition is what makes it atomic
        if (None if blob is None else blob.generation) != seen.token:
            raise _moved(store, seen, client)
        try:
            bucket.blob(name).upload_from_string(
                data, content_type="application/json", if_generation_match=seen.token or 0
            )
        except gexc.PreconditionFailed:
            raise _moved(store, seen, client) from None
        return
    os.makedirs(store, exist_ok=True)
    fd = os.open(os.path.join(store, LOCK), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if this process dies
        if _read_seen(store, client).token != seen.token:
            raise _moved(store, seen, client)
        storage.write_bytes(path, data)
    finally:
        os.close(fd)


def _moved(store: str, seen: _Seen, client: Client | None) -> StoreError:
    was = None if seen.pointer is None else seen.pointer["version"]
    try:
        now = current_version(store, client=client)
    except StoreError as exc:
        now = f"unreadable ({exc})"
    return StoreError(
        f"{storage.join(store, POINTER)}: production moved while this deploy ran (read "
        f"'{was}', now '{now}'); this run changed nothing: evaluate and deploy again"
    )


def _copy(target: str, files: dict[str, bytes], raw: bytes, client: Client | None) -> None:
    for name, data in files.items():
        storage.write_bytes(storage.join(target, name), data, client=client)
    storage.write_bytes(storage.join(target, MANIFEST), raw, client=client)  # last: complete


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return float("inf")  # gone meanwhile: not ours to remove


def _gcs_name(path: str) -> str:
    return path[len("gs://") :].partition("/")[2]


def _gcs_bucket(path: str, client: Client | None):
    return (client or storage.gcs_client()).bucket(path[len("gs://") :].partition("/")[0])


def _clean_gcs(store: str, before: float, client: Client | None) -> tuple[str, ...]:
    bucket = _gcs_bucket(storage.join(store, POINTER), client)
    prefix = _gcs_name(storage.join(store, POINTER))[: -len(POINTER)]
    blobs = list(bucket.list_blobs(prefix=prefix))
    by_version: dict[str, list] = {}
    doomed = []
    for blob in blobs:
        rel = blob.name[len(prefix) :]
        if TMP_RE.match(rel.rsplit("/", 1)[-1]) and blob.updated.timestamp() < before:
            doomed.append(blob)
        parts = rel.split("/")
        if len(parts) == 3 and parts[0] == VERSIONS:
            by_version.setdefault(parts[1], []).append(blob)
    for group in by_version.values():
        names = {b.name.rsplit("/", 1)[-1] for b in group}
        if MANIFEST not in names and all(b.updated.timestamp() < before for b in group):
            doomed.extend(group)
    for blob in doomed:
        with contextlib.suppress(gexc.NotFound):
            blob.delete()
    return tuple(f"gs://{bucket.name}/{b.name}" for b in doomed)


def _gate_refusal(gate: dict, digest: str, production: str | None) -> str | None:
    """Why a gate does not allow this deploy, or None. The gate must pass, name this
    bundle's digest and the production it was judged against (a hand-written
    ``{"passed": true}`` names neither), and that production must still be current."""
    passed = gate.get("passed")
    if not isinstance(passed, bool):
        raise StoreError("gate: 'passed' must be true or false")
    if not passed:
        return f"evaluation gate not passed: {gate.get('reason', 'no reason given')}"
    judged = gate.get("candidate_digest")
    if judged is not None and judged != digest:
        return (
            f"evaluation gate was computed for another bundle (candidate_digest "
            f"'{str(judged)[:16]}', this bundle's is '{digest[:16]}')"
        )
    if "production_version" in gate and gate["production_version"] != production:
        return (
            f"production changed since the evaluation (evaluated against "
            f"{gate['production_version']}, now {production}); evaluate again"
        )
    if not isinstance(judged, str) or not DIGEST_RE.match(judged):
        return (
            f"gate: 'candidate_digest' is {judged!r}, not a sha256: this gate was not written "
            "by genco evaluate for a bundle; evaluate again"
        )
    if "production_version" not in gate:
        return "gate: 'production_version' is missing: this gate was not written by genco evaluate"
    return None


def _gate_summary(gate: dict | None, digest: str) -> dict | None:
    if gate is None:
        return None
    keys = ("passed", "reason", "margin", "candidate_value", "production_value")
    return {**{k: gate[k] for k in keys if k in gate}, "candidate_digest": digest}
