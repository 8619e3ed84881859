"""Serving requests: REST bodies -> ``Predictor`` -> response bodies, for TorchServe.

``serving/handler.py`` is a thin shell over this module, so the CLI, the tests and the
benchmark run exactly what the handler runs: ``parse_request`` validates one JSON body into a
``RecommendRequest`` (a ``RequestError`` names the field and carries the HTTP status),
``predict`` answers it, ``answer`` answers one body (its result or its error, never raising),
``handle_batch`` a list of them (a bad request never fails its batch-mates), ``load_predictor``
loads and warms a bundle for a worker. ``genco.serving.kserve`` takes TorchServe's batch rows
apart (REST bodies, KServe v1 and v2 envelopes) and calls ``answer`` for each request.

Bodies are bounded before anything recursive touches them (``genco.serving.limits``: the
content type, the size, the nesting depth and every number). A malformed request gets its own
4xx, an unexpected exception a 500 for that request only, and a response with a non-finite
number is never sent (it becomes that request's 500).

Archives and the KServe layout are in ``genco.serving.archive``, the TorchServe configs they
write in ``genco.serving.config``, TorchServe's management API in ``genco.serving.management``;
a local TorchServe process in ``genco.serving.torchserve``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from http import HTTPStatus
from typing import Any

import pandas as pd

from genco.data.contract import AD, ANY_AD, CONSTRAINT_COLUMNS, CONTEXT_PREFIX, Catalog, Constraints
from genco.errors import RequestError
from genco.inference.predictor import MAX_TOP_K, MODES, Predictor, inline_catalog
from genco.models.tables import REFINES
from genco.serving.limits import (
    check_response,
    decode_body,
    encode_json,
    feature_value,
    is_number,
    json_type,
)

MAX_CANDIDATES = 256  # per component of an inline candidate set
MAX_CONSTRAINTS = 256
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1e3  # float32 logits / temperature stay finite
INLINE_AD = "__inline__"
_LOG_CHARS = 300  # one log line per client error, whatever the client sent
logger = logging.getLogger(__name__)
_FIELDS = (
    "ad_id",
    "candidates",
    "constraints",
    "top_k",
    "mode",
    "refine",
    "explain",
    "temperature",
    "explore",
    "seed",
)


# ============================================================================ requests


class InternalError(RuntimeError):
    """A request that failed on our side (a bug, or a response with a non-finite number):
    answered with a 500 for that request alone; the traceback goes to the server's log."""

    status = 500
    field = None

    def __init__(self, cause: BaseException) -> None:
        super().__init__(
            f"internal error ({type(cause).__name__}); the server logged it, "
            "other requests are unaffected"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"status": self.status, "field": self.field, "message": str(self)}}


Result = dict[str, Any] | RequestError | InternalError


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
    explore: float | None = None  # None: the model's GeneratorConfig.explore
    seed: int | None = None


