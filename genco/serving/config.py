"""TorchServe's configuration for genco, written and checked: ``config.properties`` text.

* writing: ``properties_text`` (Java ``.properties``), ``allowed_urls`` (registration only
  from the model store), ``model_snapshot_entry`` (one default version of "genco", archived
  as ``mar_name(version)``), ``kserve_properties``, the config of a KServe layout (secure
  by default: token auth, loopback management, genco's JVM arguments only), and
  ``local_properties``, a private server's on loopback (``genco serve``);
* checking what a layout holds before anything runs it: ``parse_properties``,
  ``check_layout_config`` (only the keys genco writes, each with a value of its kind) and
  ``checked_members`` (a .mar that cannot unpack outside its directory nor into a zip bomb).

``genco.serving.archive`` publishes layouts with these; ``genco.serving.torchserve`` writes a
local server's config and serves a layout after checking it.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Callable, Sequence

from genco.models.checkpoint import check_version
from genco.serving.management import MODEL_NAME

# TorchServe's request size limit, above genco.serving.limits.MAX_BODY_BYTES so that the handler's
# 413 naming the limit, not Netty's bare one, is what clients see.
MAX_REQUEST_BYTES = 1024 * 1024
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
# Prometheus metrics in every config genco writes or ships: TorchServe's own (requests,
# latencies, queue time) and the handler's (genco.serving.metrics), registered without a
# metrics file. System metrics are off: they fork a Python process every minute for what the
# cluster (cAdvisor, node exporter) measures anyway.
METRICS_PROPERTIES: dict[str, object] = {
    "enable_metrics_api": "true",
    "metrics_mode": "prometheus",
    "model_metrics_auto_detect": "true",
    "disable_system_metrics": "true",
}
# The listeners of a KServe pod: inference must take traffic from outside the pod (the
# explicit 0.0.0.0), and so must metrics, for Prometheus to scrape them (serving/kserve.yaml's
# annotations; read-only counters, no request content); management stays on the pod's
# loopback (port-forward).
KSERVE_INFERENCE_ADDRESS = "http://0.0.0.0:8085"
KSERVE_METRICS_ADDRESS = "http://0.0.0.0:8082"
# A bundle archive is a few MB; a published .mar over these bounds is refused before it is
# read in full or unpacked (a zip bomb, or a path escaping the extraction directory).
MAX_ARCHIVE_BYTES = 512 * 1024 * 1024  # compressed, and all members uncompressed
MAX_ARCHIVE_MEMBERS = 1000


def mar_name(version: str) -> str:
    """One archive file per version, so several can sit in one model store."""
    return f"{MODEL_NAME}-{check_version(version)}.mar"


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
    batch_size: int = 8,
    max_batch_delay_ms: int = 1,
    response_timeout_s: int = 30,
    token_auth: bool = True,
    token_expiry_min: float = TOKEN_EXPIRY_MIN,
    inference_address: str = KSERVE_INFERENCE_ADDRESS,
    management_address: str = "http://127.0.0.1:8081",
    metrics_address: str = KSERVE_METRICS_ADDRESS,
) -> str:
    """``config.properties`` for KServe's TorchServe runtime, serving one version.

    Requests may be REST bodies, KServe v1 or v2 envelopes (``genco.serving.kserve`` answers
    every row of a batch and every item of an envelope on its own). Secure by
    default: token auth on (the pod's ``key_file.json``; ``token_auth=False`` only where an
    authenticating ingress fronts the InferenceService), models registered only from the
    layout's own model store (``allowed_urls``), and only inference and Prometheus metrics on
    0.0.0.0: management (model registration on) and gRPC listen on the pod's loopback,
    reached with ``kubectl port-forward``.
    """
    entry = json.loads(
        model_snapshot_entry(version, workers, batch_size, max_batch_delay_ms, response_timeout_s)
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
            **METRICS_PROPERTIES,
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


def local_properties(
    model_store: str,
    version: str,
    ports: Sequence[int],
    *,
    token_auth: bool = True,
    token_expiry_min: float = TOKEN_EXPIRY_MIN,
    enable_model_api: bool = False,
    workers: int = 1,
    batch_size: int = 8,
    max_batch_delay_ms: int = 1,
    response_timeout_s: int = 30,
) -> str:
    """``config.properties`` for a private TorchServe on loopback.

    Every listener, gRPC included, gets its own port, so several servers (tests, a demo, a
    benchmark) can run side by side. max_batch_delay_ms bounds what a lone request waits
    for batch-mates: TorchServe holds the first request that long whenever batch_size > 1.
    Keys last ``token_expiry_min`` (TorchServe's own default, 60, would lock clients out of
    a server that keeps running); models can be registered only from ``model_store``.
    """
    if not 0 < token_expiry_min <= TOKEN_EXPIRY_MIN:
        raise ValueError(
            f"token_expiry_min must be in (0, {TOKEN_EXPIRY_MIN}], got {token_expiry_min}"
        )
    inference, management, metrics, grpc_inference, grpc_management = ports
    return properties_text(
        {
            "vmargs": JVM_ARGS,
            "inference_address": f"http://127.0.0.1:{inference}",
            "management_address": f"http://127.0.0.1:{management}",
            "metrics_address": f"http://127.0.0.1:{metrics}",
            "grpc_inference_address": "127.0.0.1",
            "grpc_management_address": "127.0.0.1",
            "grpc_inference_port": grpc_inference,
            "grpc_management_port": grpc_management,
            "model_store": model_store,
            "load_models": mar_name(version),
            "models": model_snapshot_entry(
                version, workers, batch_size, max_batch_delay_ms, response_timeout_s
            ),
            "default_workers_per_model": workers,
            "install_py_dep_per_model": "false",
            "decode_input_request": "false",  # raw bytes for genco.serving's bounded parser
            "disable_token_authorization": str(not token_auth).lower(),
            "token_expiration_min": token_expiry_min,
            "enable_model_api": str(enable_model_api).lower(),
            "allowed_urls": allowed_urls(model_store),
            "max_request_size": MAX_REQUEST_BYTES,
            "async_logging": "true",
            **METRICS_PROPERTIES,
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
    "model_metrics_auto_detect": (_boolean, "true or false"),
    "disable_system_metrics": (_boolean, "true or false"),
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
