"""Model archives and the KServe layout: getting a bundle version served.

* archives: ``build_mar`` runs ``torch-model-archiver`` over the handler, the bundle files and
  ``serving/model-config.yaml``; ``write_kserve_layout`` publishes it in the layout KServe's
  TorchServe runtime mounts (``config/config.properties`` + ``model-store/``);
* control (through ``genco.serving.management``): ``publish`` does archive + register +
  layout switch in a safe order
  and ``make_on_promote`` / ``serving_hook`` plug it into ``genco.store.promote`` and
  ``rollback`` (a version published before is served again from its archive).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genco.data import storage
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
from genco.serving.management import (
    MODEL_NAME,
    ManagementClient,
    deploy_to_torchserve,
    probe_version,
    read_token,
)
from genco.serving.requests import sample_request

# TorchServe's request size limit, above genco.serving.requests.MAX_BODY_BYTES so that the handler's
# 413 naming the limit, not Netty's bare one, is what clients see.
MAX_REQUEST_BYTES = 1024 * 1024
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
# A small JVM for a small model: on 2 cores, G1's and C2's background threads compete with
# the Python worker. Serial GC plus the C1 compiler alone cut the frontend's CPU per request
# by ~40% at concurrency 8 (bench/serving.py: 181 -> 320 req/s on a shared 2-core box).
JVM_ARGS = "-XX:+UseSerialGC -Xmx512m -XX:TieredStopAtLevel=1 -XX:CICompilerCount=1"
# TorchServe's inference and management keys expire after `token_expiration_min` (60 by
# default) while the server keeps running: clients then get 400 "Token expired". Ours last
# ten years, i.e. as long as the server (keys are new at every start); shorten with
# `genco serve --token-expiry-min`, renew with ServeHandle.renew_token.
TOKEN_EXPIRY_MIN = 10 * 365 * 24 * 60
KSERVE_MODEL_STORE = "/mnt/models/model-store"  # where KServe mounts STORE/kserve
# The listeners of a KServe pod: inference must take traffic from outside the pod (the
# explicit 0.0.0.0); management and metrics stay on the pod's loopback (port-forward).
KSERVE_INFERENCE_ADDRESS = "http://0.0.0.0:8085"
# A bundle archive is a few MB; a published .mar over these bounds is refused before it is
# read in full or unpacked (a zip bomb, or a path escaping the extraction directory).
MAX_ARCHIVE_BYTES = 512 * 1024 * 1024  # compressed, and all members uncompressed
MAX_ARCHIVE_MEMBERS = 1000


# ============================================================================ archives


def mar_name(version: str) -> str:
    """One archive file per version, so several can sit in one model store."""
    return f"{MODEL_NAME}-{check_version(version)}.mar"


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
        if storage.is_gcs(target):
            with open(built, "rb") as f:
                storage.write_bytes(target, f.read(), client=client)
        else:
            os.makedirs(out_dir, exist_ok=True)
            with storage.atomic_local_path(target) as tmp_target:
                shutil.copyfile(built, tmp_target)
    return target


def properties_text(props: dict[str, object]) -> str:
    """Java ``.properties`` text: a backslash is an escape there, so it is doubled."""
    return "".join(f"{k}={str(v).replace(chr(92), chr(92) * 2)}\n" for k, v in props.items())


def parse_properties(text: str) -> dict[str, str]:
    """The ``key=value`` lines ``properties_text`` writes (comments and blanks skipped)."""
    props = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"config line '{line[:80]}' is not key=value")
        props[key.strip()] = value.strip().replace("\\\\", "\\")
    return props


def allowed_urls(model_store: str) -> str:
    """TorchServe's ``allowed_urls`` (Java regexes, full match) admitting only archives in
    ``model_store``: registering a model from any other URL (http, another directory) is
    refused, so a management key cannot load foreign code."""
    if "," in model_store or "\\E" in model_store:
        raise ValueError(f"model store '{model_store}' must not contain ',' or '\\E'")
    return f"file://\\Q{model_store.rstrip('/')}\\E/[^/]+\\.mar"


def model_snapshot_entry(
    version: str, workers: int, batch_size: int, max_batch_delay_ms: int, timeout_s: int
) -> str:
    """The ``models``/``model_snapshot`` JSON: one version of "genco", the default one."""
    entry = {
        "defaultVersion": True,
        "marName": mar_name(version),
        "minWorkers": workers,
        "maxWorkers": workers,
        "batchSize": batch_size,
        "maxBatchDelay": max_batch_delay_ms,
        "responseTimeout": timeout_s,
    }
    return json.dumps({MODEL_NAME: {version: entry}}, separators=(",", ":"))


def kserve_properties(
    version: str,
    *,
    workers: int = 1,
    max_batch_delay_ms: int = 5,
    response_timeout_s: int = 30,
    token_auth: bool = True,
    token_expiry_min: float = TOKEN_EXPIRY_MIN,
    inference_address: str = KSERVE_INFERENCE_ADDRESS,
    management_address: str = "http://127.0.0.1:8081",
    metrics_address: str = "http://127.0.0.1:8082",
) -> str:
    """``config.properties`` for KServe's TorchServe runtime, serving one version.

    batchSize is 1 because KServe's v1 envelope answers only the first request of a
    TorchServe batch; clients batch by sending several ``instances`` instead. Secure by
    default: token auth on (the pod's ``key_file.json``; ``token_auth=False`` only where an
    authenticating ingress fronts the InferenceService), models registered only from the
    layout's own model store (``allowed_urls``), and only inference on 0.0.0.0: management
    (model registration on), metrics and gRPC listen on the pod's loopback, reached with
    ``kubectl port-forward``.
    """
    entry = json.loads(
        model_snapshot_entry(version, workers, 1, max_batch_delay_ms, response_timeout_s)
    )
    snapshot = {"name": "startup.cfg", "modelCount": 1, "models": entry}
    return properties_text(
        {
            "vmargs": JVM_ARGS,
            "inference_address": inference_address,
            "management_address": management_address,
            "metrics_address": metrics_address,
            "grpc_inference_address": "127.0.0.1",
            "grpc_management_address": "127.0.0.1",
            "grpc_inference_port": 7070,
            "grpc_management_port": 7071,
            "enable_metrics_api": "true",
            "metrics_mode": "prometheus",
            "number_of_netty_threads": 4,
            "job_queue_size": 100,
            "enable_envvars_config": "true",
            "install_py_dep_per_model": "false",
            "decode_input_request": "false",  # raw bytes for genco.serving's bounded parser
            "disable_token_authorization": str(not token_auth).lower(),
            "token_expiration_min": token_expiry_min,
            "enable_model_api": "true",
            "allowed_urls": allowed_urls(KSERVE_MODEL_STORE),
            "max_request_size": MAX_REQUEST_BYTES,
            "model_store": KSERVE_MODEL_STORE,
            "model_snapshot": json.dumps(snapshot, separators=(",", ":")),
        }
    )


_ADDRESS_RE = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9.\-\[\]:]+$")


def _address(value: str) -> bool:
    return _ADDRESS_RE.match(value) is not None


def _host(value: str) -> bool:
    return _HOST_RE.match(value) is not None


def _boolean(value: str) -> bool:
    return value in ("true", "false")


def _integer(lo: int, hi: int) -> Callable[[str], bool]:
    return lambda value: value.isdigit() and lo <= int(value) <= hi


def _positive(value: str) -> bool:
    try:
        return 0 < float(value) < 1e12
    except ValueError:
        return False


# Every key kserve_properties writes, with what its value may be. Anything else, JVM
# arguments above all, would let whoever writes the store run code in the serving process.
_LAYOUT_KEYS: dict[str, tuple[Callable[[str], bool], str]] = {
    "vmargs": (lambda v: v == JVM_ARGS, f"exactly genco's JVM_ARGS '{JVM_ARGS}'"),
    "inference_address": (_address, "http(s)://host:port"),
    "management_address": (_address, "http(s)://host:port"),
    "metrics_address": (_address, "http(s)://host:port"),
    "grpc_inference_address": (_host, "a host"),
    "grpc_management_address": (_host, "a host"),
    "grpc_inference_port": (_integer(1, 65535), "a port"),
    "grpc_management_port": (_integer(1, 65535), "a port"),
    "enable_metrics_api": (_boolean, "true or false"),
    "metrics_mode": (lambda v: v in ("prometheus", "log"), "prometheus or log"),
    "number_of_netty_threads": (_integer(1, 64), "an integer in [1, 64]"),
    "job_queue_size": (_integer(1, 100_000), "an integer in [1, 100000]"),
    "enable_envvars_config": (_boolean, "true or false"),
    "install_py_dep_per_model": (lambda v: v == "false", "false (no installs from archives)"),
    "decode_input_request": (lambda v: v == "false", "false (genco.serving parses bodies)"),
    "disable_token_authorization": (_boolean, "true or false"),
    "token_expiration_min": (_positive, "a number of minutes > 0"),
    "enable_model_api": (_boolean, "true or false"),
    "allowed_urls": (
        lambda v: v == allowed_urls(KSERVE_MODEL_STORE),
        f"'{allowed_urls(KSERVE_MODEL_STORE)}'",
    ),
    "max_request_size": (_integer(1, 64 * 1024 * 1024), "an integer of bytes up to 64 MiB"),
    "model_store": (lambda v: v == KSERVE_MODEL_STORE, KSERVE_MODEL_STORE),
    "model_snapshot": (lambda v: True, "genco's model snapshot"),  # checked below
}


def check_layout_config(text: str, where: str = "config.properties") -> tuple[dict[str, str], str]:
    """Validate a KServe layout's ``config.properties`` before anything runs it: only the
    keys ``kserve_properties`` writes, each with a value of its kind, and a model snapshot
    of one genco version. Returns (the properties, the default version); a ValueError names
    the key and the value otherwise."""
    props = parse_properties(text)
    for key, value in props.items():
        if key not in _LAYOUT_KEYS:
            raise ValueError(
                f"{where}: key '{key[:80]}' is not one genco writes (allowed: "
                f"{', '.join(_LAYOUT_KEYS)}); refusing to run this layout"
            )
        ok, expected = _LAYOUT_KEYS[key]
        if not ok(value):
            raise ValueError(
                f"{where}: {key}='{value[:120]}' is not allowed (expected {expected}); "
                "refusing to run this layout"
            )
    if "model_snapshot" not in props:
        raise ValueError(f"{where}: no model_snapshot; not a genco layout")
    return props, _snapshot_version(props["model_snapshot"], where)


def _snapshot_version(text: str, where: str) -> str:
    def bad(why: str) -> ValueError:
        return ValueError(f"{where}: model_snapshot {why}; refusing to run this layout")

    try:
        snapshot = json.loads(text)
        models = snapshot["models"]
    except (ValueError, TypeError, KeyError):
        raise bad("is not genco's JSON") from None
    if not isinstance(models, dict) or set(models) != {MODEL_NAME}:
        raise bad(f"must hold exactly the model '{MODEL_NAME}'")
    versions = models[MODEL_NAME]
    if not isinstance(versions, dict) or len(versions) != 1:
        raise bad("must hold exactly one version")
    [(version, entry)] = versions.items()
    try:
        check_version(version)
    except ValueError as exc:
        raise bad(str(exc)) from None
    limits = {
        "minWorkers": 64,
        "maxWorkers": 64,
        "batchSize": 1024,
        "maxBatchDelay": 60_000,
        "responseTimeout": 3600,
    }
    if not isinstance(entry, dict) or set(entry) != {"defaultVersion", "marName", *limits}:
        raise bad(f"version '{version}' must have exactly genco's entry keys")
    if entry["defaultVersion"] is not True or entry["marName"] != mar_name(version):
        raise bad(f"version '{version}' must be the default and archived as {mar_name(version)}")
    for key, hi in limits.items():
        value = entry[key]
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= hi:
            raise bad(f"{key}={value!r} must be an integer in [0, {hi}]")
    return version


def checked_members(
    archive: zipfile.ZipFile, where: str, max_bytes: int = MAX_ARCHIVE_BYTES
) -> list[zipfile.ZipInfo]:
    """The members of a .mar, refused before extraction if any path could escape the target
    directory (absolute, '..', backslashes, links) or they unpack to over ``max_bytes``
    (zipfile never writes more than a member's declared size)."""
    members = archive.infolist()
    if len(members) > MAX_ARCHIVE_MEMBERS:
        raise ValueError(f"{where}: {len(members)} members, at most {MAX_ARCHIVE_MEMBERS}")
    total = 0
    for info in members:
        name = info.filename
        parts = name.split("/")
        if name.startswith("/") or "\\" in name or ":" in name or ".." in parts:
            raise ValueError(f"{where}: member '{name[:200]}' would unpack outside its directory")
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise ValueError(f"{where}: member '{name[:200]}' is a symbolic link")
        total += info.file_size
        if total > max_bytes:
            raise ValueError(
                f"{where}: members unpack to over {max_bytes} bytes; refusing to unpack"
            )
    return members


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
    if not storage.exists(target, client=client):
        with tempfile.TemporaryDirectory(prefix="genco-publish-") as tmp:
            mar = build_mar(bundle_dir, tmp, version, client=client)
            with open(mar, "rb") as f:
                storage.write_bytes(target, f.read(), client=client)
    out: dict[str, Any] = {"version": version}
    if management is not None:
        deployment = deploy_to_torchserve(management, mar_name(version), version, check=check)
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
