"""One real TorchServe (Java frontend + Python worker) over HTTP on 127.0.0.1.

Bounded in time: startup waits at most ``STARTUP_S``, every HTTP call has a timeout, and the
server's whole process group is stopped when the module ends, whatever failed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from genco.serving import archive, management, torchserve
from genco.serving.config import MAX_REQUEST_BYTES, mar_name
from tests.test_handler import tiny_bundle

pytestmark = pytest.mark.skipif(
    shutil.which("java") is None, reason="TorchServe needs Java 17 (.ci/run installs it)"
)

STARTUP_S = 240.0
HTTP_S = 60.0
AD0 = "ad_0000"


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store whose KServe model-store directory is the server's own, as in a pod."""
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def server(bundle_dir: str, store: Path) -> Iterator[torchserve.ServeHandle]:
    handle = torchserve.serve(
        bundle_dir,
        version="v1",
        workdir=str(store / archive.KSERVE_DIR),
        enable_model_api=True,
        startup_timeout_s=STARTUP_S,
    )
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


def _post(
    server: torchserve.ServeHandle,
    http: requests.Session,
    body: Any,
    path: str = "predictions/genco",
) -> requests.Response:
    kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
    return http.post(
        f"{server.inference_url}/{path}",
        headers={**server.headers(), "Content-Type": "application/json"},
        timeout=HTTP_S,
        **kwargs,
    )


def test_startup_made_a_real_prediction(server: torchserve.ServeHandle) -> None:
    assert server.sample_response is not None
    assert server.sample_response["model_version"] == "v1"
    assert server.key_file is not None and server.token("inference")


def test_token_is_required(server: torchserve.ServeHandle, http: requests.Session) -> None:
    resp = http.post(server.predictions_url(), json={"ad_id": AD0}, timeout=HTTP_S)
    assert resp.status_code in (400, 401)  # TorchServe 0.12 answers 400 InvalidKeyException
    assert "Token Authorization failed" in resp.text


def test_predict(server: torchserve.ServeHandle, http: requests.Session) -> None:
    resp = _post(server, http, {"ad_id": AD0, "top_k": 4})
    assert resp.status_code == 200
    body = resp.json()
    assert body["model_version"] == "v1"
    assert body["ad_id"] == AD0
    recs = body["recommendations"]
    assert [r["rank"] for r in recs] == [1, 2, 3, 4]
    assert all(0.0 < r["score"] < 1.0 and "attribution" not in r for r in recs)
    searched = _post(server, http, {"ad_id": AD0, "top_k": 4, "refine": "pairs"})
    assert searched.status_code == 200
    assert searched.json()["recommendations"][0]["score"] >= recs[0]["score"] - 1e-9


def test_explain_field_and_endpoint(server: torchserve.ServeHandle, http: requests.Session) -> None:
    asked = _post(server, http, {"ad_id": AD0, "top_k": 2, "explain": True}).json()
    endpoint = _post(server, http, {"ad_id": AD0, "top_k": 2}, path="explanations/genco").json()
    # Two impressions, two ids; everything else is the same answer.
    assert asked.pop("impression_id") != endpoint.pop("impression_id")
    assert asked == endpoint
    for r in asked["recommendations"]:
        assert set(r["attribution"]) == set(r["elements"])


def test_sample_with_propensities(server: torchserve.ServeHandle, http: requests.Session) -> None:
    req = {"ad_id": AD0, "mode": "sample", "top_k": 6, "seed": 11}
    first, again = (_post(server, http, req).json() for _ in range(2))
    assert first.pop("impression_id") != again.pop("impression_id")  # one id per impression
    assert first == again  # the same seed draws the same combinations
    assert all(0.0 < r["propensity"] <= 1.0 for r in first["recommendations"])


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b'{"ad_id": ', 400, "body"),
        (b"[]", 400, "body"),
        ({"ad_id": "ad_9999"}, 404, "ad_id"),
        (
            {"candidates": {"title": [], "image": ["b"], "highlight": ["c"]}},
            400,
            "candidates.title",
        ),
        ({"ad_id": 3}, 400, "ad_id"),
        ({"ad_id": AD0, "top_k": 0}, 400, "top_k"),
        ({"ad_id": AD0, "top_k": 1000}, 400, "top_k"),
        (b'{"ad_id": "' + b"x" * 70_000 + b'"}', 413, "body"),
    ],
)
def test_bad_requests_get_4xx_naming_the_field(
    server: torchserve.ServeHandle, http: requests.Session, body: Any, status: int, field: str
) -> None:
    resp = _post(server, http, body)
    assert resp.status_code == status
    error = resp.json()["error"]
    assert error["field"] == field
    assert error["message"].startswith(f"{field}: ")


def test_oversized_beyond_torchserve_limit_is_still_4xx(
    server: torchserve.ServeHandle, http: requests.Session
) -> None:
    resp = _post(server, http, b"x" * (MAX_REQUEST_BYTES + 10))
    assert resp.status_code == 413  # Netty's own answer above max_request_size


