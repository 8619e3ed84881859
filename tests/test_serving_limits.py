"""Bounded request parsing in ``genco.serving``, in process: every hostile body gets its own
4xx naming the field and value, a bug costs one request a 500, and no response carries a
non-finite number. The same bodies go to a real TorchServe in ``test_fuzz_serving.py``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from genco.inference.predictor import Predictor
from genco.serving import kserve, limits
from genco.serving import requests as serving
from tests.test_handler import AD0, _context

# bundle_dir, predictor, handler, model_dir: the archived handler's fixtures
pytest_plugins = ["tests.test_handler"]

RANGE = "(numbers must be finite, integers within +-2^63)"
FEATURES = "(|value| <= 1e+06)"


def _cands(title: list[Any]) -> dict[str, Any]:
    return {"candidates": {"title": title, "image": ["ima_004"], "highlight": ["hig_001"]}}


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


# (body, content type, status, exact message); the field is the message's prefix.
BAD: list[tuple[object, str | None, int, str]] = [
    (b"[" * 1000, None, 400, "body: nested deeper than 32 levels (at character 32)"),
    (
        b'{"ad_id": "ad_0000", "constraints": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        None,
        400,
        "body: nested deeper than 32 levels (at character 67)",
    ),
    (  # brackets inside strings are not nesting; escaped quotes do not end a string
        b'{"ad_id": "ad_0000", "mode": "[[\\"' + b"[" * 100 + b'"}',
        None,
        400,
        "mode: must be one of beam, sample, thompson, got " + repr('[["' + "[" * 100),
    ),
    (
        {"ad_id": AD0, "constraints": _nested(40)},
        None,
        400,
        "constraints" + "[0]" * 31 + ": nested deeper than 32 levels",
    ),
    (
        b'{"ad_id": "ad_0000", "top_k": 1' + b"0" * 5000 + b"}",
        None,
        400,
        f"top_k: 1000000000000000000000000000000000000... is out of range {RANGE}",
    ),
    (
        b'{"ad_id": "ad_0000", "seed": 9223372036854775808}',
        None,
        400,
        f"seed: 9223372036854775808 is out of range {RANGE}",
    ),
    (
        {"ad_id": AD0, "seed": 10**400},
        None,
        400,
        f"seed: an integer of 1329 bits is out of range {RANGE}",
    ),
    (
        b'{"ad_id": "ad_0000", "temperature": NaN}',
        None,
        400,
        f"temperature: NaN is out of range {RANGE}",
    ),
    (b'{"ad_id": "ad_0000", "x": -Infinity}', None, 400, f"x: -Infinity is out of range {RANGE}"),
    (
        b'{"ad_id": "ad_0000", "temperature": 1e400}',
        None,
        400,
        f"temperature: 1e400 is out of range {RANGE}",
    ),
    (
        {"ad_id": AD0, "temperature": math.inf},
        None,
        400,
        f"temperature: inf is out of range {RANGE}",
    ),
    (
        json.dumps(_cands([{"id": "t", "feat_0": 1e300}])).encode(),
        None,
        400,
        f"candidates.title[0].feat_0: 1e+300 is out of range {FEATURES}",
    ),
    (
        _cands(["tit_000", {"id": "t", "feat_2": -2e6}]),
        None,
        400,
        f"candidates.title[1].feat_2: -2e+06 is out of range {FEATURES}",
    ),
    (
        {"ad_id": AD0, "mode": "sample", "temperature": 1e-300},
        None,
        400,
        "temperature: must be in [0.001, 1000], got 1e-300",
    ),
    (
        {"ad_id": [AD0]},
        None,
        400,
        "ad_id: must be a string, got array",
    ),
    (
        {"ad_id": AD0, "constraints": [{"component_a": {"x": 1}}]},
        None,
        400,
        "constraints[0].component_a: must be a string, got object",
    ),
    (
        b"\x00\x01\x02garbage",
        None,
        400,
        "body: not valid JSON (Expecting value: line 1 column 1 (char 0))",
    ),
    (
        b'{"ad_id": "ad_0000"}',
        "application/x-www-form-urlencoded",
        415,
        "body: content type 'application/x-www-form-urlencoded' is not supported; send JSON "
        "with Content-Type: application/json",
    ),
    (
        b'{"ad_id": "ad_0000"}',
        "text/plain; charset=utf-8",
        415,
        "body: content type 'text/plain; charset=utf-8' is not supported; send JSON with "
        "Content-Type: application/json",
    ),
]


@pytest.mark.parametrize(("body", "content_type", "status", "message"), BAD)
def test_hostile_bodies_get_their_own_4xx(
    predictor: Predictor, body: object, content_type: str | None, status: int, message: str
) -> None:
    [reply] = kserve.answer_rows(predictor, [{"body": body}], [content_type], [False])
    error = json.loads(reply.body)["error"]
    assert (reply.status, error["status"], error["message"]) == (status, status, message)
    assert message.startswith(f"{error['field']}: ")


def test_form_post_rows_are_refused_whatever_their_header(predictor: Predictor) -> None:
    rows = [{"ad_id": b"ad_0000", "top_k": b"3"}, {"body": {"ad_id": AD0}}]
    form, ok = kserve.answer_rows(predictor, rows, [None, "application/json"], [False, False])
    assert (form.status, json.loads(form.body)["error"]["message"]) == (
        415,
        "body: form fields (ad_id, top_k) are not supported; send a JSON body",
    )
    assert ok.status == 200 and json.loads(ok.body)["recommendations"]


def test_json_content_type_with_parameters_is_json(predictor: Predictor) -> None:
    [reply] = kserve.answer_rows(
        predictor, [{"body": b'{"ad_id": "ad_0000"}'}], ["Application/JSON; charset=utf-8"], [False]
    )
    assert reply.status == 200 and json.loads(reply.body)["ad_id"] == AD0


def test_features_up_to_the_bound_give_finite_scores(predictor: Predictor) -> None:
    """At +-MAX_FEATURE_ABS every mode still answers with finite scores and recommendations."""
    bound = limits.MAX_FEATURE_ABS
    for value in (bound, -bound):
        title = [{"id": "t", "feat_0": value, "feat_3": -value}, "tit_000"]
        for extra in ({"refine": "pairs", "explain": True}, {"mode": "sample", "seed": 1}):
            [out] = serving.handle_batch(predictor, [{**_cands(title), **extra, "top_k": 2}])
            assert isinstance(out, dict), out
            assert out["recommendations"]
            for r in out["recommendations"]:
                assert math.isfinite(r["score"])
                assert all(math.isfinite(v) for v in (r.get("attribution") or {}).values())


def test_a_bug_is_a_500_for_that_request_only(predictor: Predictor) -> None:
    # In process nothing stops a non-string key; parse_request assumes strings and fails.
    bug, ok = serving.handle_batch(predictor, [{1: "x"}, {"ad_id": AD0, "top_k": 1}])
    assert isinstance(bug, serving.InternalError)
    assert bug.to_dict()["error"]["status"] == 500
    assert str(bug).startswith("internal error (AttributeError)")
    assert isinstance(ok, dict) and len(ok["recommendations"]) == 1


def test_non_finite_scores_are_never_sent(bundle_dir: str) -> None:
    """A model whose weights went NaN: its answers are 500s, never ``"score": NaN``."""
    broken = Predictor.load(bundle_dir)
    with torch.no_grad():
        for p in broken.reward.parameters():
            p.fill_(math.nan)
    [out] = serving.handle_batch(broken, [{"ad_id": AD0}])
    assert isinstance(out, serving.InternalError)
    [(status, body)] = serving.encoded([{"score": math.nan}])
    assert status == 500 and json.loads(body)["error"]["status"] == 500
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        limits.encode_json({"score": math.inf})


def test_handler_batch_of_hostile_and_valid_requests(handler: Any, model_dir: Path) -> None:
    """The archived handler, a real TorchServe Context: each request gets its own status."""
    rows = [
        {"body": b"[" * 2000},
        {"body": json.dumps({"ad_id": AD0, "top_k": 2}).encode()},
        {"body": b'{"ad_id": "ad_0000", "seed": 1' + b"0" * 400 + b"}"},
        {"ad_id": b"ad_0000"},  # a form post
        {"body": json.dumps(_cands([{"id": "t", "feat_0": 1e300}])).encode()},
        {"body": b'{"ad_id": "ad_0001", "top_k": 3}'},
    ]
    json_ct = {"Content-Type": "application/json"}
    headers = [json_ct, json_ct, json_ct, {"content-type": "application/x-www-form-urlencoded"}]
    headers += [json_ct, {}]
    ctx = _context(model_dir, headers)
    bodies = [json.loads(b) for b in handler.handle(rows, ctx)]
    statuses = [ctx.get_response_status(i)[0] for i in range(len(rows))]
    assert statuses == [400, 200, 400, 415, 400, 200]
    fields = [b["error"]["field"] if "error" in b else None for b in bodies]
    assert fields == ["body", None, "seed", "body", "candidates.title[0].feat_0", None]
    assert [len(bodies[i]["recommendations"]) for i in (1, 5)] == [2, 3]


def test_client_errors_log_one_short_line(
    predictor: Predictor, caplog: pytest.LogCaptureFixture
) -> None:
    bodies = [b"{", b"[" * 60_000, {"ad_id": "x\n" * 5000}, b'{"ad_id": "ad_0000", "top_k": NaN}']
    with caplog.at_level("INFO", logger="genco.serving"):
        results = serving.handle_batch(predictor, bodies)
    assert all(isinstance(r, serving.RequestError) for r in results)
    assert len(caplog.records) == len(bodies)
    for record in caplog.records:
        line = record.getMessage()
        assert "\n" not in line and len(line) < 400 and record.exc_info is None
