"""Model archives and the KServe layout: getting a bundle version served.

* archives: ``build_mar`` runs ``torch-model-archiver`` over the handler, the bundle files and
  ``serving/model-config.yaml``; ``write_kserve_layout`` publishes it in the layout KServe's
  TorchServe runtime mounts (``config/config.properties`` + ``model-store/``);
* control (through ``genco.serving.management``): ``publish`` does archive + register +
  layout switch in a safe order
  and ``make_on_promote`` / ``serving_hook`` plug it into ``genco.store.promote`` and
  ``rollback`` (a version published before is served again from its archive).

The ``config.properties`` text a layout holds, and the checks on it, are in
``genco.serving.config``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genco.data import storage, trees
from genco.inference.predictor import Predictor
from genco.models.checkpoint import (
    CATALOG,
    CONSTRAINTS,
    GEN_META,
    GEN_WEIGHTS,
    MANIFEST,
    REWARD_META,
    REWARD_WEIGHTS,
    bundle_version,
    check_version,
)
from genco.serving.config import kserve_properties, mar_name, parse_properties
from genco.serving.management import (
    MODEL_NAME,
    ManagementClient,
    deploy_to_torchserve,
    probe_version,
    read_token,
)
from genco.serving.requests import sample_request

REQUIRED_BUNDLE_FILES = (MANIFEST, REWARD_WEIGHTS, REWARD_META, GEN_WEIGHTS, GEN_META, CATALOG)
# The handler and its configs ship in the repository's serving/, next to genco/. An image
# that pip-installs genco (non-editable) copies serving/ elsewhere and says where.
SERVING_DIR = Path(
    os.environ.get("GENCO_SERVING_DIR") or Path(__file__).resolve().parents[2] / "serving"
)
HANDLER = SERVING_DIR / "handler.py"
MODEL_CONFIG = SERVING_DIR / "model-config.yaml"
LOG_CONFIG = SERVING_DIR / "log4j2.xml"
KSERVE_DIR = "kserve"
KSERVE_CANARY_DIR = "kserve-canary"  # a canary's layout (genco.evaluation.canary)


# ============================================================================ archives


def build_mar(
    bundle_dir: str,
    out_dir: str,
    version: str | None = None,
    *,
    handler: str | os.PathLike[str] = HANDLER,
    config_file: str | os.PathLike[str] = MODEL_CONFIG,
    client: Any = None,
) -> str:
    """Archive a bundle as ``out_dir/genco-<version>.mar`` (model name "genco"); its path.

    The bundle's files go in as extra files, so TorchServe unpacks a loadable bundle into the
    worker's model directory. The archived manifest records ``version``, so the version each
    response reports is the version TorchServe routes by. ``out_dir`` may be gs://.
    """
    for f in REQUIRED_BUNDLE_FILES:
        if not storage.exists(storage.join(bundle_dir, f), client=client):
            raise FileNotFoundError(f"{bundle_dir}: not a bundle (missing {f})")
    for path in (handler, config_file):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path}: missing (it ships in the repository's serving/; set "
                "GENCO_SERVING_DIR where an image copies that directory)"
            )
    version = check_version(version) if version else bundle_version(bundle_dir, client)
    names = [*REQUIRED_BUNDLE_FILES]
    if storage.exists(storage.join(bundle_dir, CONSTRAINTS), client=client):
        names.append(CONSTRAINTS)
    with tempfile.TemporaryDirectory(prefix="genco-mar-") as tmp:
        stage = os.path.join(tmp, "bundle")
        os.makedirs(stage)
        for name in names:
            data = storage.read_bytes(storage.join(bundle_dir, name), client=client)
            if name == MANIFEST:
                manifest = json.loads(data)
                manifest["version"] = version
                data = (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
            with open(os.path.join(stage, name), "wb") as f:
                f.write(data)
        export = os.path.join(tmp, "export")
        scratch = os.path.join(tmp, "scratch")
        os.makedirs(export)
        os.makedirs(scratch)
        cmd = [
            sys.executable,
            "-m",
            "model_archiver.model_packaging",
            "--model-name",
            MODEL_NAME,
            "--version",
            version,
            "--handler",
            os.fspath(handler),
            "--config-file",
            os.fspath(config_file),
            "--extra-files",
            ",".join(os.path.join(stage, n) for n in names),
            "--export-path",
            export,
            "--archive-format",
            "default",
            "--force",
        ]
        # The archiver stages files in $TMPDIR/<model name>: a private TMPDIR keeps two
        # concurrent builds of "genco" from deleting each other's staging directory.
        env = {**os.environ, "TMPDIR": scratch}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        built = os.path.join(export, f"{MODEL_NAME}.mar")
        if done.returncode != 0 or not os.path.isfile(built):
            raise RuntimeError(f"torch-model-archiver failed: {done.stderr.strip()[-2000:]}")
        target = storage.join(out_dir, mar_name(version))
        if storage.is_remote(target):
            with open(built, "rb") as f:
                storage.write_bytes(target, f.read(), client=client)
        else:
            os.makedirs(out_dir, exist_ok=True)
            with storage.atomic_local_path(target) as tmp_target:
                shutil.copyfile(built, tmp_target)
    return target


@dataclass(frozen=True)
class KServeLayout:
    root: str
    config: str
    mar: str
    version: str

    def to_dict(self) -> dict[str, str]:
        return {"root": self.root, "config": self.config, "mar": self.mar, "version": self.version}


def set_kserve_version(root: str, version: str, client: Any = None, **props: Any) -> KServeLayout:
    """Point ``root/config/config.properties`` at an archived version: the switch and rollback.

    The config is one small file written atomically, so a pod that starts mid-deploy loads
    either the old version or the new one; older archives stay in ``model-store/``. A switch
    keeps the layout's token setting unless ``token_auth`` is given.
    """
    mar = storage.join(root, "model-store", mar_name(version))
    if not storage.exists(mar, client=client):
        raise FileNotFoundError(f"{mar}: no archive for version '{version}'")
    config = storage.join(root, "config", "config.properties")
    if "token_auth" not in props and storage.exists(config, client=client):
        current = parse_properties(storage.read_text(config, client=client))
        props["token_auth"] = current.get("disable_token_authorization") != "true"
    storage.write_text(config, kserve_properties(version, **props), client=client)
    return KServeLayout(root, config, mar, version)


def write_kserve_layout(
    mar_path: str, store_uri: str, version: str, client: Any = None, **props: Any
) -> KServeLayout:
    """Publish an archive where KServe's TorchServe runtime looks (the InferenceService's
    ``storageUri``), local or gs://::

        STORE/config/config.properties     serves genco-<version>.mar
        STORE/model-store/genco-<version>.mar

    The archive goes first and the config last, so the layout is never half switched.
    """
    target = storage.join(store_uri, "model-store", mar_name(version))
    if mar_path != target:
        storage.write_bytes(target, storage.read_bytes(mar_path, client=client), client=client)
    return set_kserve_version(store_uri, version, client=client, **props)


def publish(
    bundle_dir: str,
    root: str,
    version: str,
    management: ManagementClient | None = None,
    check: Callable[[str], object] | None = None,
    client: Any = None,
    token_auth: bool | None = None,
    switch: bool = True,
) -> dict[str, Any]:
    """Archive a bundle into a KServe layout at ``root`` and switch to it, in the order that
    keeps every failure harmless: the archive first (new file, nothing points at it), then
    the running TorchServe if one is given (register, check, set default), and the layout's
    config last (not at all with ``switch=False``: the store's deploy switches it after its
    pointer moved). Registration is by file name, so that server's model store must be
    ``root/model-store`` (as in a KServe pod, where ``root`` is mounted at /mnt/models).
    token_auth: the layout's TorchServe token auth (None: keep the layout's, on if new)."""
    target = storage.join(root, "model-store", mar_name(version))
    # A version id names one bundle (the store refuses a reused id with other content), so
    # an archive already there is this one: a rollback or a retried deploy reuses it.
    built: list[str] = []  # an archive this call wrote: removed again if registration fails
    created = trees.missing_dirs(target)
    if not storage.exists(target, client=client):
        with tempfile.TemporaryDirectory(prefix="genco-publish-") as tmp:
            mar = build_mar(bundle_dir, tmp, version, client=client)
            with open(mar, "rb") as f:
                built = [target]
                storage.write_bytes(target, f.read(), client=client)
    out: dict[str, Any] = {"version": version}
    if management is not None:
        try:
            deployment = deploy_to_torchserve(management, mar_name(version), version, check=check)
        except BaseException:
            trees.undo_writes(built, created if built else [], client)
            raise
        out["torchserve"] = deployment.to_dict()
    props = {} if token_auth is None else {"token_auth": token_auth}
    if switch:
        out["kserve"] = set_kserve_version(root, version, client=client, **props).to_dict()
    return out


def serving_hook(
    store_uri: str,
    publish: bool = False,
    management_url: str | None = None,
    key_file: str | None = None,
    client: Any = None,
) -> Callable[[str, str], None] | None:
    """The ``on_promote`` for ``genco deploy``/``rollback`` and the pipeline's deploy step.

    With ``publish`` or a ``management_url``, or when the store already publishes for
    serving, each version that becomes production is archived in ``STORE/kserve`` (and
    registered as TorchServe's default) before the store's pointer moves, and the layout's
    config is switched after it: ``CURRENT.json`` is the commit point. A run that died
    between the two left the layout behind the pointer; building the hook first repairs
    that (``sync_layout``), so every deploy and rollback starts from a layout that serves
    what ``CURRENT.json`` names. None when none of that applies.
    """
    if not (publish or management_url or is_published(store_uri, client=client)):
        return None
    sync_layout(store_uri, client=client)
    token = read_token(key_file, "management") if key_file else None
    return make_on_promote(store_uri, management_url or None, token, client=client)


def sync_layout(store_uri: str, client: Any = None) -> str | None:
    """Point ``STORE/kserve`` at the version ``STORE/CURRENT.json`` names, archiving it if
    it never was; the version switched to, or None when nothing had to change (no layout,
    no pointer, or already in step)."""
    from genco.store import current_version, version_dir

    if not is_published(store_uri, client=client):
        return None
    version = current_version(store_uri, client=client)
    if version is None:
        return None
    root = storage.join(store_uri, KSERVE_DIR)
    config = storage.join(root, "config", "config.properties")
    if storage.read_text(config, client=client) == kserve_properties(version):
        return None
    publish(version_dir(store_uri, version), root, version, client=client)
    return version


def is_published(store_uri: str, client: Any = None) -> bool:
    """True when ``STORE/kserve`` holds a serving layout (``make_on_promote`` wrote one)."""
    config = storage.join(store_uri, KSERVE_DIR, "config", "config.properties")
    return storage.exists(config, client=client)


def make_on_promote(
    store_uri: str,
    management_url: str | None = None,
    token: str | None = None,
    *,
    inference_url: str | None = None,
    inference_token: str | None = None,
    client: Any = None,
) -> Callable[[str, str], None]:
    """The serving half of ``genco.store.promote`` and ``rollback`` (their ``on_promote``):
    ``publish`` each version that becomes production into ``STORE/kserve`` (the
    InferenceService's storageUri; an archive published before is reused), registering it
    on the TorchServe at ``management_url`` when given (again, if it was retired), after a
    real prediction against that version when ``inference_url`` is given too. Any failure
    raises, so the store's pointer stays where it was. Returns the step the store runs
    once its pointer moved: switch the layout's config to the new production."""
    root = storage.join(store_uri, KSERVE_DIR)

    def on_promote(version_dir: str, version: str) -> Callable[[], object]:
        management = check = None
        if management_url:
            management = ManagementClient(management_url, token)
            if inference_url:
                request = sample_request(Predictor.load(version_dir, client=client))

                def check(v: str) -> object:
                    return probe_version(inference_url, v, request, inference_token)

        publish(version_dir, root, version, management, check, client, switch=False)
        return lambda: set_kserve_version(root, version, client=client)

    return on_promote


def canary_hook(
    store_uri: str, publish_layout: bool = False, client: Any = None
) -> Callable[[str, str], object] | None:
    """The ``on_canary`` of ``genco.evaluation.canary.start``: publish the canary's version
    as its own KServe layout, ``STORE/kserve-canary`` (the canary InferenceService's
    storageUri, ``genco.serving.manifest``), with ``publish_layout`` or when the store already
    publishes for serving (as ``serving_hook``); None otherwise. An archive published before
    is reused."""
    if not (publish_layout or is_published(store_uri, client=client)):
        return None
    root = storage.join(store_uri, KSERVE_CANARY_DIR)

    def on_canary(version_dir: str, version: str) -> object:
        return publish(version_dir, root, version, client=client)

    return on_canary
