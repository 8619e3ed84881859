"""The protocols one TorchServe batch row may speak, answered by the REST handler's code.

TorchServe routes ``POST /predictions/genco``, KServe v1 (``/v1/models/genco:predict``,
``:explain``) and KServe v2, the open inference protocol (``/v2/models/genco/infer``,
``/explain``), to the same worker, and tells the worker nothing about the path: so the body
says which protocol it speaks.

* ``{"instances": [request, ...]}``: KServe v1; answered ``{"predictions": [...]}``
  (``"explanations"`` on ``:explain``), one REST response or REST error body per instance.
* ``{"id"?, "parameters"?, "inputs": [{"name": "request", "datatype": "BYTES", "shape": [n],
  "data": [request, ...]}]}``: the open inference protocol; each element of ``data`` is a REST
  request as JSON text (or a JSON object). Answered with two outputs of shape ``[n]``:
  ``status`` (INT32, the HTTP status each request would get over REST) and ``response``
  (BYTES, each REST response or error body as JSON text).
* anything else: a REST request (``genco.serving.requests``).

Unlike TorchServe's own envelopes (``service_envelope``), which answer only the first row of
a batch and turn one item's error into the whole request's status, every row and every item
here is answered on its own: one unknown ad is that item's 404 inside a 200, never its
batch-mates' failure. A malformed envelope (``instances`` not an array, a second input, a
shape that does not match its data) is the whole request's 4xx, with REST's error body.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from genco.errors import RequestError
from genco.inference.predictor import MODES, Predictor
from genco.serving.limits import decode_body, encode_json, json_type, request_body
from genco.serving.requests import InternalError, Result, answer, encoded, log_line

MAX_INSTANCES = 64  # per envelope; a TorchServe batch holds several envelopes
V2_INPUT = "request"
V2_STATUS, V2_RESPONSE = "status", "response"
_V1_FIELDS = ("instances",)
_V2_FIELDS = ("id", "parameters", "inputs", "outputs")
_V2_TENSOR_FIELDS = ("name", "datatype", "shape", "data", "parameters")
PROTOCOLS = ("rest", "v1", "v2")
logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What one request (a REST body, or one item of an envelope) came to, for metrics."""

    protocol: str
    mode: str  # the request's mode, "invalid" when it named none of MODES
    status: int
    decode_ms: float | None = None  # set for answered requests


@dataclass
class Reply:
    """One batch row's HTTP answer and what each request in it came to."""

    status: int
    body: bytes
    outcomes: list[Outcome] = field(default_factory=list)


def protocol_of(body: dict[str, Any]) -> str:
    """The protocol a decoded body speaks: its envelope's key, else REST."""
    if "instances" in body:
        return "v1"
    if "inputs" in body:
        return "v2"
    return "rest"


def _mode(item: object) -> str:
    mode = item.get("mode", "beam") if isinstance(item, dict) else None
    return mode if isinstance(mode, str) and mode in MODES else "invalid"


def _timed(
    predictor: Predictor, item: object, explain: bool, protocol: str
) -> tuple[Result, Outcome]:
    start = time.perf_counter()
    result = answer(predictor, item, explain, bounded=True)  # items of a decoded body
    ms = (time.perf_counter() - start) * 1e3
    if isinstance(result, dict):
        return result, Outcome(protocol, _mode(item), 200, ms)
    return result, Outcome(protocol, _mode(item), result.status)


def _error_reply(exc: RequestError | InternalError, protocol: str, mode: str) -> Reply:
    return Reply(exc.status, encode_json(exc.to_dict()), [Outcome(protocol, mode, exc.status)])