def test_concurrent_batch_keeps_each_answer(
    server: torchserve.ServeHandle, http: requests.Session
) -> None:
    bodies = [{"ad_id": AD0, "top_k": 1} if i % 2 else {"ad_id": f"bad{i}"} for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda b: _post(server, http, b).status_code, bodies))
    assert statuses == [200 if i % 2 else 404 for i in range(16)]
    assert _post(server, http, {"ad_id": AD0}).status_code == 200  # the worker survived


def _v2(requests_: list[Any]) -> dict[str, Any]:
    data = [json.dumps(r) for r in requests_]
    return {
        "id": "r1",
        "inputs": [{"name": "request", "datatype": "BYTES", "shape": [len(data)], "data": data}],
    }


def test_kserve_v1_per_item_errors(server: torchserve.ServeHandle, http: requests.Session) -> None:
    """KServe v1 on TorchServe's own route: one unknown ad is that item's error inside a 200."""
    instances = [{"ad_id": AD0, "top_k": 2}, {"ad_id": "ad_9999"}]
    resp = _post(server, http, {"instances": instances}, path="v1/models/genco:predict")
    assert resp.status_code == 200
    good, unknown = resp.json()["predictions"]
    assert len(good["recommendations"]) == 2
    assert (unknown["error"]["status"], unknown["error"]["field"]) == (404, "ad_id")
    explained = _post(server, http, {"instances": instances[:1]}, path="v1/models/genco:explain")
    [answer] = explained.json()["explanations"]
    assert all("attribution" in r for r in answer["recommendations"])
    bad = _post(server, http, {"instances": "ad_0000"}, path="v1/models/genco:predict")
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "instances"
    assert _post(server, http, {"ad_id": AD0}).status_code == 200  # REST alongside


def test_kserve_v2_open_inference(server: torchserve.ServeHandle, http: requests.Session) -> None:
    body = _v2([{"ad_id": AD0, "top_k": 3}, {"ad_id": "ad_9999"}, {"ad_id": AD0, "mode": "x"}])
    resp = _post(server, http, body, path="v2/models/genco/infer")
    assert resp.status_code == 200
    out = resp.json()
    assert (out["id"], out["model_name"], out["model_version"]) == ("r1", "genco", "v1")
    status, response = out["outputs"]
    assert status["data"] == [200, 404, 400]
    answers = [json.loads(text) for text in response["data"]]
    assert len(answers[0]["recommendations"]) == 3
    assert answers[2]["error"]["field"] == "mode"
    bad = _post(server, http, {"inputs": []}, path="v2/models/genco/infer")
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "inputs"


def test_grpc_inference_api(server: torchserve.ServeHandle) -> None:
    """TorchServe's gRPC Predictions, answered by the same handler (REST's JSON and envelopes)."""
    import grpc

    from genco.errors import RequestError
    from genco.serving.grpc_client import GrpcClient

    with GrpcClient(server.grpc_target, server.token("inference"), timeout_s=HTTP_S) as client:
        body = client.predict({"ad_id": AD0, "top_k": 2})
        assert body["model_version"] == "v1" and len(body["recommendations"]) == 2
        assert client.predict({"ad_id": AD0}, version="v1")["model_version"] == "v1"
        with pytest.raises(RequestError) as refused:
            client.predict({"ad_id": "ad_9999"})
        assert (refused.value.status, refused.value.field) == (404, "ad_id")
        envelope = json.dumps({"instances": [{"ad_id": AD0}, {"ad_id": "ad_9999"}]}).encode()
        good, bad = json.loads(client.predict_bytes(envelope))["predictions"]
        assert good["recommendations"] and bad["error"]["status"] == 404
    with GrpcClient(server.grpc_target, None, timeout_s=HTTP_S) as anonymous:
        with pytest.raises(grpc.RpcError) as denied:
            anonymous.predict({"ad_id": AD0})
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_prometheus_metrics_scraped(server: torchserve.ServeHandle, http: requests.Session) -> None:
    """TorchServe's metrics and the handler's own, scraped as Prometheus would."""
    from prometheus_client.parser import text_string_to_metric_families

    from genco.serving.metrics import FLUSH_S

    def scrape() -> dict[str, list[Any]]:
        resp = http.get(f"{server.metrics_url}/metrics", timeout=HTTP_S)
        assert resp.status_code == 200
        return {f.name: f.samples for f in text_string_to_metric_families(resp.text)}

    def count(samples: list[Any], **labels: str) -> float:
        return sum(
            s.value
            for s in samples
            if not s.name.endswith("_created") and labels.items() <= s.labels.items()
        )

    time.sleep(2.5 * FLUSH_S)  # earlier tests' counts reach the frontend (a flush a second)
    before = scrape().get("genco_requests", [])
    _post(server, http, {"ad_id": AD0, "mode": "sample", "seed": 1})
    _post(server, http, {"ad_id": "ad_9999", "mode": "sample"})
    _post(server, http, {"instances": [{"ad_id": AD0}]}, path="v1/models/genco:predict")
    deadline = time.monotonic() + 30  # the frontend reads the worker's metric lines async
    while True:
        metrics = scrape()
        requests_ = metrics.get("genco_requests", [])
        got = [
            count(requests_, protocol=p, mode=m, status=s)
            - count(before, protocol=p, mode=m, status=s)
            for p, m, s in (
                ("rest", "sample", "200"),
                ("rest", "sample", "404"),
                ("v1", "beam", "200"),
            )
        ]
        if got == [1, 1, 1] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert got == [1, 1, 1]
    assert count(metrics["genco_decode_latency_ms_count"], mode="sample") >= 1
    buckets = metrics["genco_decode_latency_ms_bucket"]
    assert count(buckets, mode="sample", le="+Inf") >= 1
    assert count(metrics["genco_table_cache"], result="hit") >= 2
    assert count(metrics["ts_inference_requests"], model_name="genco") >= 3


