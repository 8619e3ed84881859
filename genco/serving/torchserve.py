"""A private local TorchServe: ``serve`` a bundle, or ``serve_layout`` a published KServe
layout as its pod would, and return once a real prediction succeeded."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

from genco.data import storage
from genco.inference.predictor import Predictor
from genco.models.checkpoint import bundle_version, check_version
from genco.serving.archive import LOG_CONFIG, build_mar
from genco.serving.auth import TOKEN_FILE_ENV, read_tokens
from genco.serving.config import (
    MAX_ARCHIVE_BYTES,
    TOKEN_EXPIRY_MIN,
    allowed_urls,
    check_layout_config,
    checked_members,
    local_properties,
    mar_name,
    properties_text,
)
from genco.serving.management import MODEL_NAME, ManagementClient, ManagementError, read_token
from genco.serving.requests import sample_request

# ============================================================================== serve


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    java = os.path.join(home, "bin", "java") if home else shutil.which("java")
    if not java or not os.path.exists(java):
        raise FileNotFoundError(
            "java not found: TorchServe 0.12 needs a Java 17 runtime "
            "(apt-get install openjdk-17-jre-headless, or set JAVA_HOME)"
        )
    return java


@dataclass
class ServeHandle:
    """A running local TorchServe; ``stop()`` (or leaving a ``with`` block) ends it."""

    inference_url: str
    management_url: str
    metrics_url: str
    workdir: str
    model_store: str
    version: str
    key_file: str | None
    process: subprocess.Popen[bytes]
    sample_request: dict[str, Any]
    sample_response: dict[str, Any] | None = None
    owns_workdir: bool = True
    grpc_target: str = ""  # host:port of TorchServe's gRPC inference API
    token_file: str | None = None  # the handler's bearer tokens (TorchServe's auth off)
    _stopped: bool = field(default=False, repr=False)

    def token(self, api: str = "inference") -> str | None:
        """Read fresh each time: TorchServe rewrites the key file when a key is regenerated,
        an operator the token file when a Secret rotates (its first token; no other APIs)."""
        if self.token_file:
            return read_tokens(self.token_file)[0] if api == "inference" else None
        return read_token(self.key_file, api) if self.key_file else None

    def headers(self, api: str = "inference") -> dict[str, str]:
        token = self.token(api)
        return {"Authorization": f"Bearer {token}"} if token else {}

    def token_expiry(self, api: str = "inference") -> datetime | None:
        """When TorchServe stops accepting the ``api`` key (None: no token auth)."""
        if not self.key_file:
            return None
        with open(self.key_file, encoding="utf-8") as f:
            stamp = json.load(f)[api]["expiration time"]
        return datetime.fromisoformat(stamp.replace("Z", "+00:00"))

    def renew_token(self, api: str = "inference", session: requests.Session | None = None) -> str:
        """A new ``api`` key ("inference" or "management") with a fresh expiry, through
        TorchServe's token API (the API key); TorchServe rewrites the key file, which
        ``token()`` reads, and the old key stops working."""
        if not self.key_file:
            raise ValueError("token auth is off: there is no key to renew")
        if api not in ("inference", "management"):
            raise ValueError(f"api must be 'inference' or 'management', got '{api}'")
        resp = (session or requests.Session()).get(
            f"{self.management_url}/token",
            params={"type": api},
            headers={"Authorization": f"Bearer {self.token('API')}"},
            timeout=30,
        )
        if resp.status_code != 200:
            raise ManagementError(resp.status_code, resp.text.strip()[:500])
        return str(self.token(api))

    def renew_expiring(self, within_s: float, session: requests.Session | None = None) -> list[str]:
        """Renew each key that expires within ``within_s`` seconds; the renewed APIs."""
        renewed = []
        for api in ("inference", "management"):
            expiry = self.token_expiry(api)
            if expiry is not None and (expiry - datetime.now(UTC)).total_seconds() < within_s:
                self.renew_token(api, session)
                renewed.append(api)
        return renewed

    def management(self, session: requests.Session | None = None) -> ManagementClient:
        return ManagementClient(self.management_url, self.token("management"), session)

    def predictions_url(self, version: str | None = None) -> str:
        suffix = f"/{version}" if version else ""
        return f"{self.inference_url}/predictions/{MODEL_NAME}{suffix}"

    def log_tail(self, chars: int = 4000) -> str:
        parts = []
        for name in ("launcher.log", "model_log.log", "ts_log.log"):
            path = os.path.join(self.workdir, "logs", name)
            if os.path.exists(path):
                with open(path, encoding="utf-8", errors="replace") as f:
                    parts.append(f"--- {name}\n{f.read()[-chars:]}")
        return "\n".join(parts)

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the whole process group (launcher, Java frontend, Python workers), then
        SIGKILL whatever is left after ``timeout_s``. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        pgid = self.process.pid  # start_new_session made the launcher the group leader
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=wait)
            while time.monotonic() < deadline:
                try:
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                continue
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ServeHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    model_dir: str,
    *,
    version: str | None = None,
    workdir: str | None = None,
    port_base: int | None = None,
    token_auth: bool = True,
    token_expiry_min: float = TOKEN_EXPIRY_MIN,
    enable_model_api: bool = False,
    workers: int = 1,
    batch_size: int = 8,
    max_batch_delay_ms: int = 1,
    startup_timeout_s: float = 180.0,
    log_config: str | os.PathLike[str] | None = LOG_CONFIG,
    session: requests.Session | None = None,
    model_store: str | None = None,
    properties: dict[str, object] | None = None,
    token_file: str | None = None,
) -> ServeHandle:
    """Start TorchServe on 127.0.0.1 serving ``model_dir``; return once a real prediction
    succeeded (TorchServe's ``/ping`` says Healthy before the worker has loaded the model).

    workdir: where config.properties, the model store, logs and ``key_file.json`` go (a
    fresh temp dir, removed on stop, by default). TorchServe keeps its pid file and worker
    sockets in $TMPDIR, so the server gets a private one: two servers on one machine would
    otherwise refuse to start or share sockets. port_base: inference, management, metrics
    and the two gRPC ports take port_base..port_base+4 (default: free ports). log_config:
    a log4j2 file (default ``serving/log4j2.xml``: warnings and one line per client error,
    rotated by size; None: TorchServe's own). token_expiry_min: how long the keys last.
    enable_model_api: allow registering models (``genco deploy --management-url``); off by
    default. model_store: TorchServe's model store (default ``workdir/model-store``); a
    store's ``STORE/kserve/model-store``, so that ``genco deploy``/``rollback`` with this
    server's management URL register the archives they publish there. properties: more
    ``config.properties`` entries, over genco's (benchmarks and experiments). token_file:
    the cluster's auth instead of TorchServe's (``genco.serving.auth``): TorchServe's token
    auth off, the handler accepts the bearer tokens in this file, read again when it changes.
    """
    _java()  # no Java, no TorchServe: say so before any work
    predictor = Predictor.load(model_dir)  # fail on a bad bundle before starting Java
    version = check_version(version) if version else bundle_version(model_dir)
    token_file = _checked_token_file(token_file)
    token_auth = token_auth and token_file is None
    with _private_workdir(workdir, "genco-ts-") as (workdir, store, owns):
        if model_store is not None:
            store = os.path.abspath(model_store)
            os.makedirs(store, exist_ok=True)
        if not os.path.exists(os.path.join(store, mar_name(version))):  # a store's, reused
            build_mar(model_dir, store, version)
        ports = list(range(port_base, port_base + 5)) if port_base else _free_ports(5)
        config = os.path.join(workdir, "config.properties")
        with open(config, "w", encoding="utf-8") as f:
            f.write(
                local_properties(
                    store,
                    version,
                    ports,
                    token_auth=token_auth,
                    token_expiry_min=token_expiry_min,
                    enable_model_api=enable_model_api,
                    workers=workers,
                    batch_size=batch_size,
                    max_batch_delay_ms=max_batch_delay_ms,
                )
                + properties_text(properties or {})
            )
        key_file = os.path.join(workdir, "key_file.json") if token_auth else None
        timing = (startup_timeout_s, session)
        return _launch(
            workdir,
            version,
            ports,
            predictor,
            key_file,
            owns,
            log_config,
            *timing,
            None,
            store,
            token_file,
        )


def serve_layout(
    root: str,
    *,
    workdir: str | None = None,
    startup_timeout_s: float = 180.0,
    log_config: str | os.PathLike[str] | None = LOG_CONFIG,
    session: requests.Session | None = None,
    token_file: str | None = None,
) -> ServeHandle:
    """Start TorchServe on a published KServe layout (``STORE/kserve``, local or gs://) the
    way the InferenceService's pod does: its ``config/config.properties`` (model snapshot,
    token setting) over its ``model-store/``, with only the listening addresses moved to free
    loopback ports (``TS_*`` variables, which the layout's config allows) and
    ``allowed_urls`` to the local model store. The config is validated first
    (``genco.serving.config.check_layout_config``: genco's keys only, no foreign JVM arguments) and
    the archive's members and sizes before anything is unpacked. Serves the version the
    layout points at; returns once a real prediction succeeded. token_file: run it as
    ``serving/kserve.yaml``'s pod does, with the token Secret mounted there
    (``torchserve --disable-token-auth``, ``GENCO_INFERENCE_TOKEN_FILE``)."""
    _java()  # no Java, no TorchServe: say so before any work
    token_file = _checked_token_file(token_file)
    config_uri = storage.join(root, "config", "config.properties")
    if not storage.exists(config_uri):
        raise FileNotFoundError(f"{config_uri}: no published layout (see genco deploy --serving)")
    props, version = check_layout_config(storage.read_text(config_uri), config_uri)
    with _private_workdir(workdir, "genco-ts-layout-") as (workdir, store, owns):
        mar_uri = storage.join(root, "model-store", mar_name(version))
        data = storage.read_bytes(mar_uri)
        if len(data) > MAX_ARCHIVE_BYTES:
            raise ValueError(f"{mar_uri}: {len(data)} bytes, over {MAX_ARCHIVE_BYTES}")
        mar = os.path.join(store, mar_name(version))
        with open(mar, "wb") as f:
            f.write(data)
        del data
        bundle = os.path.join(workdir, "bundle")
        with zipfile.ZipFile(mar) as z:  # the archive's extra files are the bundle
            z.extractall(bundle, checked_members(z, mar_uri))
        predictor = Predictor.load(bundle)
        config = os.path.join(workdir, "config.properties")
        with open(config, "w", encoding="utf-8") as f:
            f.write(properties_text({**props, "allowed_urls": allowed_urls(store)}))
        ports = _free_ports(5)
        env = {
            "TS_INFERENCE_ADDRESS": f"http://127.0.0.1:{ports[0]}",
            "TS_MANAGEMENT_ADDRESS": f"http://127.0.0.1:{ports[1]}",
            "TS_METRICS_ADDRESS": f"http://127.0.0.1:{ports[2]}",
            "TS_GRPC_INFERENCE_ADDRESS": "127.0.0.1",
            "TS_GRPC_MANAGEMENT_ADDRESS": "127.0.0.1",
            "TS_GRPC_INFERENCE_PORT": str(ports[3]),
            "TS_GRPC_MANAGEMENT_PORT": str(ports[4]),
        }
        token_auth = props.get("disable_token_authorization", "false") != "true"
        key_file = os.path.join(workdir, "key_file.json") if token_auth and not token_file else None
        timing = (startup_timeout_s, session)
        return _launch(
            workdir,
            version,
            ports,
            predictor,
            key_file,
            owns,
            log_config,
            *timing,
            env,
            None,
            token_file,
        )


def _checked_token_file(token_file: str | None) -> str | None:
    """An absolute path to a readable token file (a ConfigError naming it otherwise),
    checked before Java starts: the worker would only fail to load."""
    if token_file is None:
        return None
    read_tokens(token_file)
    return os.path.abspath(token_file)


@contextlib.contextmanager
def _private_workdir(workdir: str | None, prefix: str) -> Iterator[tuple[str, str, bool]]:
    """(workdir, its model-store/, whether we own it), with logs/ and tmp/ made; a workdir we
    created is removed again if anything fails before the server is running."""
    owns = workdir is None
    path = os.path.abspath(workdir or tempfile.mkdtemp(prefix=prefix))
    store = os.path.join(path, "model-store")
    for d in (store, os.path.join(path, "logs"), os.path.join(path, "tmp")):
        os.makedirs(d, exist_ok=True)
    try:
        yield path, store, owns
    except BaseException:
        if owns:
            shutil.rmtree(path, ignore_errors=True)
        raise


def _launch(
    workdir: str,
    version: str,
    ports: Sequence[int],
    predictor: Predictor,
    key_file: str | None,
    owns: bool,
    log_config: str | os.PathLike[str] | None,
    startup_timeout_s: float,
    session: requests.Session | None,
    extra_env: dict[str, str] | None = None,
    store: str | None = None,
    token_file: str | None = None,
) -> ServeHandle:
    """Run ``torchserve --foreground`` on ``workdir``'s config.properties and model-store/, in
    its own process group and TMPDIR, and wait for a real prediction. With ``token_file``,
    TorchServe's token auth is off on its command line and the handler checks that file's
    tokens, as in ``serving/kserve.yaml``'s pod."""
    java = _java()
    config = os.path.join(workdir, "config.properties")
    store = store or os.path.join(workdir, "model-store")
    env = {
        **os.environ,
        "TMPDIR": os.path.join(workdir, "tmp"),
        "TEMP": os.path.join(workdir, "tmp"),
        "LOG_LOCATION": os.path.join(workdir, "logs"),
        "METRICS_LOCATION": os.path.join(workdir, "logs"),
        "JAVA_HOME": os.environ.get("JAVA_HOME") or str(Path(java).resolve().parent.parent),
        # The worker forwards bodies as bytes, for genco.serving's bounded parser (the
        # handler sets this too, for servers we do not start).
        "TS_DECODE_INPUT_REQUEST": "false",
        **(extra_env or {}),
    }
    env.pop(TOKEN_FILE_ENV, None)
    cmd = [sys.executable, "-m", "ts.model_server", "--start", "--foreground", "--ncs"]
    cmd += ["--ts-config", config, "--model-store", store]
    if token_file:
        env[TOKEN_FILE_ENV] = token_file
        cmd.append("--disable-token-auth")
    if log_config is not None:
        cmd += ["--log-config", os.fspath(log_config)]
    with open(os.path.join(workdir, "logs", "launcher.log"), "wb") as log:
        process = subprocess.Popen(
            cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    handle = ServeHandle(
        inference_url=f"http://127.0.0.1:{ports[0]}",
        management_url=f"http://127.0.0.1:{ports[1]}",
        metrics_url=f"http://127.0.0.1:{ports[2]}",
        workdir=workdir,
        model_store=store,
        version=version,
        key_file=key_file,
        process=process,
        sample_request=sample_request(predictor),
        owns_workdir=owns,
        grpc_target=f"127.0.0.1:{ports[3]}",
        token_file=token_file,
    )
    atexit.register(handle.stop)
    try:
        handle.sample_response = _wait_ready(handle, startup_timeout_s, session)
    except TimeoutError as exc:
        tail = handle.log_tail()
        handle.stop()
        raise TimeoutError(f"{exc}\n{tail}") from None
    except BaseException:
        handle.stop()
        raise
    return handle


def _wait_ready(
    handle: ServeHandle, timeout_s: float, session: requests.Session | None
) -> dict[str, Any]:
    session = session or requests.Session()
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        if handle.process.poll() is not None:
            raise RuntimeError(
                f"TorchServe exited with status {handle.process.returncode}\n{handle.log_tail()}"
            )
        if handle.key_file and not os.path.exists(handle.key_file):
            time.sleep(0.25)
            continue
        try:
            resp = session.post(
                handle.predictions_url(),
                json=handle.sample_request,
                headers=handle.headers(),
                timeout=10,
            )
            if resp.status_code == 200:
                body: dict[str, Any] = resp.json()
                return body
            last = f"{resp.status_code}: {resp.text.strip()[:200]}"
        except (requests.ConnectionError, requests.Timeout, json.JSONDecodeError, KeyError) as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.25)
    raise TimeoutError(f"TorchServe gave no prediction within {timeout_s:.0f}s (last: {last})")
