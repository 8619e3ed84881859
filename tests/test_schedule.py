"""``genco pipeline schedule`` through the real kfp.Client against a real HTTP server on
127.0.0.1 that keeps state for the subset of the KFP v2beta1 REST API the client uses
(experiments: list, create; recurring runs: list, create, delete; healthz)."""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from genco.pipeline.runner import compile_pipeline
from genco.pipeline.schedule import ScheduleTarget, kfp_cron, schedule
from pipelines.retraining import COMPONENT_NAMES

API = "/apis/v2beta1"
PARAMS = {"catalog": "gs://b/c.csv", "impressions": "gs://b/i.csv", "model_store": "gs://b/s"}


class KfpApi:
    """State and request log of the stand-in server."""

    def __init__(self) -> None:
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.requests: list[tuple[str, str, dict | None, dict[str, str]]] = []
        self.lock = threading.Lock()

    def answer(self, method: str, path: str, body: dict | None) -> tuple[int, dict]:
        url = urllib.parse.urlparse(path)
        query = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
        name = _name_filter(query.get("filter"))
        with self.lock:
            if url.path == f"{API}/healthz":
                return 200, {"multi_user": False}
            if url.path == f"{API}/experiments" and method == "GET":
                found = [
                    e
                    for e in self.experiments.values()
                    if (name is None or e["display_name"] == name)
                    and e.get("namespace", "") == query.get("namespace", "")
                ]
                return 200, {"experiments": found, "total_size": len(found)}
            if url.path == f"{API}/experiments" and method == "POST":
                exp = {**(body or {}), "experiment_id": f"exp-{len(self.experiments) + 1}"}
                self.experiments[exp["experiment_id"]] = exp
                return 200, exp
            if url.path == f"{API}/recurringruns" and method == "GET":
                found = [
                    r
                    for r in self.runs.values()
                    if r["experiment_id"] == query.get("experiment_id")
                    and (name is None or r["display_name"] == name)
                ]
                return 200, {"recurringRuns": found, "total_size": len(found)}
            if url.path == f"{API}/recurringruns" and method == "POST":
                run = {**(body or {}), "recurring_run_id": f"run-{len(self.requests)}"}
                self.runs[run["recurring_run_id"]] = run
                return 200, run
            if url.path.startswith(f"{API}/recurringruns/") and method == "DELETE":
                self.runs.pop(url.path.rsplit("/", 1)[1])
                return 200, {}
        return 404, {"error": f"not in the stand-in: {method} {url.path}"}


def _name_filter(text: str | None) -> str | None:
    if not text:
        return None
    for p in json.loads(text).get("predicates", []):
        if p.get("key") == "display_name" and p.get("operation") == "EQUALS":
            return p.get("string_value") or p.get("stringValue")
    return None


@pytest.fixture
def kfp_api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[str, KfpApi]]:
    monkeypatch.setenv("HOME", str(tmp_path))  # kfp.Client keeps a context file there
    for var in ("KF_PIPELINES_TOKEN", "KF_PIPELINES_COOKIES", "KF_PIPELINES_SA_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    api = KfpApi()

    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length)) if length else None
            headers = {k.lower(): v for k, v in self.headers.items()}
            api.requests.append((self.command, self.path, body, headers))
            status, reply = api.answer(self.command, self.path, body)
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _handle

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", api
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> str:
    return compile_pipeline(str(tmp_path_factory.mktemp("yaml") / "r.yaml"), "reg.test/genco:1")


def _schedule(host: str, package: str, **kwargs) -> dict:
    target = ScheduleTarget(host=host, job_name="nightly", **kwargs.pop("target", {}))
    with pytest.warns(FutureWarning):  # kfp.Client's notice about server versions
        return schedule("0 3 * * *", PARAMS, target, pipeline_yaml=package, **kwargs)


