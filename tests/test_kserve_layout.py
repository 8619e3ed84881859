"""The published KServe layout served the way its pod serves it: a real TorchServe on the
layout's own config.properties (model snapshot), TorchServe's token auth off and the genco
handler checking the token of a mounted Secret, and the manifest that mounts both."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from genco.errors import RequestError
from genco.serving import archive, auth, torchserve
from genco.serving.config import kserve_properties
from tests.test_handler import tiny_bundle
from tests.test_inference_auth import NEW, OLD, rotate_secret, secret_volume

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "serving" / "kserve.yaml"


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundle = tiny_bundle(tmp_path_factory)
    root = tmp_path_factory.mktemp("store") / archive.KSERVE_DIR
    archive.publish(bundle, str(root), "v1")
    archive.publish(bundle, str(root), "v2")  # the layout now points at v2
    return root


@pytest.fixture(scope="module")
def secret(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The token Secret as the kubelet mounts it (``serving/kserve.yaml``)."""
    return secret_volume(tmp_path_factory.mktemp("secrets") / "inference", OLD + "\n")


@pytest.fixture(scope="module")
def pod(layout: Path, secret: Path) -> Iterator[torchserve.ServeHandle]:
    handle = torchserve.serve_layout(str(layout), startup_timeout_s=240, token_file=str(secret))
    try:
        yield handle
    finally:
        handle.stop()


def test_the_layout_serves_its_default_version_with_the_secrets_token(
    pod: torchserve.ServeHandle,
):
    assert pod.version == "v2" and pod.key_file is None and pod.token() == OLD
    assert pod.sample_response is not None
    assert pod.sample_response["model_version"] == "v2"
    body = {**pod.sample_request, "top_k": 2}
    resp = requests.post(pod.predictions_url(), json=body, headers=pod.headers(), timeout=60)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["recommendations"]) == 2
    for headers in ({}, {"Authorization": f"Bearer {NEW}"}, {"Authorization": OLD}):
        refused = requests.post(pod.predictions_url(), json=body, headers=headers, timeout=60)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["field"] == "authorization"
        assert refused.headers["WWW-Authenticate"] == 'Bearer realm="genco"'
    bad = requests.post(
        pod.predictions_url(), json={"ad_id": "nope"}, headers=pod.headers(), timeout=60
    )
    assert bad.status_code == 404 and bad.json()["error"]["field"] == "ad_id"
    # Only the default version was loaded from the snapshot, not every archive in the store;
    # management has no key here: it listens on the pod's loopback only.
    models = requests.get(f"{pod.management_url}/models/genco/all", timeout=60).json()
    assert [m["modelVersion"] for m in models] == ["v2"]


def test_a_rotated_secret_takes_effect_without_a_restart(pod: torchserve.ServeHandle, secret: Path):
    pid = pod.process.pid
    body = {**pod.sample_request, "top_k": 1}

    def status(token: str) -> int:
        headers = {"Authorization": f"Bearer {token}"}
        return requests.post(
            pod.predictions_url(), json=body, headers=headers, timeout=60
        ).status_code

    try:
        rotate_secret(secret.parent, f"{OLD}\n{NEW}\n")  # overlap while clients move
        assert (status(OLD), status(NEW)) == (200, 200)
        rotate_secret(secret.parent, NEW + "\n")
        assert (status(OLD), status(NEW)) == (401, 200)
    finally:
        rotate_secret(secret.parent, OLD + "\n")
    assert (status(OLD), status(NEW)) == (200, 401)
    assert pod.process.pid == pid and pod.process.poll() is None


def test_grpc_carries_the_token_to_the_handler(pod: torchserve.ServeHandle, secret: Path):
    """TorchServe passes no gRPC metadata to the handler: the client sends the token as the
    ``authorization`` input too (the pod's gRPC port is loopback only; tested here all the
    same)."""
    from genco.serving.grpc_client import GrpcClient

    with GrpcClient(pod.grpc_target, token_file=str(secret), timeout_s=60) as client:
        assert client.predict({"ad_id": "ad_0000", "top_k": 2})["model_version"] == "v2"
    for token in (None, NEW):
        with GrpcClient(pod.grpc_target, token, timeout_s=60) as anonymous:
            with pytest.raises(RequestError) as refused:
                anonymous.predict({"ad_id": "ad_0000"})
            assert (refused.value.status, refused.value.field) == (401, "authorization")


# What a client of each KServe protocol sends, and where the request's answer is.
PROTOCOLS = {
    "v1": (
        "v1/models/genco:predict",
        lambda req: {"instances": [req]},
        lambda body: body["predictions"][0],
    ),
    "v2": (
        "v2/models/genco/infer",
        lambda req: {
            "inputs": [
                {"name": "request", "datatype": "BYTES", "shape": [1], "data": [json.dumps(req)]}
            ]
        },
        lambda body: json.loads(body["outputs"][1]["data"][0]),
    ),
}


def _manifest() -> tuple[dict, dict]:
    runtime, isvc = list(yaml.safe_load_all(MANIFEST.read_text()))
    return runtime, isvc


