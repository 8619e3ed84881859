"""Serving: REST requests -> ``Predictor``, model archives, KServe layout, TorchServe control.

Everything TorchServe needs lives here so that ``serving/handler.py`` stays a thin shell and
the CLI, the pipeline's deploy step and the benchmark call the same functions:

* requests: ``parse_request`` validates one JSON body into a ``RecommendRequest`` (a
  ``RequestError`` names the field and carries the HTTP status), ``handle_batch`` answers a
  TorchServe batch, one result or error per request;
* archives: ``build_mar`` runs ``torch-model-archiver`` over the handler, the bundle files and
  ``serving/model-config.yaml``; ``write_kserve_layout`` publishes it in the layout KServe's
  TorchServe runtime mounts (``config/config.properties`` + ``model-store/``);
* control: ``ManagementClient`` speaks TorchServe's management API, ``deploy_to_torchserve``
  registers a version and makes it the default (keeping the previous one for
  ``rollback_default``); ``publish`` does archive + register + layout switch in a safe order
  and ``make_on_promote`` plugs it into ``genco.deploy.promote`` and ``rollback`` (a version
  published before is served again from its archive);
* ``serve`` starts a private local TorchServe and returns once a real prediction succeeded.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pandas as pd
import requests

from genco import storage
from genco.bundle import REWARD_META, REWARD_WEIGHTS
from genco.contract import AD, ANY_AD, CONSTRAINT_COLUMNS, CONTEXT_PREFIX, Catalog, Constraints
from genco.decode import REFINES
from genco.predictor import MAX_TOP_K, MODES, Predictor, inline_catalog
from genco.train import CATALOG, CONSTRAINTS, GEN_META, GEN_WEIGHTS, MANIFEST

MODEL_NAME = "genco"
# Requests are a few hundred bytes; 64 KiB leaves room for inline candidate sets while a
# runaway client gets a 413 that names the limit. TorchServe's own limit is set above it
# (MAX_REQUEST_BYTES) so that our message, not Netty's bare 413, is what clients see.
MAX_BODY_BYTES = 64 * 1024
MAX_REQUEST_BYTES = 1024 * 1024
MAX_CANDIDATES = 256  # per component of an inline candidate set
MAX_CONSTRAINTS = 256
INLINE_AD = "__inline__"
REQUIRED_BUNDLE_FILES = (MANIFEST, REWARD_WEIGHTS, REWARD_META, GEN_WEIGHTS, GEN_META, CATALOG)
# The handler and its configs ship in the repository's serving/, next to genco/. An image
# that pip-installs genco (non-editable) copies serving/ elsewhere and says where.
SERVING_DIR = Path(
    os.environ.get("GENCO_SERVING_DIR") or Path(__file__).resolve().parent.parent / "serving"
)
HANDLER = SERVING_DIR / "handler.py"
MODEL_CONFIG = SERVING_DIR / "model-config.yaml"
LOG_CONFIG = SERVING_DIR / "log4j2.xml"
KSERVE_DIR = "kserve"
# A small JVM for a small model: on 2 cores, G1's and C2's background threads compete with
# the Python worker. Serial GC plus the C1 compiler alone cut the frontend's CPU per request
# by ~40% at concurrency 8 (bench/serving.py: 181 -> 320 req/s on a shared 2-core box).
JVM_ARGS = "-XX:+UseSerialGC -Xmx512m -XX:TieredStopAtLevel=1 -XX:CICompilerCount=1"
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_FIELDS = (
    "ad_id",
    "candidates",
    "constraints",
    "top_k",
    "mode",
    "refine",
    "explain",
    "temperature",
    "seed",
)


# ============================================================================ requests


class RequestError(ValueError):
    """A client mistake: the message names the field; ``status`` is the HTTP status to send."""

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.status = status

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"status": self.status, "field": self.field, "message": str(self)}}


@dataclass(frozen=True)
class RecommendRequest:
    """One validated request. Exactly one of ``ad_id`` and ``candidates`` is set.

    candidates: ``{component: [{"id": ..., "feat_*": ...}]}`` in the model's component order,
    every element spelled out with its features (from the request, else the bundle catalog).
    constraints: extra forbidden pairs for this request, in contract columns (``ad_id`` "*").
    """

    ad_id: str | None = None
    candidates: dict[str, list[dict[str, Any]]] | None = None
    context: dict[str, float] | None = None
    constraints: tuple[dict[str, str], ...] = ()
    top_k: int = 5
    mode: str = "beam"
    refine: str | None = None  # None: the predictor's default
    explain: bool = False
    temperature: float = 1.0
    seed: int | None = None


def _json_type(value: object) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array"}
    return "null" if value is None else names.get(type(value), "object")


def _is_number(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _decode(body: object) -> dict[str, Any]:
    """The request as a dict; TorchServe hands over parsed JSON, raw bytes or text."""
    if body is None:
        raise RequestError("body", "empty; send a JSON object")
    if isinstance(body, (bytes, bytearray, str)):
        raw = body.encode("utf-8") if isinstance(body, str) else bytes(body)
        if len(raw) > MAX_BODY_BYTES:
            raise RequestError(
                "body", f"{len(raw)} bytes is over the limit of {MAX_BODY_BYTES}", 413
            )
        if not raw.strip():
            raise RequestError("body", "empty; send a JSON object")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError("body", f"not valid JSON ({exc})") from None
    elif isinstance(body, dict):
        size = len(json.dumps(body, separators=(",", ":")))
        if size > MAX_BODY_BYTES:
            raise RequestError("body", f"{size} bytes is over the limit of {MAX_BODY_BYTES}", 413)
    if not isinstance(body, dict):
        raise RequestError("body", f"must be a JSON object, got {_json_type(body)}")
    return body


def _string(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise RequestError(name, f"must be a string, got {_json_type(value)}")
    if not value.strip():
        raise RequestError(name, "must not be empty")
    return value


def _elements(
    comp: int, name: str, raw: object, predictor: Predictor, features: tuple[str, ...]
) -> list[dict[str, Any]]:
    """One component's inline candidates, each as ``{"id", feat_*...}`` with all features."""
    field_ = f"candidates.{name}"
    if not isinstance(raw, list):
        raise RequestError(field_, f"must be an array of element ids, got {_json_type(raw)}")
    if not raw:
        raise RequestError(field_, "must not be empty: every component needs a candidate")
    if len(raw) > MAX_CANDIDATES:
        raise RequestError(field_, f"{len(raw)} candidates, at most {MAX_CANDIDATES}", 413)
    catalog = predictor.catalog
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, e in enumerate(raw):
        where = f"{field_}[{i}]"
        given: dict[str, Any] = {}
        if isinstance(e, dict):
            eid = _string(e.get("id"), f"{where}.id")
            for key, value in e.items():
                if key == "id":
                    continue
                if key not in features:
                    allowed = ", ".join(features) or "none"
                    raise RequestError(
                        f"{where}.{key}", f"unknown feature (the model's features: {allowed})"
                    )
                if not _is_number(value):
                    raise RequestError(
                        f"{where}.{key}", f"must be a finite number, got {_json_type(value)}"
                    )
                given[key] = float(value)
        else:
            eid = _string(e, where)
        if eid in seen:
            raise RequestError(where, f"duplicate element '{eid}'")
        seen.add(eid)
        if catalog.has_element(comp, eid):  # a known element keeps its catalog features
            known = catalog.features[comp][catalog.element_code(comp, eid)]
            base = {f: float(v) for f, v in zip(features, known)}
        else:
            base = dict.fromkeys(features, 0.0)
        out.append({"id": eid, **base, **given})
    return out


