"""Model archives, the KServe layout and TorchServe's management API: getting a bundle
version served.

* archives: ``build_mar`` runs ``torch-model-archiver`` over the handler, the bundle files and
  ``serving/model-config.yaml``; ``write_kserve_layout`` publishes it in the layout KServe's
  TorchServe runtime mounts (``config/config.properties`` + ``model-store/``);
* control: ``ManagementClient`` speaks TorchServe's management API, ``deploy_to_torchserve``
  registers a version and makes it the default (keeping the previous one for
  ``rollback_default``); ``publish`` does archive + register + layout switch in a safe order
  and ``make_on_promote`` / ``serving_hook`` plug it into ``genco.store.promote`` and
  ``rollback`` (a version published before is served again from its archive).
"""

from __future__ import annotations

import contextlib
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

import requests

from genco.data import storage
from genco.errors import ConfigError, StoreError
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
from genco.serving.requests import sample_request

MODEL_NAME = "genco"
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
    return "".join(f"{k}={v}\n" for k, v in props.items())


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
    management_address: str = "http://127.0.0.1:8081",
) -> str:
    """``config.properties`` for KServe's TorchServe runtime, serving one version.

    batchSize is 1 because KServe's v1 envelope answers only the first request of a
    TorchServe batch; clients batch by sending several ``instances`` instead. Token auth is
    off: the InferenceService's ingress is the auth boundary and the KServe data plane sends
    no TorchServe token. The management API (model registration on) listens on the pod's
    loopback only, reached with ``kubectl port-forward``.
    """
    entry = json.loads(
        model_snapshot_entry(version, workers, 1, max_batch_delay_ms, response_timeout_s)
    )
    snapshot = {"name": "startup.cfg", "modelCount": 1, "models": entry}
    return properties_text(
        {
            "vmargs": JVM_ARGS,
            "inference_address": "http://0.0.0.0:8085",
            "management_address": management_address,
            "metrics_address": "http://0.0.0.0:8082",
            "grpc_inference_port": 7070,
            "grpc_management_port": 7071,
            "enable_metrics_api": "true",
            "metrics_mode": "prometheus",
            "number_of_netty_threads": 4,
            "job_queue_size": 100,
            "enable_envvars_config": "true",
            "install_py_dep_per_model": "false",
            "disable_token_authorization": "true",
            "enable_model_api": "true",
            "max_request_size": MAX_REQUEST_BYTES,
            "model_store": "/mnt/models/model-store",
            "model_snapshot": json.dumps(snapshot, separators=(",", ":")),
        }
    )


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
    either the old version or the new one; older archives stay in ``model-store/``.
    """
    mar = storage.join(root, "model-store", mar_name(version))
    if not storage.exists(mar, client=client):
        raise FileNotFoundError(f"{mar}: no archive for version '{version}'")
    config = storage.join(root, "config", "config.properties")
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


# ========================================================================= management


class ManagementError(RuntimeError):
    """A TorchServe management or inference call that did not succeed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"TorchServe answered {status}: {message}")
        self.status = status