def test_the_pod_answers_every_protocol_the_manifest_declares(pod: torchserve.ServeHandle):
    runtime, isvc = _manifest()
    declared = runtime["spec"]["protocolVersions"]
    assert isvc["spec"]["predictor"]["model"]["protocolVersion"] in declared
    assert set(declared) == set(PROTOCOLS)
    headers = {**pod.headers(), "Content-Type": "application/json"}
    for protocol in declared:
        path, wrap, unwrap = PROTOCOLS[protocol]
        url = f"{pod.inference_url}/{path}"
        anonymous = requests.post(url, json=wrap(pod.sample_request), timeout=60)
        assert anonymous.status_code == 401, (protocol, anonymous.text)
        for req, status in (({**pod.sample_request, "top_k": 2}, 200), ({"ad_id": "x"}, 404)):
            resp = requests.post(url, json=wrap(req), headers=headers, timeout=60)
            assert resp.status_code == 200, (protocol, resp.text)
            answer = unwrap(resp.json())
            if status == 200:
                assert answer["model_version"] == "v2" and len(answer["recommendations"]) == 2
            else:
                assert answer["error"]["status"] == 404, protocol


def test_the_pod_exports_prometheus_metrics_where_the_manifest_scrapes(
    pod: torchserve.ServeHandle,
):
    _, isvc = _manifest()
    notes = isvc["metadata"]["annotations"]
    props = dict(line.split("=", 1) for line in kserve_properties("v1").splitlines() if "=" in line)
    assert notes["serving.kserve.io/enable-prometheus-scraping"] == "true"
    assert props["metrics_address"] == f"http://0.0.0.0:{notes['prometheus.kserve.io/port']}"
    url = f"{pod.metrics_url}{notes['prometheus.kserve.io/path']}"
    deadline = time.monotonic() + 30  # the handler flushes its counts once a second
    while True:
        resp = requests.get(url, timeout=60)
        if "genco_requests{" in resp.text or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert resp.status_code == 200
    assert "# TYPE ts_inference_requests_total counter" in resp.text
    assert "genco_requests{" in resp.text  # the handler's own, from the startup probe on


def test_manifest_runs_torchserve_on_the_published_layout():
    runtime, isvc = _manifest()
    assert (runtime["kind"], isvc["kind"]) == ("ServingRuntime", "InferenceService")
    container = runtime["spec"]["containers"][0]
    assert container["command"] == ["torchserve"]
    args = dict(a.split("=", 1) for a in container["args"] if "=" in a)
    props = dict(line.split("=", 1) for line in kserve_properties("v1").splitlines() if "=" in line)
    # KServe mounts storageUri at /mnt/models: the layout's two folders.
    assert args["--model-store"] == props["model_store"] == "/mnt/models/model-store"
    assert args["--ts-config"] == "/mnt/models/config/config.properties"
    port = int(props["inference_address"].rsplit(":", 1)[1])
    assert container["ports"][0]["containerPort"] == port
    predictor = isvc["spec"]["predictor"]["model"]
    assert predictor["runtime"] == runtime["metadata"]["name"]
    assert predictor["storageUri"].endswith("/" + archive.KSERVE_DIR)
    fmt = runtime["spec"]["supportedModelFormats"][0]["name"]
    assert predictor["modelFormat"]["name"] == fmt
    assert json.loads(props["model_snapshot"])["models"]["genco"]["v1"]["defaultVersion"]


def test_manifest_mounts_the_token_secret_where_the_handler_reads_it():
    """TorchServe's own auth is off only where the handler checks a Secret's token: the
    env names a file inside a read-only mount of a Secret volume, without subPath (a subPath
    mount never sees a rotated Secret)."""
    runtime, _ = _manifest()
    [container] = runtime["spec"]["containers"]
    assert "--disable-token-auth" in container["args"]
    env = {e["name"]: e for e in container["env"]}
    path = Path(env[auth.TOKEN_FILE_ENV]["value"])
    volumes = {v["name"]: v for v in runtime["spec"]["volumes"]}
    [mount] = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent]
    assert mount["readOnly"] is True and "subPath" not in mount
    secret = volumes[mount["name"]]["secret"]
    assert secret["secretName"] == "genco-inference-token"
    assert secret.get("items") is None or path.name in [i["path"] for i in secret["items"]]
    assert secret["defaultMode"] & 0o004  # readable by the image's uid 1000
    assert f"kubectl create secret generic {secret['secretName']}" in MANIFEST.read_text()
    assert f"--from-literal={path.name}=" in MANIFEST.read_text()
    # Management and gRPC on the pod's loopback: no key guards them once TorchServe's auth is off.
    props = dict(line.split("=", 1) for line in kserve_properties("v1").splitlines() if "=" in line)
    assert props["management_address"].startswith("http://127.0.0.1:")
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"


def test_cli_serves_a_layout_once(layout: Path, capsys: pytest.CaptureFixture[str]):
    from genco.cli import main

    assert main(["serve", "--layout", str(layout), "--once"]) == 0
    out = capsys.readouterr().out
    info, _, rest = out.partition("}\n")
    info_d = json.loads(info + "}")
    assert info_d["model_version"] == "v2" and info_d["token_auth"] is True
    response = json.loads(rest[rest.index("\n{") + 1 :])
    assert response["model_version"] == "v2" and len(response["recommendations"]) == 3

    assert main(["serve", "--layout", str(layout), "--no-auth"]) == 2
    assert "--no-auth applies to --model" in capsys.readouterr().err
    # A token file that cannot serve is refused before Java starts, in one line.
    missing = layout / "no-such-token"
    assert main(["serve", "--layout", str(layout), "--token-file", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"token file {missing}: cannot be read" in err and len(err.strip().splitlines()) == 2
    assert main(["serve", "--model", str(layout), "--token-file", OLD, "--no-auth"]) == 2
    assert "--token-file replaces TorchServe's keys" in capsys.readouterr().err