def _string(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise RequestError(name, f"must be a string, got {json_type(value)}")
    if not value.strip():
        raise RequestError(name, "must not be empty")
    return value


def _elements(
    comp: int, name: str, raw: object, predictor: Predictor, features: tuple[str, ...]
) -> list[dict[str, Any]]:
    """One component's inline candidates, each as ``{"id", feat_*...}`` with all features."""
    field_ = f"candidates.{name}"
    if not isinstance(raw, list):
        raise RequestError(field_, f"must be an array of element ids, got {json_type(raw)}")
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
                given[key] = feature_value(value, f"{where}.{key}")
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
        raise RequestError("candidates", f"must be an object, got {json_type(raw)}")
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
        raise RequestError("constraints", f"must be an array, got {json_type(raw)}")
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
            raise RequestError(where, f"must be an object, got {json_type(pair)}")
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
    return {c: feature_value(given[c], c) for c in cols} if cols else None


def parse_request(body: object, predictor: Predictor, bounded: bool = False) -> RecommendRequest:
    """Validate one request against the model; every mistake is a ``RequestError``.

    The body may be a parsed JSON object, or the raw bytes/text TorchServe forwards when the
    client's JSON was malformed or sent without a JSON content type. bounded: a dict body
    came out of ``decode_body`` already (whole, or as an item of a decoded envelope), so its
    size, depth and numbers are not checked twice.
    """
    data = body if bounded and isinstance(body, dict) else decode_body(body)
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
        raise RequestError("explain", f"must be true or false, got {json_type(explain)}")
    temperature = data.get("temperature", 1.0)
    if not is_number(temperature) or not temperature > 0:
        raise RequestError("temperature", f"must be a number > 0, got {temperature!r}")
    if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise RequestError(
            "temperature",
            f"must be in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {temperature!r}",
        )
    explore = data.get("explore")
    if explore is not None and (not is_number(explore) or not 0.0 <= explore <= 1.0):
        raise RequestError("explore", f"must be a number in [0, 1], got {explore!r}")
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
        explore=None if explore is None else float(explore),
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
        served = p.serve(
            ad,
            req.context,
            top_k=req.top_k,
            mode=req.mode,
            explain=req.explain,
            temperature=req.temperature,
            seed=req.seed,
            refine=req.refine,
            explore=req.explore,
        )
    except ValueError as exc:
        if not scoped:  # the bundle's own catalog always has a legal completion: a bug
            raise
        # e.g. the request's pairs leave some component without any legal element
        raise RequestError("constraints" if req.constraints else "candidates", str(exc)) from None
    out: dict[str, Any] = {"model_version": predictor.version, "mode": req.mode}
    if req.ad_id is not None:
        out["ad_id"] = req.ad_id
    # What the ad server shows and logs (README "Served log"): beam is deterministic.
    out["impression_id"] = served.impression_id
    out["shown"] = {
        "elements": served.elements,
        "propensity": served.propensity,
        "deterministic": served.deterministic,
        "explore": served.explore,
    }
    out["recommendations"] = [r.to_dict() for r in served.recommendations]
    return out


def log_line(text: str) -> str:
    """One log line of bounded length, whatever the client sent (newlines escaped)."""
    line = text.encode("unicode_escape").decode("ascii")
    return line if len(line) <= _LOG_CHARS else line[: _LOG_CHARS - 3] + "..."


def answer(
    predictor: Predictor, body: object, explain: bool = False, bounded: bool = False
) -> Result:
    """The response body for one request, or its error; never raises.

    A client mistake is a ``RequestError`` (its 4xx, one log line); anything else, including
    a response that would carry a non-finite number, an ``InternalError`` (500, traceback
    logged) for this request alone. explain: force attributions (``/explanations``).
    bounded: as ``parse_request``'s.
    """
    try:
        req = parse_request(body, predictor, bounded)
        if explain:
            req = replace(req, explain=True)
        out = predict(predictor, req)
        check_response(out)
        return out
    except RequestError as exc:
        logger.info("genco request refused: %d %s", exc.status, log_line(str(exc)))
        return exc
    except Exception as exc:  # a bug must cost one request, never its batch-mates
        logger.exception("genco request failed: 500 %s", log_line(repr(exc)))
        return InternalError(exc)


def handle_batch(
    predictor: Predictor,
    requests_: Sequence[object],
    explain: Sequence[bool] | None = None,
) -> list[Result]:
    """One response body or error per request, in order.

    A bad request never fails its batch-mates: TorchServe batches unrelated clients together.
    explain[i]: force attributions for request i (TorchServe's ``/explanations`` endpoint).
    """
    return [
        answer(predictor, body, explain is not None and explain[i])
        for i, body in enumerate(requests_)
    ]


def respond(results: Sequence[Result]) -> list[tuple[int, dict[str, Any]]]:
    """(HTTP status, JSON body) per result."""
    return [(200, r) if isinstance(r, dict) else (r.status, r.to_dict()) for r in results]


def encoded(results: Sequence[Result]) -> list[tuple[int, bytes]]:
    """(HTTP status, JSON bytes) per result; a body that cannot be encoded as strict JSON
    becomes that request's 500."""
    out = []
    for status, body in respond(results):
        try:
            out.append((status, encode_json(body)))
        except (TypeError, ValueError) as exc:
            logger.exception("genco response not encodable: 500 %s", log_line(repr(exc)))
            err = InternalError(exc)
            out.append((err.status, encode_json(err.to_dict())))
    return out


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
