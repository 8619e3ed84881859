"""KServe v1 and v2 (open inference) requests, REST and gRPC rows, answered by the archived
handler in process: every item on its own, envelopes refused with a 4xx naming the field, and
the handler's metrics written through TorchServe's metrics cache. The same envelopes go to a
real TorchServe in ``test_torchserve.py``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import ts
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from genco.serving import kserve
from genco.serving.metrics import DECODE_MS, REQUESTS, TABLE_CACHE
from tests.test_handler import AD0, VERSION, _run

pytest_plugins = ["tests.test_handler"]


def _v2(data: list[Any], **extra: Any) -> dict[str, Any]:
    tensor = {"name": "request", "datatype": "BYTES", "shape": [len(data)], "data": data}
    return {**extra, "inputs": [tensor]}


def _outputs(body: dict[str, Any]) -> tuple[list[int], list[dict[str, Any]]]:
    status, response = body["outputs"]
    assert (status["name"], status["datatype"]) == ("status", "INT32")
    assert (response["name"], response["datatype"]) == ("response", "BYTES")
    assert status["shape"] == response["shape"] == [len(status["data"])]
    return status["data"], [json.loads(text) for text in response["data"]]


def test_v1_items_are_answered_each_on_its_own(handler: Any, model_dir: Path) -> None:
    instances = [{"ad_id": AD0, "top_k": 2}, {"ad_id": "ad_9999"}, {"ad_id": AD0, "top_k": 0}]
    rows = [{"body": {"instances": instances}}, {"body": {"ad_id": AD0, "top_k": 1}}]
    statuses, bodies, _ = _run(handler, model_dir, rows)
    assert statuses == [200, 200]  # one unknown ad fails neither its envelope nor the batch
    good, unknown, bad = bodies[0]["predictions"]
    assert len(good["recommendations"]) == 2 and good["model_version"] == VERSION
    assert unknown["error"] == {
        "status": 404,
        "field": "ad_id",
        "message": "ad_id: 'ad_9999' is not in the model's catalog",
    }
    assert (bad["error"]["status"], bad["error"]["field"]) == (400, "top_k")
    assert len(bodies[1]["recommendations"]) == 1  # the REST batch-mate


def test_v1_explain_answers_explanations(handler: Any, model_dir: Path) -> None:
    rows = [{"body": {"instances": [{"ad_id": AD0, "top_k": 2}]}}]
    _, [body], _ = _run(handler, model_dir, rows, [{"explain": "True"}])
    [answer] = body["explanations"]
    assert all(set(r["attribution"]) == set(r["elements"]) for r in answer["recommendations"])


def test_v2_items_are_answered_each_on_its_own(handler: Any, model_dir: Path) -> None:
    data = [json.dumps({"ad_id": AD0, "top_k": 3}), {"ad_id": "nope"}, "{", 7]
    statuses, [body], _ = _run(handler, model_dir, [{"body": _v2(data, id="req-1")}])
    assert statuses == [200]
    assert (body["id"], body["model_name"], body["model_version"]) == ("req-1", "genco", VERSION)
    codes, answers = _outputs(body)
    assert codes == [200, 404, 400, 400]
    assert len(answers[0]["recommendations"]) == 3
    assert answers[1]["error"]["field"] == "ad_id"
    assert answers[2]["error"]["message"].startswith("inputs[0].data[2]: not valid JSON")
    assert answers[3]["error"]["message"] == (
        "inputs[0].data[3]: must be a JSON request (text or object), got number"
    )


def test_grpc_rows_and_explain(handler: Any, model_dir: Path) -> None:
    """A gRPC Predictions call arrives as its input map, with no Content-Type."""
    rows = [
        {"data": json.dumps({"ad_id": AD0, "top_k": 2}).encode()},
        {"body": _v2([{"ad_id": AD0}])},
    ]
    statuses, bodies, _ = _run(handler, model_dir, rows, [{}, {"explain": "True"}])
    assert statuses == [200, 200]
    assert len(bodies[0]["recommendations"]) == 2
    _, [explained] = _outputs(bodies[1])
    assert all("attribution" in r for r in explained["recommendations"])


BAD_ENVELOPES: list[tuple[object, int, str]] = [
    ({"instances": {"ad_id": AD0}}, 400, "instances: must be an array of requests, got object"),
    ({"instances": []}, 400, "instances: must not be empty"),
    ({"instances": [{"ad_id": AD0}] * 65}, 413, "instances: 65 instances, at most 64"),
    ({"instances": [], "top_k": 3}, 400, "top_k: unknown field (allowed: instances)"),
    (
        {"inputs": [], "id": "x"},
        400,
        "inputs: must be an array of one tensor named 'request', got 0",
    ),
    ({**_v2([{"ad_id": AD0}]), "id": 3}, 400, "id: must be a string, got number"),
    (
        {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["{}"]}]},
        400,
        "inputs[0].name: must be 'request', got 'x'",
    ),
    (
        {"inputs": [{"name": "request", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
        400,
        "inputs[0].datatype: must be 'BYTES', got 'FP32'",
    ),
    (
        {"inputs": [{"name": "request", "datatype": "BYTES", "shape": [2], "data": ["{}"]}]},
        400,
        "inputs[0].shape: must be [1] (the length of data), got [2]",
    ),
    (
        {"inputs": [{"name": "request", "datatype": "BYTES", "shape": [1], "data": [], "x": 1}]},
        400,
        "inputs[0].x: unknown field (allowed: name, datatype, shape, data, parameters)",
    ),
    (
        {"inputs": [{"name": "request", "datatype": "BYTES", "shape": [0], "data": []}]},
        400,
        "inputs[0].data: must be a non-empty array of JSON requests",
    ),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_ENVELOPES)
def test_malformed_envelopes_get_a_4xx_naming_the_field(
    handler: Any, model_dir: Path, body: object, status: int, message: str
) -> None:
    statuses, bodies, _ = _run(handler, model_dir, [{"body": body}, {"body": {"ad_id": AD0}}])
    assert statuses == [status, 200]  # the envelope's own 4xx; its batch-mate is answered
    field = message.split(": ", 1)[0]
    assert bodies[0]["error"] == {"status": status, "field": field, "message": message}
    assert bodies[1]["recommendations"]


def test_protocol_is_told_by_the_body() -> None:
    assert kserve.protocol_of({"instances": []}) == "v1"
    assert kserve.protocol_of({"inputs": []}) == "v2"
    assert kserve.protocol_of({"ad_id": AD0}) == "rest"


def test_metrics_go_through_torchserve_metrics_cache(
    handler: Any, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Requests add to counts in memory; a flush writes one line per changed series."""
    from genco.serving.metrics import BUCKETS_MS, HandlerMetrics

    config = Path(ts.__file__).parent / "configs" / "metrics.yaml"
    cache = MetricsCacheYamlImpl(str(config))
    cache.initialize_cache()
    handler.metrics = metrics = HandlerMetrics(cache, "genco", interval_s=3600)
    rows = [
        {"body": {"instances": [{"ad_id": AD0}, {"ad_id": "nope", "mode": "sample"}]}},
        {"body": {"ad_id": AD0, "mode": "sample", "seed": 1}},
        {"body": b"{"},
    ]
    try:
        with caplog.at_level(logging.INFO, logger="ts.metrics.caching_metric"):
            _run(handler, model_dir, rows)
            _run(handler, model_dir, rows[:1])
            assert not caplog.records  # nothing written per request
            written = metrics.flush()
            assert metrics.flush() == 0  # nothing changed since
    finally:
        handler.metrics = None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == written and all(line.startswith("[METRICS]") for line in lines)

    def series(name: str) -> dict[str, str]:
        out = {}
        for line in lines:
            metric, dims = line.split("|")[:2]
            if metric.startswith(f"[METRICS]{name}."):
                out[dims.removeprefix("#ModelName:genco,")] = metric.split(":", 1)[1]
        return out

    assert series(REQUESTS) == {
        "protocol:rest,mode:invalid,status:400": "1",
        "protocol:rest,mode:sample,status:200": "1",
        "protocol:v1,mode:beam,status:200": "2",
        "protocol:v1,mode:sample,status:404": "2",
    }
    assert series(f"{DECODE_MS}_count") == {"mode:beam": "2", "mode:sample": "1"}
    buckets = series(f"{DECODE_MS}_bucket")
    assert buckets["mode:beam,le:+Inf"] == "2" and buckets["mode:sample,le:+Inf"] == "1"
    beam = [int(buckets.get(f"mode:beam,le:{le:g}", "0")) for le in BUCKETS_MS]
    assert beam == sorted(beam)  # cumulative
    assert float(series(f"{DECODE_MS}_sum")["mode:beam"]) > 0
    assert set(series(TABLE_CACHE)) == {"result:hit"}  # the ad's tables are warm