def test_promote_switch_and_rollback(
    server: torchserve.ServeHandle, http: requests.Session, bundle_dir: str, store: Path
) -> None:
    """The pipeline's path (on_promote), then a direct deploy, a rollback, a refused deploy.
    v2..v4 are the same bundle archived under new versions."""
    mgmt = server.management(http)
    assert mgmt.versions() == ["v1"]
    assert mgmt.default_version() == "v1"

    def answered_by(version: str | None = None) -> str:
        url = server.predictions_url(version)
        resp = http.post(url, json={"ad_id": AD0}, headers=server.headers(), timeout=HTTP_S)
        assert resp.status_code == 200, resp.text
        return str(resp.json()["model_version"])

    on_promote = archive.make_on_promote(
        str(store),
        server.management_url,
        server.token("management"),
        inference_url=server.inference_url,
        inference_token=server.token("inference"),
    )
    switch = on_promote(bundle_dir, "v2")
    assert mgmt.default_version() == "v2"
    assert answered_by() == "v2"
    assert answered_by("v1") == "v1"  # the previous one still answers by version
    config = store / archive.KSERVE_DIR / "config" / "config.properties"
    assert not config.exists()  # the layout switches only once the store's pointer moved
    switch()
    assert "genco-v2.mar" in config.read_text()

    archive.build_mar(bundle_dir, server.model_store, "v3")
    deployment = management.deploy_to_torchserve(mgmt, mar_name("v3"), "v3")
    assert deployment == management.Deployment("v3", "v2", retired=("v1",))
    assert sorted(mgmt.versions()) == ["v2", "v3"]
    assert answered_by() == "v3"
    described = http.get(
        f"{server.management_url}/models/genco/v3",
        headers=server.headers("management"),
        timeout=HTTP_S,
    ).json()[0]
    assert (described["batchSize"], described["maxBatchDelay"]) == (8, 1)  # model-config.yaml

    assert management.rollback_default(mgmt, deployment) == "v2"
    assert mgmt.default_version() == "v2"
    assert answered_by() == "v2"

    def failing(version: str) -> object:
        raise RuntimeError(f"{version} looks wrong")

    archive.build_mar(bundle_dir, server.model_store, "v4")
    with pytest.raises(RuntimeError, match="v4 looks wrong"):
        management.deploy_to_torchserve(mgmt, mar_name("v4"), "v4", check=failing)
    assert mgmt.default_version() == "v2"
    assert sorted(mgmt.versions()) == ["v2", "v3"]  # the refused one was unregistered

    with pytest.raises(management.ManagementError) as exc:
        mgmt.set_default("v9")
    assert 400 <= exc.value.status < 500

    # A store rollback to v1 (retired above) runs the same hook: its published archive is
    # reused, registered again and made the default, and the layout switched back.
    v1_mar = store / archive.KSERVE_DIR / "model-store" / mar_name("v1")
    built = v1_mar.stat().st_mtime_ns
    on_promote(bundle_dir, "v1")()  # the store runs the switch once its pointer moved
    assert v1_mar.stat().st_mtime_ns == built
    assert mgmt.default_version() == "v1"
    assert answered_by() == "v1"
    assert "genco-v1.mar" in config.read_text()


def test_cli_serve_once_without_auth(
    bundle_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``genco serve --once --no-auth``: a second server, on its own ports and temp dir; it
    reports the version id the model store gives the same bundle."""
    from genco.cli.serve import add_commands
    from genco.store import promote

    stored = promote(bundle_dir, str(tmp_path / "store")).version

    parser = argparse.ArgumentParser(prog="genco")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", "--model", bundle_dir, "--once", "--no-auth"])
    args.func(args)
    out = capsys.readouterr().out
    info, _, rest = out.partition("}\n")
    assert json.loads(info + "}")["key_file"] is None
    assert json.loads(info + "}")["model_version"] == stored
    assert "curl -s http://127.0.0.1:" in rest
    response = json.loads(rest[rest.index("\n{") + 1 :])
    assert len(response["recommendations"]) == 3
    assert response["model_version"] == stored