def _candidates(raw: object, predictor: Predictor) -> dict[str, list[dict[str, Any]]]:
    if not isinstance(raw, dict):
        raise RequestError("candidates", f"must be an object, got {_json_type(raw)}")
    comps = predictor.catalog.components
    for name in raw:
        if name not in comps:
            raise RequestError(
                f"candidates.{name}", f"unknown component (the model's: {', '.join(comps)})"
            )
    for name in comps:
        if name not in raw:
            raise RequestError(f"candidates.{name}", "missing: every component needs candidates")
    features = predictor.catalog.feature_names
    return {c: _elements(k, c, raw[c], predictor, features) for k, c in enumerate(comps)}


def _constraints(
    raw: object, predictor: Predictor, candidates: dict[str, list[dict[str, Any]]] | None, ad: str
) -> tuple[dict[str, str], ...]:
    """Forbidden pairs for this request; every element must be one of its candidates."""
    if not isinstance(raw, list):
        raise RequestError("constraints", f"must be an array, got {_json_type(raw)}")
    if len(raw) > MAX_CONSTRAINTS:
        raise RequestError("constraints", f"{len(raw)} pairs, at most {MAX_CONSTRAINTS}", 413)
    catalog = predictor.catalog
    comps = catalog.components
    if candidates is not None:
        pool = {c: {e["id"] for e in candidates[c]} for c in comps}
    else:
        a = catalog.ad_code(ad)
        pool = {
            c: {catalog.elements[k][e] for e in catalog.candidates[a][k]}
            for k, c in enumerate(comps)
        }
    keys = CONSTRAINT_COLUMNS[1:]
    out = []
    for i, pair in enumerate(raw):
        where = f"constraints[{i}]"
        if not isinstance(pair, dict):
            raise RequestError(where, f"must be an object, got {_json_type(pair)}")
        for key in pair:
            if key not in keys:
                raise RequestError(f"{where}.{key}", f"unknown field (allowed: {', '.join(keys)})")
        row = {k: _string(pair.get(k), f"{where}.{k}") for k in keys}
        for side in ("a", "b"):
            comp, elem = row[f"component_{side}"], row[f"element_{side}"]
            if comp not in comps:
                raise RequestError(
                    f"{where}.component_{side}",
                    f"unknown component '{comp}' (the model's: {', '.join(comps)})",
                )
            if elem not in pool[comp]:
                raise RequestError(
                    f"{where}.element_{side}", f"'{elem}' is not a candidate of '{comp}'"
                )
        if row["component_a"] == row["component_b"]:
            raise RequestError(f"{where}.component_b", "must differ from component_a")
        out.append({AD: ANY_AD, **row})
    return tuple(out)