def test_schedule_creates_one_at_a_time_recurring_run(kfp_api, package) -> None:
    host, api = kfp_api
    out = _schedule(host, package)
    assert out["experiment_id"] == "exp-1" and out["cron"] == "0 0 3 * * *"
    assert out["replaced"] == [] and list(api.runs) == [out["recurring_run_id"]]
    run = api.runs[out["recurring_run_id"]]
    assert run["display_name"] == "nightly" and run["experiment_id"] == "exp-1"
    assert int(run["max_concurrency"]) == 1  # int64: a string in proto3 JSON
    assert run["no_catchup"] is True
    assert run["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert run["runtime_config"]["parameters"] == PARAMS
    assert set(run["pipeline_spec"]["components"]) >= {f"comp-{n}" for n in COMPONENT_NAMES}
    assert api.experiments["exp-1"]["display_name"] == "genco"
    assert f"{host}/#/experiments/details/exp-1" in out["links"]  # not on stdout


def test_running_twice_is_refused_then_replace_updates_the_one_run(kfp_api, package) -> None:
    host, api = kfp_api
    first = _schedule(host, package)
    with pytest.raises(ValueError) as refused:
        _schedule(host, package)
    assert str(refused.value) == (
        f"recurring run 'nightly' already exists in experiment 'genco' (id "
        f"{first['recurring_run_id']}); pass --replace to update it, or choose another "
        "--job-name"
    )
    assert list(api.runs) == [first["recurring_run_id"]]  # nothing created or deleted
    second = _schedule(host, package, replace=True)
    assert second["replaced"] == [first["recurring_run_id"]]
    assert list(api.runs) == [second["recurring_run_id"]] != [first["recurring_run_id"]]
    assert len(api.experiments) == 1  # the experiment is reused


def test_namespace_service_account_pipeline_root_from_flags(kfp_api, package) -> None:
    host, api = kfp_api
    target = {
        "namespace": "team-ads",
        "service_account": "genco-runner",
        "pipeline_root": "s3://mlpipeline/genco",
    }
    out = _schedule(host, package, target=target)
    assert out["namespace"] == "team-ads"
    run = api.runs[out["recurring_run_id"]]
    assert run["service_account"] == "genco-runner"
    assert run["runtime_config"]["pipeline_root"] == "s3://mlpipeline/genco"
    assert api.experiments[out["experiment_id"]]["namespace"] == "team-ads"


def test_target_and_auth_from_the_environment(kfp_api, package, monkeypatch, tmp_path) -> None:
    host, api = kfp_api
    token = tmp_path / "token"
    token.write_text("sa-token-from-file\n")
    monkeypatch.setenv("KF_PIPELINES_ENDPOINT", host)
    monkeypatch.setenv("KF_PIPELINES_NAMESPACE", "team-env")
    monkeypatch.setenv("KF_PIPELINES_SERVICE_ACCOUNT", "sa-env")
    monkeypatch.setenv("KF_PIPELINES_PIPELINE_ROOT", "gs://bucket/root")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token))
    with pytest.warns(FutureWarning):
        out = schedule("0 3 * * *", PARAMS, ScheduleTarget(), pipeline_yaml=package)
    run = api.runs[out["recurring_run_id"]]
    assert run["service_account"] == "sa-env"
    assert run["runtime_config"]["pipeline_root"] == "gs://bucket/root"
    assert out["namespace"] == "team-env"
    auth = {h.get("authorization") for m, _, _, h in api.requests if m in ("POST", "DELETE")}
    assert auth == {"Bearer sa-token-from-file"}
    # A bearer token in the environment takes precedence; cookies ride along.
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "tok-env")
    monkeypatch.setenv("KF_PIPELINES_COOKIES", "authservice_session=abc")
    api.requests.clear()
    with pytest.warns(FutureWarning):
        schedule("0 3 * * *", PARAMS, ScheduleTarget(job_name="other"), pipeline_yaml=package)
    posts = [h for m, _, _, h in api.requests if m == "POST"]
    assert {h.get("authorization") for h in posts} == {"Bearer tok-env"}
    assert {h.get("cookie") for h in posts} == {"authservice_session=abc"}


def test_no_endpoint_and_no_image_are_refused_before_any_request(monkeypatch) -> None:
    monkeypatch.delenv("KF_PIPELINES_ENDPOINT", raising=False)
    monkeypatch.delenv("GENCO_IMAGE", raising=False)
    with pytest.raises(ValueError, match="no component image: pass --image"):
        schedule("0 3 * * *", PARAMS, ScheduleTarget(host="http://127.0.0.1:9"))
    with pytest.raises(ValueError, match="no Kubeflow Pipelines endpoint: pass --host"):
        schedule("0 3 * * *", PARAMS, ScheduleTarget(), pipeline_yaml="x.yaml")


@pytest.mark.parametrize("cron", ["0 3 * *", "every day", "1 2 3 4 5 6 7"])
def test_schedule_rejects_bad_cron_before_any_request(cron) -> None:
    with pytest.raises(ValueError, match="must have 5 fields"):
        kfp_cron(cron)
    with pytest.raises(ValueError, match="must have 5 fields"):
        schedule(cron, PARAMS, ScheduleTarget(host="http://127.0.0.1:9"))


def test_cli_schedule_twice_refuses_in_one_line_exit_2(kfp_api, package, tmp_path) -> None:
    """The real CLI in a subprocess against the stand-in API: the second run of the same
    command refuses, and the recurring run stays the one created first."""
    import os
    import subprocess
    import sys

    host, api = kfp_api
    root = Path(__file__).resolve().parents[1]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "PYTHONPATH": str(root),
        "KF_PIPELINES_ENDPOINT": host,
    }
    argv = [sys.executable, "-m", "genco.cli", "pipeline", "schedule", "--cron", "0 3 * * *",
            "--store", "gs://b/s", "--catalog", "gs://b/c.csv", "--impressions", "gs://b/i.csv",
            "--pipeline-yaml", package, "--service-account", "genco-runner"]  # fmt: skip
    first = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, cwd=root)
    assert first.returncode == 0, first.stderr
    created = json.loads(first.stdout)
    assert api.runs[created["recurring_run_id"]]["service_account"] == "genco-runner"
    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, cwd=root)
    assert second.returncode == 2
    assert second.stderr.splitlines() == [
        "genco pipeline: error: recurring run 'genco-retraining-daily' already exists in "
        f"experiment 'genco' (id {created['recurring_run_id']}); pass --replace to update it, "
        "or choose another --job-name"
    ]
    assert list(api.runs) == [created["recurring_run_id"]]
