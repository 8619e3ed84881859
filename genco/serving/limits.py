"""Bounded request bodies in, strict JSON out: what a client's bytes may be before anything
recursive touches them, and what a response may be before it is sent.

``request_body`` takes the client's payload out of a TorchServe batch row (JSON only: a
415 names the content type); ``decode_body`` bounds it: the size, the nesting depth (scanned
without recursion before ``json.loads``) and every number (finite, integers below 2^63, kept
as text by the ``json.loads`` hooks so the error can quote it); ``feature_value`` bounds an
inline feature or context value (``MAX_FEATURE_ABS``). On the way out, ``check_response``
and ``encode_json`` (``allow_nan=False``) make sure no non-finite number is ever sent.

``genco.serving.requests`` validates the decoded body against the model.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from genco.errors import RequestError

# Requests are a few hundred bytes; 64 KiB leaves room for inline candidate sets while a
# runaway client gets a 413 that names the limit (TorchServe's own, larger limit is
# genco.serving.config.MAX_REQUEST_BYTES, so that our message, not Netty's bare 413, is what
# clients see).
MAX_BODY_BYTES = 64 * 1024
# A valid request nests 4 deep ({"candidates": {"title": [{"id": ...}]}}); 32 leaves room
# while keeping json.loads and every walk over the body far from Python's recursion limit.
MAX_DEPTH = 32
# Inline features and context values are standardized in the catalogs we train on (|x| < 10);
# far beyond that the float32 reward model overflows (inf - inf = NaN scores). 1e6 is absurd
# for a feature yet still decodes to finite scores.
MAX_FEATURE_ABS = 1e6
MAX_INT = 2**63  # integers beyond int64 are refused wherever they appear
JSON_CONTENT_TYPE = "application/json"


def json_type(value: object) -> str:
    """The JSON name of a value's type, for error messages."""
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array"}
    return "null" if value is None else names.get(type(value), "object")


