"""Model files: config + state_dict + vocabularies + sha256, rebuilt by one loader per model.

Both models of a bundle (reward model and generator) are saved and loaded here, and the
bundle's file names live here, so that serving needs only ``genco.models``. Nothing is
pickled: weights load with ``torch.load(..., weights_only=True)`` and everything else is
JSON. Evaluate, deploy, the CLI and the serving handler all load through here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import time

import torch

from genco.data import storage
from genco.errors import BundleError, StoreError
from genco.models.generator import Generator, GeneratorConfig
from genco.models.reward import RewardModel, RewardModelConfig
from genco.models.vocab import Vocab

REWARD_WEIGHTS = "reward_model.pt"
REWARD_META = "reward_model.json"
FORMAT = "genco.reward_model/1"
GEN_WEIGHTS = "generator.pt"
GEN_META = "generator.json"
GEN_FORMAT = "genco.generator/1"
MANIFEST = "manifest.json"
CATALOG = "catalog.csv"
CONSTRAINTS = "constraints.csv"
# Attribution tables and metrics written next to the reward model.
IMPRESSION_FILE = "attributions.parquet"
ELEMENT_FILE = "element_attribution.csv"
METRICS_FILE = "reward_metrics.json"
# Version ids go into URLs (TorchServe) and file names (store, .mar): keep them plain.
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _save(
    model: RewardModel | Generator,
    out_dir: str,
    names: tuple[str, str, str],
    extra: dict | None,
    client,
) -> str:
    """Write weights then metadata (the metadata names the weights' sha256)."""
    weights, meta_name, fmt = names
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    data = buf.getvalue()
    storage.write_bytes(storage.join(out_dir, weights), data, client=client)
    meta = {
        "format": fmt,
        "config": dataclasses.asdict(model.config),
        "vocab": model.vocab.to_dict(),
        "sha256": hashlib.sha256(data).hexdigest(),
        **(extra or {}),
    }
    path = storage.join(out_dir, meta_name)
    storage.write_json(path, meta, client=client)
    return path


def _load(
    model_dir: str, names: tuple[str, str, str], what: str, client
) -> tuple[dict, Vocab, dict]:
    """Read and check one model's files: (metadata, vocabulary, state_dict)."""
    weights, meta_name, fmt = names
    meta_path = storage.join(model_dir, meta_name)
    try:
        meta = storage.read_json(meta_path, client=client)
        data = storage.read_bytes(storage.join(model_dir, weights), client=client)
    except FileNotFoundError as exc:
        raise BundleError(f"{model_dir}: not a {what} directory ({exc})") from exc
    if meta.get("format") != fmt:
        raise BundleError(f"{meta_path}: format '{meta.get('format')}' is not '{fmt}'")
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta.get("sha256"):
        raise BundleError(
            f"{model_dir}: {weights} sha256 {digest[:12]}... does not match the "
            f"recorded {str(meta.get('sha256'))[:12]}..."
        )
    state = torch.load(io.BytesIO(data), weights_only=True)
    return meta, Vocab.from_dict(meta["vocab"]), state


_REWARD = (REWARD_WEIGHTS, REWARD_META, FORMAT)
_GENERATOR = (GEN_WEIGHTS, GEN_META, GEN_FORMAT)


def save_reward_model(
    model: RewardModel, out_dir: str, extra: dict | None = None, client=None
) -> str:
    return _save(model, out_dir, _REWARD, extra, client)


def load_reward_model(model_dir: str, client=None) -> tuple[RewardModel, dict]:
    """Rebuild a reward model from its directory, checking format and checksum."""
    meta, vocab, state = _load(model_dir, _REWARD, "reward model", client)
    model = RewardModel(vocab, RewardModelConfig(**meta["config"]))
    model.load_state_dict(state)
    if model.d3 and not (model.id3.weight.any() or model.w3.any()):
        model.drop_three_way()  # rejected in training, or a bundle from before the term
    if model.tower_on and not any(p.any() for p in model.tower.parameters()):
        model.switch_tower(False)  # rejected in training
    model.eval()
    return model, meta


def save_generator(model: Generator, out_dir: str, extra: dict | None = None, client=None) -> str:
    return _save(model, out_dir, _GENERATOR, extra, client)


def load_generator(model_dir: str, client=None) -> Generator:
    """Rebuild a generator from its directory, checking format and checksum."""
    meta, vocab, state = _load(model_dir, _GENERATOR, "generator", client)
    model = Generator(vocab, GeneratorConfig(**meta["config"]))
    model.load_state_dict(state)
    model.eval()
    return model


# ------------------------------------------------------------------------ bundle identity
# One rule for the model store, the archives and the predictor's reported version.


def check_version(version: str) -> str:
    """A version id: 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit."""
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise StoreError(
            f"version '{version}' must be 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return version


def version_id(manifest: dict, digest: str) -> str:
    """The manifest's own ``version`` when it has one (a bundle unpacked from an archive),
    else ``<created_at as YYYYmmddTHHMMSSZ>-<8 hex of the manifest's sha256>``.

    The bundle's own creation time, not the deploy time, so a retried deploy of one bundle
    lands on the same version instead of copying it twice; lexical order is time order.
    """
    if manifest.get("version"):
        return check_version(str(manifest["version"]))
    created = str(manifest.get("created_at") or "")
    stamp = re.sub(r"[^0-9TZ]", "", created) or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return check_version(f"{stamp}-{digest[:8]}")


def read_manifest(bundle_dir: str, client=None) -> tuple[dict, bytes]:
    """The bundle's manifest, parsed and as the bytes its digest is computed over."""
    path = storage.join(bundle_dir, MANIFEST)
    try:
        raw = storage.read_bytes(path, client=client)
    except FileNotFoundError:
        raise BundleError(
            f"{bundle_dir}: not a complete bundle (missing {MANIFEST}; it is written last)"
        ) from None
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: a manifest must hold a JSON object")
    return manifest, raw


def bundle_version(bundle_dir: str, client=None) -> str:
    """The version id the store gives this bundle (``version_id`` of its manifest)."""
    manifest, raw = read_manifest(bundle_dir, client)
    return version_id(manifest, hashlib.sha256(raw).hexdigest())


# What ``Predictor.load`` reads: each must be named by the manifest and match it.
LOADED_FILES = (REWARD_WEIGHTS, REWARD_META, GEN_WEIGHTS, GEN_META, CATALOG, CONSTRAINTS)


def verify_bundle(
    bundle_dir: str, client=None, complete: bool = False
) -> tuple[dict, bytes, dict[str, bytes]]:
    """Check a bundle against its manifest before anything trusts it: (manifest, its bytes,
    the verified files' bytes by name).

    The manifest is written last and names every file's sha256, so a directory without one
    is a write that never finished, and a file that does not match it was changed after it
    (a retraining killed half way over an old bundle, an emptied ``constraints.csv``). Every
    file the loader reads must be listed and match, and every other listed file that is
    present must match; with ``complete`` (the store copying a bundle) every listed file
    must be present. A ``.mar`` carries only the files serving reads, hence the default.
    Raises a one-line ``BundleError`` naming the file.
    """
    manifest, raw = read_manifest(bundle_dir, client)
    where = storage.join(bundle_dir, MANIFEST)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{where}: names no files")
    for name in LOADED_FILES:
        if name not in files and storage.exists(storage.join(bundle_dir, name), client=client):
            raise BundleError(
                f"{storage.join(bundle_dir, name)}: not named in {MANIFEST} (written after it)"
            )
    out: dict[str, bytes] = {}
    for name, expected in files.items():
        if not isinstance(name, str) or "/" in name or name in ("", ".", "..", MANIFEST):
            raise BundleError(f"{where}: unsafe file name '{name}'")
        path = storage.join(bundle_dir, name)
        try:
            data = storage.read_bytes(path, client=client)
        except FileNotFoundError:
            if complete or name in LOADED_FILES:
                raise BundleError(f"{path}: missing, but named in {MANIFEST}") from None
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected:
            raise BundleError(
                f"{path} does not match its sha256 in {MANIFEST} ({digest[:12]}... is not "
                f"{str(expected)[:12]}...; changed after the bundle was written)"
            )
        out[name] = data
    return manifest, raw, out