def _check_fields(body: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in body:
        if key not in allowed:
            raise RequestError(f"{where}{key}", f"unknown field (allowed: {', '.join(allowed)})")


def _v1_items(body: dict[str, Any]) -> list[object]:
    _check_fields(body, _V1_FIELDS, "")
    items = body["instances"]
    if not isinstance(items, list):
        raise RequestError("instances", f"must be an array of requests, got {json_type(items)}")
    if not items:
        raise RequestError("instances", "must not be empty")
    if len(items) > MAX_INSTANCES:
        raise RequestError("instances", f"{len(items)} instances, at most {MAX_INSTANCES}", 413)
    return items


def _v2_items(body: dict[str, Any]) -> list[object]:
    """The requests of an open-inference body: one BYTES input named ``request``."""
    _check_fields(body, _V2_FIELDS, "")
    if "id" in body and not isinstance(body["id"], str):
        raise RequestError("id", f"must be a string, got {json_type(body['id'])}")
    inputs = body["inputs"]
    if not isinstance(inputs, list) or len(inputs) != 1:
        shown = len(inputs) if isinstance(inputs, list) else json_type(inputs)
        raise RequestError(
            "inputs", f"must be an array of one tensor named '{V2_INPUT}', got {shown}"
        )
    tensor = inputs[0]
    if not isinstance(tensor, dict):
        raise RequestError("inputs[0]", f"must be an object, got {json_type(tensor)}")
    _check_fields(tensor, _V2_TENSOR_FIELDS, "inputs[0].")
    if tensor.get("name") != V2_INPUT:
        raise RequestError("inputs[0].name", f"must be '{V2_INPUT}', got {tensor.get('name')!r}")
    if tensor.get("datatype") != "BYTES":
        raise RequestError("inputs[0].datatype", f"must be 'BYTES', got {tensor.get('datatype')!r}")
    data = tensor.get("data")
    if not isinstance(data, list) or not data:
        raise RequestError("inputs[0].data", "must be a non-empty array of JSON requests")
    if len(data) > MAX_INSTANCES:
        raise RequestError("inputs[0].data", f"{len(data)} requests, at most {MAX_INSTANCES}", 413)
    if tensor.get("shape") != [len(data)]:
        raise RequestError(
            "inputs[0].shape",
            f"must be [{len(data)}] (the length of data), got {tensor.get('shape')!r}",
        )
    return data


def _v2_item(raw: object, i: int) -> object:
    """One element of the ``request`` tensor: JSON text (BYTES) or a JSON object."""
    if isinstance(raw, str):
        try:
            return decode_body(raw)
        except RequestError as exc:
            message = str(exc)[len(exc.field) + 2 :]
            raise RequestError(f"inputs[0].data[{i}]", message, exc.status) from None
    if not isinstance(raw, dict):
        raise RequestError(
            f"inputs[0].data[{i}]", f"must be a JSON request (text or object), got {json_type(raw)}"
        )
    return raw


def answer_row(
    predictor: Predictor,
    row: object,
    content_type: str | None,
    explain: bool,
    model_name: str = "genco",
) -> Reply:
    """The HTTP answer to one TorchServe batch row, whatever protocol it speaks; never raises
    (a bug costs this row a 500, logged with its traceback)."""
    try:
        body = decode_body(request_body(row, content_type))
    except RequestError as exc:
        logger.info("genco request refused: %d %s", exc.status, log_line(str(exc)))
        return _error_reply(exc, "rest", "invalid")
    protocol = protocol_of(body)
    try:
        if protocol == "rest":
            result, outcome = _timed(predictor, body, explain, protocol)
            [(status, data)] = encoded([result])
            return Reply(status, data, [outcome])
        if protocol == "v1":
            return _v1(predictor, _v1_items(body), explain)
        return _v2(predictor, body, _v2_items(body), explain, model_name)
    except RequestError as exc:
        logger.info("genco request refused: %d %s %s", exc.status, protocol, log_line(str(exc)))
        return _error_reply(exc, protocol, "invalid")
    except Exception as exc:  # a bug costs this row, never its batch-mates
        logger.exception("genco %s envelope failed: 500", protocol)
        return _error_reply(InternalError(exc), protocol, "invalid")


def _v1(predictor: Predictor, items: list[object], explain: bool) -> Reply:
    results, outcomes = [], []
    for item in items:
        result, outcome = _timed(predictor, item, explain, "v1")
        results.append(result if isinstance(result, dict) else result.to_dict())
        outcomes.append(outcome)
    key = "explanations" if explain else "predictions"
    return Reply(200, encode_json({key: results}), outcomes)


def _v2(
    predictor: Predictor, body: dict[str, Any], data: list[object], explain: bool, model: str
) -> Reply:
    statuses: list[int] = []
    texts: list[str] = []
    outcomes: list[Outcome] = []
    for i, raw in enumerate(data):
        try:
            item = _v2_item(raw, i)
        except RequestError as exc:
            result: Result = exc
            outcome = Outcome("v2", "invalid", exc.status)
        else:
            result, outcome = _timed(predictor, item, explain, "v2")
        [(status, text)] = encoded([result])
        statuses.append(status)
        texts.append(text.decode("utf-8"))
        outcomes.append(outcome)
    out: dict[str, Any] = {"model_name": model, "model_version": predictor.version}
    if "id" in body:
        out["id"] = body["id"]
    n = [len(data)]
    out["outputs"] = [
        {"name": V2_STATUS, "datatype": "INT32", "shape": n, "data": statuses},
        {"name": V2_RESPONSE, "datatype": "BYTES", "shape": n, "data": texts},
    ]
    return Reply(200, encode_json(out), outcomes)


def answer_rows(
    predictor: Predictor,
    rows: Sequence[object],
    content_types: Sequence[str | None],
    explain: Sequence[bool],
    model_name: str = "genco",
) -> list[Reply]:
    """One reply per TorchServe batch row, in order."""
    return [
        answer_row(predictor, row, content_types[i], explain[i], model_name)
        for i, row in enumerate(rows)
    ]