def is_number(value: object) -> bool:
    """A finite JSON number (booleans are not numbers)."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


class _BadNumber:
    """A number literal json.loads must not turn into a float: kept as its text so the
    error can name the field and quote the value."""

    def __init__(self, literal: str) -> None:
        self.literal = literal if len(literal) <= 40 else literal[:37] + "..."


def _parse_int(literal: str) -> int | _BadNumber:
    # 20 characters hold any int64; longer literals never reach int() (whose 4,300-digit
    # limit raises a ValueError of its own) nor float() (OverflowError).
    if len(literal) > 20 or not -MAX_INT < (value := int(literal)) < MAX_INT:
        return _BadNumber(literal)
    return value


def _parse_float(literal: str) -> float | _BadNumber:
    value = float(literal)
    return value if math.isfinite(value) else _BadNumber(literal)


# Outside strings, only brackets matter for depth; a string is skipped whole (escapes
# included) by one anchored, backtracking-free match.
_STRUCTURE = re.compile(r'["\[\]{}]')
_STRING_REST = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def _check_depth(text: str) -> None:
    """Refuse JSON text nested deeper than ``MAX_DEPTH``, in one pass and no recursion."""
    depth = pos = 0
    while (m := _STRUCTURE.search(text, pos)) is not None:
        char = m.group()
        if char == '"':
            end = _STRING_REST.match(text, m.end())
            if end is None:  # unterminated string: json.loads names the position
                return
            pos = end.end()
            continue
        if char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise RequestError(
                    "body", f"nested deeper than {MAX_DEPTH} levels (at character {m.start()})"
                )
        else:
            depth -= 1
        pos = m.end()


def _check_tree(body: object) -> None:
    """Depth and numbers of a parsed body, walked without recursion: nesting within
    ``MAX_DEPTH``, every number finite and every integer within int64."""
    stack: list[tuple[object, str, int]] = [(body, "body", 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise RequestError(path, f"nested deeper than {MAX_DEPTH} levels")
            if isinstance(value, dict):
                top = path == "body"
                items = [(v, str(k) if top else f"{path}.{k}") for k, v in value.items()]
            else:
                items = [(v, f"{path}[{i}]") for i, v in enumerate(value)]
            stack.extend((v, p, depth + 1) for v, p in reversed(items))
        elif isinstance(value, _BadNumber):
            raise RequestError(path, f"{value.literal} is out of range {_NUMBER_RANGE}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise RequestError(path, f"{value} is out of range {_NUMBER_RANGE}")
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= MAX_INT:
            bits = value.bit_length()
            shown = str(value) if bits < 128 else f"an integer of {bits} bits"
            raise RequestError(path, f"{shown} is out of range {_NUMBER_RANGE}")


_NUMBER_RANGE = "(numbers must be finite, integers within +-2^63)"


def check_content_type(content_type: str | None) -> None:
    """Refuse (415) any Content-Type but JSON; none given passes."""
    if content_type is None:  # not given (an in-process call, or a client that sent none)
        return
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime != JSON_CONTENT_TYPE:
        shown = content_type[:60]
        raise RequestError(
            "body",
            f"content type '{shown}' is not supported; send JSON with "
            f"Content-Type: {JSON_CONTENT_TYPE}",
            415,
        )


def decode_body(body: object) -> dict[str, Any]:
    """The request as a dict, bounded: TorchServe hands over raw bytes (the worker is told
    not to decode them: ``TS_DECODE_INPUT_REQUEST=false``), an envelope parsed JSON."""
    if body is None:
        raise RequestError("body", "empty; send a JSON object")
    if isinstance(body, (bytes, bytearray, str)):
        raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else bytes(body)
        if len(raw) > MAX_BODY_BYTES:
            raise RequestError(
                "body", f"{len(raw)} bytes is over the limit of {MAX_BODY_BYTES}", 413
            )
        if not raw.strip():
            raise RequestError("body", "empty; send a JSON object")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError("body", f"not valid JSON ({exc})") from None
        _check_depth(text)
        try:
            body = json.loads(
                text,
                parse_int=_parse_int,
                parse_float=_parse_float,
                parse_constant=_BadNumber,  # NaN, Infinity, -Infinity
            )
        except json.JSONDecodeError as exc:
            raise RequestError("body", f"not valid JSON ({exc})") from None
        _check_tree(body)
    else:
        _check_tree(body)  # before json.dumps, which recurses
        if isinstance(body, dict):
            size = len(json.dumps(body, separators=(",", ":")))
            if size > MAX_BODY_BYTES:
                raise RequestError(
                    "body", f"{size} bytes is over the limit of {MAX_BODY_BYTES}", 413
                )
    if not isinstance(body, dict):
        raise RequestError("body", f"must be a JSON object, got {json_type(body)}")
    return body


def feature_value(value: object, name: str) -> float:
    """A feature or context value: a finite number within ``MAX_FEATURE_ABS``."""
    if not is_number(value):
        raise RequestError(name, f"must be a finite number, got {json_type(value)}")
    number = float(value)  # type: ignore[arg-type]
    if abs(number) > MAX_FEATURE_ABS:
        raise RequestError(name, f"{number:g} is out of range (|value| <= {MAX_FEATURE_ABS:g})")
    return number


def check_response(body: object) -> None:
    """Every number of a response is finite: ``NaN`` is not JSON, and a NaN score is a bug."""
    stack = [body]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"non-finite number {value} in the response")


def _form_row(row: object) -> bool:
    """TorchServe's row for a form or multipart post: one bytes value per field."""
    return (
        isinstance(row, dict)
        and bool(row)
        and all(isinstance(v, (bytes, bytearray)) for v in row.values())
    )


def request_body(row: object, content_type: str | None = None) -> object:
    """The client's JSON payload from a TorchServe batch row (a 415 ``RequestError`` for
    anything but JSON).

    TorchServe wraps an HTTP request's body as ``{"body": ...}`` (plus any query parameters)
    and a form post as one entry per field; a gRPC ``Predictions`` call arrives as its
    ``input`` map, whose JSON is under ``body`` or, by TorchServe's convention, ``data``.
    content_type: the request's Content-Type header, if any (gRPC sends none).
    """
    check_content_type(content_type)
    if isinstance(row, dict) and "body" in row:
        return row["body"]
    if isinstance(row, dict) and content_type is None and set(row) == {"data"}:
        return row["data"]  # gRPC: input={"data": json_bytes}
    if _form_row(row):
        fields = ", ".join(sorted(str(k)[:40] for k in row)[:5])
        raise RequestError(
            "body", f"form fields ({fields}) are not supported; send a JSON body", 415
        )
    return row


def encode_json(body: dict[str, Any]) -> bytes:
    """Compact JSON bytes; a non-finite number raises ValueError (``NaN`` is not JSON).
    Handed a dict, TorchServe pretty-prints it with ``indent=2``, which forces Python's
    pure-Python encoder: ~0.5 ms per response, a third of a request."""
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode("utf-8")
