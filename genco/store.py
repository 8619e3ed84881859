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

One writer at a time: the pointer is read, modified and rewritten without a lock, so
concurrent deploys into one store could lose a ``previous`` entry. The scheduled pipeline
runs with max concurrency 1 for that reason.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from genco.data import storage
from genco.errors import BundleError, StoreError
from genco.models.checkpoint import (
    MANIFEST,
    VERSION_RE,
    check_version,
    read_manifest,
    version_id,
)

if TYPE_CHECKING:
    from google.cloud.storage import Client

POINTER = "CURRENT.json"
VERSIONS = "versions"
STORE_FORMAT = "genco.model_store/1"

OnPromote = Callable[[str, str], None]


@dataclass(frozen=True)
class DeployResult:
    """What a promote or rollback did; ``deployed`` is False when the pointer did not move."""

    deployed: bool
    version: str | None
    version_dir: str | None
    previous: str | None
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------- reading


def read_pointer(store: str, client: Client | None = None) -> dict | None:
    """The parsed ``CURRENT.json``, or None for a store that never had a production model."""
    path = storage.join(store, POINTER)
    if not storage.exists(path, client=client):
        return None
    pointer = storage.read_json(path, client=client)
    if not isinstance(pointer, dict) or not isinstance(pointer.get("version"), str):
        raise StoreError(f"{path}: not a model store pointer (no 'version')")
    return pointer


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
    not pass, that was computed for another bundle, or against a production model that has
    since changed refuses the deploy: nothing is written and the pointer stays. Without a
    gate the deploy is unconditional (a person promoting by hand).
    on_promote(version_dir, version): runs after the version is fully copied and before the
    pointer moves, e.g. to register the model with a model server; if it raises, production
    is unchanged. The TorchServe registration plugs in here.
    """
    manifest, raw = read_manifest(bundle_dir, client)
    digest = hashlib.sha256(raw).hexdigest()
    files = _verified_files(bundle_dir, manifest, client)
    version = version_id(manifest, digest) if version is None else version
    target = version_dir(store, version)
    pointer = read_pointer(store, client=client)
    now = None if pointer is None else pointer["version"]

    if now == version:
        return DeployResult(True, version, target, now, "already the current version")
    if gate is not None:
        refusal = _gate_refusal(gate, digest, now)
        if refusal:
            return DeployResult(False, None, None, now, refusal)

    target_manifest = storage.join(target, MANIFEST)
    if storage.exists(target_manifest, client=client):
        if storage.read_bytes(target_manifest, client=client) != raw:
            raise StoreError(f"{target}: version '{version}' exists with different content")
    else:
        for name, data in files.items():
            storage.write_bytes(storage.join(target, name), data, client=client)
        storage.write_bytes(target_manifest, raw, client=client)  # last: marks it complete
    if on_promote is not None:
        on_promote(target, version)
    previous = [] if pointer is None else [now, *pointer.get("previous", [])]
    _write_pointer(store, version, previous, client, gate=_gate_summary(gate))
    return DeployResult(True, version, target, now, "promoted")


def rollback(
    store: str,
    to_version: str | None = None,
    on_promote: OnPromote | None = None,
    client: Client | None = None,
) -> DeployResult:
    """Point production back at the previous version (or at ``to_version``).

    Without ``to_version`` this undoes the last promotion: the pointer's ``previous`` stack
    is popped, so repeated rollbacks walk back through the history. on_promote: the same
    hook as ``promote``'s, so a model server follows the pointer back.
    """
    pointer = read_pointer(store, client=client)
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
    if on_promote is not None:
        on_promote(target, to_version)
    _write_pointer(store, to_version, rest, client, rolled_back_from=now)
    return DeployResult(True, to_version, target, now, f"rolled back from {now}")


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
    gate = None if not gate_path else storage.read_json(gate_path, client=client)
    if gate is not None and not isinstance(gate, dict):
        raise StoreError(f"{gate_path}: a gate file must hold a JSON object")
    return promote(bundle_dir, store, version, gate, on_promote, client)


# ------------------------------------------------------------------------ private


def _verified_files(bundle_dir: str, manifest: dict, client: Client | None) -> dict[str, bytes]:
    """Every file the manifest names, checked against its sha256 before anything is copied:
    a bundle damaged after training must not reach production."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{bundle_dir}/{MANIFEST}: names no files")
    out = {}
    for name, expected in files.items():
        if "/" in name or name in ("", ".", "..", MANIFEST):
            raise BundleError(f"{bundle_dir}/{MANIFEST}: unsafe file name '{name}'")
        data = storage.read_bytes(storage.join(bundle_dir, name), client=client)
        if hashlib.sha256(data).hexdigest() != expected:
            raise BundleError(f"{bundle_dir}: {name} does not match its sha256 in {MANIFEST}")
        out[name] = data
    return out


def _gate_refusal(gate: dict, digest: str, production: str | None) -> str | None:
    passed = gate.get("passed")
    if not isinstance(passed, bool):
        raise StoreError("gate: 'passed' must be true or false")
    if not passed:
        return f"evaluation gate not passed: {gate.get('reason', 'no reason given')}"
    if gate.get("candidate_digest") not in (None, digest):
        return "evaluation gate was computed for another bundle"
    if "production_version" in gate and gate["production_version"] != production:
        return (
            f"production changed since the evaluation (evaluated against "
            f"{gate['production_version']}, now {production}); evaluate again"
        )
    return None


def _gate_summary(gate: dict | None) -> dict | None:
    if gate is None:
        return None
    keys = ("passed", "reason", "margin", "candidate_value", "production_value")
    return {k: gate[k] for k in keys if k in gate}


def _write_pointer(
    store: str, version: str, previous: list[str], client: Client | None, **extra: object
) -> None:
    seen: set[str] = set()
    history = [v for v in previous if v != version and not (v in seen or seen.add(v))]
    storage.write_json(
        storage.join(store, POINTER),
        {
            "format": STORE_FORMAT,
            "version": version,
            "path": f"{VERSIONS}/{version}",
            "previous": history,
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **{k: v for k, v in extra.items() if v is not None},
        },
        client=client,
    )