def _context(body: dict[str, Any], predictor: Predictor) -> dict[str, float] | None:
    cols = predictor.context_columns
    given = {k: v for k, v in body.items() if k.startswith(CONTEXT_PREFIX)}
    for key in given:
        if key not in cols:
            known = ", ".join(cols) or "none"
            raise RequestError(key, f"unknown context column (the model's: {known})")
    for col in cols:
        if col not in given:
            raise RequestError(col, "missing: the model needs every context column")
        if not _is_number(given[col]):
            raise RequestError(col, f"must be a finite number, got {_json_type(given[col])}")
    return {c: float(given[c]) for c in cols} if cols else None


def parse_request(body: object, predictor: Predictor) -> RecommendRequest:
    """Validate one request against the model; every mistake is a ``RequestError``.

    The body may be a parsed JSON object, or the raw bytes/text TorchServe forwards when the
    client's JSON was malformed or sent without a JSON content type.
    """
    data = _decode(body)
    for key in data:
        if key not in _FIELDS and not key.startswith(CONTEXT_PREFIX):
            raise RequestError(key, f"unknown field (allowed: {', '.join(_FIELDS)}, ctx_*)")
    has_ad, has_cands = data.get("ad_id") is not None, data.get("candidates") is not None
    if has_ad == has_cands:
        raise RequestError("ad_id", "give either ad_id or candidates (exactly one)")
    ad_id = candidates = None
    if has_ad:
        ad_id = _string(data["ad_id"], "ad_id")
        if ad_id not in predictor.catalog.ads:
            raise RequestError("ad_id", f"'{ad_id}' is not in the model's catalog", 404)
    else:
        candidates = _candidates(data["candidates"], predictor)
    constraints: tuple[dict[str, str], ...] = ()
    if data.get("constraints") is not None:
        constraints = _constraints(data["constraints"], predictor, candidates, ad_id or "")
    top_k = data.get("top_k", 5)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= MAX_TOP_K:
        raise RequestError("top_k", f"must be an integer in [1, {MAX_TOP_K}], got {top_k!r}")
    mode = data.get("mode", "beam")
    if mode not in MODES:
        raise RequestError("mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
    refine = data.get("refine")
    if refine is not None and refine not in REFINES:
        raise RequestError("refine", f"must be one of {', '.join(REFINES)}, got {refine!r}")
    explain = data.get("explain", False)
    if not isinstance(explain, bool):
        raise RequestError("explain", f"must be true or false, got {_json_type(explain)}")
    temperature = data.get("temperature", 1.0)
    if not _is_number(temperature) or not temperature > 0:
        raise RequestError("temperature", f"must be a number > 0, got {temperature!r}")
    seed = data.get("seed")
    if seed is not None and (
        not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63
    ):
        raise RequestError("seed", f"must be an integer in [0, 2^63), got {seed!r}")
    return RecommendRequest(
        ad_id=ad_id,
        candidates=candidates,
        context=_context(data, predictor),
        constraints=constraints,
        top_k=top_k,
        mode=mode,
        refine=refine,
        explain=explain,
        temperature=float(temperature),
        seed=seed,
    )


def _scoped(predictor: Predictor, req: RecommendRequest) -> tuple[Predictor, str]:
    """A predictor over just this request's candidates and constraints (same weights).

    Only inline candidate sets and per-request constraints pay for this: binding a catalog
    builds legal-move masks, which the shared predictor has cached for the bundle's catalog.
    """
    catalog = predictor.catalog
    if req.candidates is not None:
        ad = INLINE_AD
        scoped = inline_catalog(req.candidates, catalog.feature_names, ad)
        base = pd.DataFrame(columns=list(CONSTRAINT_COLUMNS))
    else:
        ad = req.ad_id or ""
        frame = catalog.to_frame()
        scoped = Catalog.from_frame(frame[frame[AD] == ad].reset_index(drop=True), "catalog")
        base = predictor.constraints.to_frame(catalog)
        keep = base[AD].isin([ad, ANY_AD])
        for k, comp in enumerate(scoped.components):
            for side in ("a", "b"):
                hit = base[f"component_{side}"] == comp
                known = base[f"element_{side}"].map(lambda e, k=k: scoped.has_element(k, e))
                keep &= ~hit | known
        base = base[keep]
    rows = pd.DataFrame(list(req.constraints), columns=list(CONSTRAINT_COLUMNS))
    table = pd.concat([base, rows], ignore_index=True) if len(base) else rows
    constraints = (
        Constraints.from_frame(table, scoped, "constraints") if len(table) else Constraints.empty()
    )
    return Predictor(
        predictor.reward, predictor.generator, scoped, constraints, predictor.version
    ), ad


def predict(predictor: Predictor, req: RecommendRequest) -> dict[str, Any]:
    """The response body for one validated request."""
    p, ad = (predictor, req.ad_id or "")
    scoped = req.candidates is not None or bool(req.constraints)
    if scoped:
        p, ad = _scoped(predictor, req)
    try:
        recs = p.recommend(
            ad,
            req.context,
            top_k=req.top_k,
            mode=req.mode,
            explain=req.explain,
            temperature=req.temperature,
            seed=req.seed,
            refine=req.refine,
        )
    except ValueError as exc:
        if not scoped:  # the bundle's own catalog always has a legal completion: a bug
            raise
        # e.g. the request's pairs leave some component without any legal element
        raise RequestError("constraints" if req.constraints else "candidates", str(exc)) from None
    out: dict[str, Any] = {"model_version": predictor.version, "mode": req.mode}
    if req.ad_id is not None:
        out["ad_id"] = req.ad_id
    out["recommendations"] = [r.to_dict() for r in recs]
    return out


def handle_batch(
    predictor: Predictor,
    requests_: Sequence[object],
    explain: Sequence[bool] | None = None,
) -> list[dict[str, Any] | RequestError]:
    """One response body or ``RequestError`` per request, in order.

    A bad request never fails its batch-mates: TorchServe batches unrelated clients together.
    explain[i]: force attributions for request i (TorchServe's ``/explanations`` endpoint).
    """
    out: list[dict[str, Any] | RequestError] = []
    for i, body in enumerate(requests_):
        try:
            req = parse_request(body, predictor)
            if explain is not None and explain[i]:
                req = replace(req, explain=True)
            out.append(predict(predictor, req))
        except RequestError as exc:
            out.append(exc)
    return out


def request_body(row: object) -> object:
    """The client's payload from a TorchServe batch row.

    TorchServe wraps each request as ``{"body": ...}`` (or ``{"data": ...}`` for form posts);
    behind KServe's envelope the handler receives the ``instances`` themselves.
    """
    if isinstance(row, dict) and ("body" in row or "data" in row):
        return row["data"] if row.get("data") is not None else row.get("body")
    return row


def enveloped(rows: Sequence[object]) -> bool:
    """True when a request envelope (KServe's) unwrapped the rows into bare instances."""
    return any(not (isinstance(r, dict) and ("body" in r or "data" in r)) for r in rows)


def encode_json(body: dict[str, Any]) -> bytes:
    """Compact JSON bytes. Handed a dict, TorchServe pretty-prints it with ``indent=2``,
    which forces Python's pure-Python encoder: ~0.5 ms per response, a third of a request."""
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def respond(results: Sequence[dict[str, Any] | RequestError]) -> list[tuple[int, dict[str, Any]]]:
    """(HTTP status, JSON body) per result."""
    return [(r.status, r.to_dict()) if isinstance(r, RequestError) else (200, r) for r in results]


def reason_phrase(status: int) -> str:
    """The standard phrase: TorchServe puts it on the status line, which allows no newlines."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def sample_request(predictor: Predictor, top_k: int = 3) -> dict[str, Any]:
    """A valid request for the bundle's first ad: the readiness probe and the README example."""
    ctx = dict.fromkeys(predictor.context_columns, 0.0)
    return {"ad_id": predictor.catalog.ads[0], **ctx, "top_k": top_k}


def load_predictor(model_dir: str, threads: int | None = 1) -> Predictor:
    """Load a bundle for serving and warm it up.

    Requests decode with the predictor's default ``refine`` ("none": the beam re-ranked) unless
    they ask for a local search: on 4 components x 10 candidates, top 5, "pairs" adds
    0.2-0.6 ms to a 0.4-0.8 ms request, which the REST latency budget (p50 5 ms, TorchServe's
    own share ~4 ms) does not have by default (BENCHMARKS.md: what each level buys).

    threads: torch intra-op threads for this process (None leaves them alone). One, because
    a request is a few small matrix products for which thread hand-off costs more than it
    saves, and on a busy box threads fighting over the same cores make p99 explode (a 2-core
    machine under load measured 10x slower with 2 threads than with 1). Scale with workers.
    The warm-up request builds the cached candidate vectors and legal masks, so the first
    client does not pay for them.
    """
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    predictor = Predictor.load(model_dir)
    predict(predictor, parse_request(sample_request(predictor), predictor))
    return predictor


# ============================================================================ archives


def check_version(version: str) -> str:
    """TorchServe puts versions in URLs and we put them in file names: keep them plain."""
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise ValueError(
            f"version '{version}' must be 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return version


def bundle_version(bundle_dir: str, client: Any = None) -> str:
    """The manifest's ``version``, else its ``created_at`` as ``YYYYmmddTHHMMSSZ``."""
    path = storage.join(bundle_dir, MANIFEST)
    if not storage.exists(path, client=client):
        raise FileNotFoundError(f"{bundle_dir}: not a bundle (missing {MANIFEST})")
    manifest = storage.read_json(path, client=client)
    version = manifest.get("version") or re.sub(r"[^0-9TZ]", "", manifest.get("created_at", ""))
    if not version:
        raise ValueError(f"{bundle_dir}: manifest has neither 'version' nor 'created_at'")
    return check_version(str(version))


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


def _properties(props: dict[str, object]) -> str:
    return "".join(f"{k}={v}\n" for k, v in props.items())


def _model_entry(
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
    entry = json.loads(_model_entry(version, workers, 1, max_batch_delay_ms, response_timeout_s))
    snapshot = {"name": "startup.cfg", "modelCount": 1, "models": entry}
    return _properties(
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
        raise KeyError(f"{key_file}: no '{api}' key (has: {', '.join(keys)})")
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
        raise ValueError(f"version '{deployment.version}' had no previous version to return to")
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
) -> dict[str, Any]:
    """Archive a bundle into a KServe layout at ``root`` and switch to it, in the order that
    keeps every failure harmless: the archive first (new file, nothing points at it), then
    the running TorchServe if one is given (register, check, set default), and the layout's
    config last. Registration is by file name, so that server's model store must be
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
    serving, each version that becomes production is published in ``STORE/kserve`` (and
    registered as TorchServe's default) before the store's pointer moves: serving never lags
    the store. None when none of that applies.
    """
    if not (publish or management_url or is_published(store_uri, client=client)):
        return None
    token = read_token(key_file, "management") if key_file else None
    return make_on_promote(store_uri, management_url or None, token, client=client)


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
    """The serving half of ``genco.deploy.promote`` and ``rollback`` (their ``on_promote``):
    ``publish`` each version that becomes production into ``STORE/kserve`` (the
    InferenceService's storageUri; an archive published before is reused), registering it
    on the TorchServe at ``management_url`` when given (again, if it was retired), after a
    real prediction against that version when ``inference_url`` is given too. Any failure
    raises, so the store's pointer stays where it was."""
    root = storage.join(store_uri, KSERVE_DIR)

    def on_promote(version_dir: str, version: str) -> None:
        management = check = None
        if management_url:
            management = ManagementClient(management_url, token)
            if inference_url:
                request = sample_request(Predictor.load(version_dir, client=client))

                def check(v: str) -> object:
                    return probe_version(inference_url, v, request, inference_token)

        publish(version_dir, root, version, management, check, client)

    return on_promote


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


def local_properties(
    model_store: str,
    version: str,
    ports: Sequence[int],
    *,
    token_auth: bool = True,
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
    """
    inference, management, metrics, grpc_inference, grpc_management = ports
    return _properties(
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
            "models": _model_entry(
                version, workers, batch_size, max_batch_delay_ms, response_timeout_s
            ),
            "default_workers_per_model": workers,
            "install_py_dep_per_model": "false",
            "disable_token_authorization": str(not token_auth).lower(),
            "enable_model_api": str(enable_model_api).lower(),
            "max_request_size": MAX_REQUEST_BYTES,
            "async_logging": "true",
        }
    )


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
    _stopped: bool = field(default=False, repr=False)

    def token(self, api: str = "inference") -> str | None:
        """Read fresh each time: TorchServe rewrites the key file when a key is regenerated."""
        return read_token(self.key_file, api) if self.key_file else None

    def headers(self, api: str = "inference") -> dict[str, str]:
        token = self.token(api)
        return {"Authorization": f"Bearer {token}"} if token else {}

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
    enable_model_api: bool = False,
    workers: int = 1,
    batch_size: int = 8,
    max_batch_delay_ms: int = 1,
    startup_timeout_s: float = 180.0,
    log_config: str | os.PathLike[str] | None = LOG_CONFIG,
    session: requests.Session | None = None,
) -> ServeHandle:
    """Start TorchServe on 127.0.0.1 serving ``model_dir``; return once a real prediction
    succeeded (TorchServe's ``/ping`` says Healthy before the worker has loaded the model).

    workdir: where config.properties, the model store, logs and ``key_file.json`` go (a
    fresh temp dir, removed on stop, by default). TorchServe keeps its pid file and worker
    sockets in $TMPDIR, so the server gets a private one: two servers on one machine would
    otherwise refuse to start or share sockets. port_base: inference, management, metrics
    and the two gRPC ports take port_base..port_base+4 (default: free ports). log_config:
    a log4j2 file (default ``serving/log4j2.xml``: warnings only; None: TorchServe's own).
    """
    _java()  # no Java, no TorchServe: say so before any work
    predictor = Predictor.load(model_dir)  # fail on a bad bundle before starting Java
    version = check_version(version) if version else bundle_version(model_dir)
    with _private_workdir(workdir, "genco-ts-") as (workdir, store, owns):
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
                    enable_model_api=enable_model_api,
                    workers=workers,
                    batch_size=batch_size,
                    max_batch_delay_ms=max_batch_delay_ms,
                )
            )
        key_file = os.path.join(workdir, "key_file.json") if token_auth else None
        timing = (startup_timeout_s, session)
        return _launch(workdir, version, ports, predictor, key_file, owns, log_config, *timing)


def serve_layout(
    root: str,
    *,
    workdir: str | None = None,
    startup_timeout_s: float = 180.0,
    log_config: str | os.PathLike[str] | None = LOG_CONFIG,
    session: requests.Session | None = None,
) -> ServeHandle:
    """Start TorchServe on a published KServe layout (``STORE/kserve``, local or gs://) the
    way the InferenceService's pod does: its ``config/config.properties`` (model snapshot,
    no token auth) over its ``model-store/``, with only the listening addresses moved to free
    loopback ports (``TS_*`` variables, which the layout's config allows). Serves the version
    the layout points at; returns once a real prediction succeeded."""
    _java()  # no Java, no TorchServe: say so before any work
    config_uri = storage.join(root, "config", "config.properties")
    if not storage.exists(config_uri):
        raise FileNotFoundError(f"{config_uri}: no published layout (see genco deploy --serving)")
    text = storage.read_text(config_uri)
    props = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    models = json.loads(props["model_snapshot"])["models"][MODEL_NAME]
    version = next(v for v, entry in models.items() if entry.get("defaultVersion"))
    with _private_workdir(workdir, "genco-ts-layout-") as (workdir, store, owns):
        mar = os.path.join(store, mar_name(version))
        with open(mar, "wb") as f:
            f.write(storage.read_bytes(storage.join(root, "model-store", mar_name(version))))
        bundle = os.path.join(workdir, "bundle")
        with zipfile.ZipFile(mar) as z:  # the archive's extra files are the bundle
            z.extractall(bundle)
        predictor = Predictor.load(bundle)
        config = os.path.join(workdir, "config.properties")
        with open(config, "w", encoding="utf-8") as f:
            f.write(text)
        ports = _free_ports(5)
        env = {
            "TS_INFERENCE_ADDRESS": f"http://127.0.0.1:{ports[0]}",
            "TS_MANAGEMENT_ADDRESS": f"http://127.0.0.1:{ports[1]}",
            "TS_METRICS_ADDRESS": f"http://127.0.0.1:{ports[2]}",
            "TS_GRPC_INFERENCE_PORT": str(ports[3]),
            "TS_GRPC_MANAGEMENT_PORT": str(ports[4]),
        }
        timing = (startup_timeout_s, session)
        return _launch(workdir, version, ports, predictor, None, owns, log_config, *timing, env)


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
) -> ServeHandle:
    """Run ``torchserve --foreground`` on ``workdir``'s config.properties and model-store/, in
    its own process group and TMPDIR, and wait for a real prediction."""
    java = _java()
    config = os.path.join(workdir, "config.properties")
    store = os.path.join(workdir, "model-store")
    env = {
        **os.environ,
        "TMPDIR": os.path.join(workdir, "tmp"),
        "TEMP": os.path.join(workdir, "tmp"),
        "LOG_LOCATION": os.path.join(workdir, "logs"),
        "METRICS_LOCATION": os.path.join(workdir, "logs"),
        "JAVA_HOME": os.environ.get("JAVA_HOME") or str(Path(java).resolve().parent.parent),
        **(extra_env or {}),
    }
    cmd = [sys.executable, "-m", "ts.model_server", "--start", "--foreground", "--ncs"]
    cmd += ["--ts-config", config, "--model-store", store]
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