def _error_message(resp: requests.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip()[:500]
    if isinstance(body, dict):
        inner = body.get("error", body)
        return str(inner.get("message", body) if isinstance(inner, dict) else inner)
    return str(body)


def read_token(key_file: str, api: str = "management") -> str:
    """A key from TorchServe's ``key_file.json`` (``management``, ``inference`` or ``API``)."""
    with open(key_file, encoding="utf-8") as f:
        keys = json.load(f)
    if api not in keys or "key" not in keys[api]:
        raise ConfigError(f"{key_file}: no '{api}' key (has: {', '.join(keys)})")
    return str(keys[api]["key"])


class ManagementClient:
    """TorchServe's management API for the "genco" model. Pass a session to reuse one."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        session: requests.Session | None = None,
        model_name: str = MODEL_NAME,
        timeout_s: float = 180.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.session = session or requests.Session()
        self.model_name = model_name
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, **params: object) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        resp = self.session.request(
            method, self.url + path, params=params, headers=headers, timeout=self.timeout_s
        )
        if resp.status_code >= 400:
            raise ManagementError(resp.status_code, _error_message(resp))
        return resp.json() if resp.content else None

    def register(
        self,
        mar_url: str,
        initial_workers: int = 1,
        synchronous: bool = True,
        **options: int,
    ) -> Any:
        """Load an archive; ``mar_url`` is a file name in the server's model store or an
        http(s) URL it can fetch. options: batch_size, max_batch_delay, response_timeout."""
        return self._call(
            "POST",
            "/models",
            url=mar_url,
            initial_workers=initial_workers,
            synchronous=str(synchronous).lower(),
            **options,
        )

    def set_default(self, version: str) -> None:
        self._call("PUT", f"/models/{self.model_name}/{version}/set-default")

    def versions(self) -> list[str]:
        """Registered versions; empty when the model is not registered at all."""
        try:
            described = self._call("GET", f"/models/{self.model_name}/all")
        except ManagementError as exc:
            if exc.status == 404:
                return []
            raise
        return [str(d["modelVersion"]) for d in described]

    def default_version(self) -> str | None:
        try:
            described = self._call("GET", f"/models/{self.model_name}")
        except ManagementError as exc:
            if exc.status == 404:
                return None
            raise
        return str(described[0]["modelVersion"])

    def unregister(self, version: str) -> None:
        self._call("DELETE", f"/models/{self.model_name}/{version}")


@dataclass(frozen=True)
class Deployment:
    version: str
    previous: str | None
    retired: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "previous": self.previous, "retired": list(self.retired)}


def probe_version(
    inference_url: str,
    version: str,
    request: dict[str, Any],
    token: str | None = None,
    session: requests.Session | None = None,
    timeout_s: float = 30.0,
) -> dict[str, Any]:
    """One real prediction against a specific version (``/predictions/genco/<version>``)."""
    session = session or requests.Session()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"{inference_url.rstrip('/')}/predictions/{MODEL_NAME}/{version}"
    resp = session.post(url, json=request, headers=headers, timeout=timeout_s)
    if resp.status_code != 200:
        raise ManagementError(resp.status_code, _error_message(resp))
    body: dict[str, Any] = resp.json()
    return body


def deploy_to_torchserve(
    client: ManagementClient,
    mar_url: str,
    version: str,
    *,
    initial_workers: int = 1,
    check: Callable[[str], object] | None = None,
) -> Deployment:
    """Register ``version`` and make it the default, keeping the previous one for rollback.

    check(version): e.g. ``probe_version``; runs against the new version before any client
    is routed to it. If registering, the check or the switch fails, the new version is
    unregistered and the default stays where it was. After the switch every version but the
    new and the previous one is unregistered: each holds worker processes.
    """
    check_version(version)
    previous = client.default_version()
    if previous == version:
        return Deployment(version, previous)
    registered = version in client.versions()
    if not registered:
        client.register(mar_url, initial_workers=initial_workers)
    try:
        if check is not None:
            check(version)
        client.set_default(version)
    except Exception:
        if not registered:
            with contextlib.suppress(ManagementError, requests.RequestException):
                client.unregister(version)
        raise
    retired = tuple(v for v in client.versions() if v not in (version, previous))
    for v in retired:
        client.unregister(v)
    return Deployment(version, previous, retired)


def rollback_default(
    client: ManagementClient, deployment: Deployment, unregister: bool = False
) -> str:
    """Make ``deployment.previous`` the default again; optionally drop the rolled-back one."""
    if deployment.previous is None:
        raise StoreError(f"version '{deployment.version}' had no previous version to return to")
    client.set_default(deployment.previous)
    if unregister:
        client.unregister(deployment.version)
    return deployment.previous


def publish(
    bundle_dir: str,
    root: str,
    version: str,
    management: ManagementClient | None = None,
    check: Callable[[str], object] | None = None,
    client: Any = None,
    switch: bool = True,
) -> dict[str, Any]:
    """Archive a bundle into a KServe layout at ``root`` and switch to it, in the order that
    keeps every failure harmless: the archive first (new file, nothing points at it), then
    the running TorchServe if one is given (register, check, set default), and the layout's
    config last (not at all with ``switch=False``: the store's deploy switches it after its
    pointer moved). Registration is by file name, so that server's model store must be
    ``root/model-store`` (as in a KServe pod, where ``root`` is mounted at /mnt/models)."""
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
    if switch:
        out["kserve"] = set_kserve_version(root, version, client=client).to_dict()
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
