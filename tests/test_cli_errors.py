"""The CLI's error policy on real failing calls: every expected failure (missing path,
credentials, network, an HTTP answer) is one line on stderr with exit status 2, and a bug
still shows its traceback. Each case runs ``python -m genco.cli`` with a controlled
environment, against real servers on 127.0.0.1 or a port nothing listens on."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from genco.cli.common import error_message, expected_errors

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _closed_url() -> str:
    """A loopback URL nothing listens on (bound, then released: connect is refused)."""
    return f"http://127.0.0.1:{_free_port()}"


@pytest.fixture
def bare_env(tmp_path: Path) -> dict[str, str]:
    """No cloud settings and no credentials at all: a fresh HOME, no ADC, no ~/.aws, no
    metadata server lookups (which would only time out here)."""
    home = tmp_path / "home"
    home.mkdir()
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "PYTHONPATH": str(ROOT),
        "CLOUDSDK_CONFIG": str(home / "gcloud"),
        "NO_GCE_CHECK": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def genco_fails(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    """Run the CLI; assert exit 2 and exactly one stderr line; return that line."""
    r = subprocess.run(
        [sys.executable, "-m", "genco.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"genco {args[0]}: error: "), lines[0]
    return lines[0]


# --------------------------------------------------------------------- missing paths


def test_missing_local_store_is_an_error_not_an_empty_list(bare_env, tmp_path: Path) -> None:
    store = str(tmp_path / "typo")
    line = genco_fails(bare_env, "versions", "--store", store)
    assert line == (
        f"genco versions: error: {store}: no model store here (no such directory); check --store"
    )


def test_an_empty_store_lists_no_versions(bare_env, tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "genco.cli", "versions", "--store", str(tmp_path)],
        env=bare_env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []


# ------------------------------------------------------------------------- S3 / moto


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def _s3_env(env: dict[str, str], endpoint: str) -> dict[str, str]:
    return {
        **env,
        "S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "genco-test",
        "AWS_SECRET_ACCESS_KEY": "genco-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def test_s3_bucket_that_does_not_exist(bare_env, moto_endpoint: str) -> None:
    env = _s3_env(bare_env, moto_endpoint)
    catalog = "s3://genco-no-such-bucket/data/catalog.csv"
    line = genco_fails(
        env, "recommend", "--model", "s3://genco-no-such-bucket/model", "--out", "/tmp/x.csv"
    )
    assert "s3://genco-no-such-bucket/model" in line
    line = genco_fails(
        env, "validate", "--catalog", catalog, "--impressions", "i.csv", "--out", "/tmp/v"
    )
    assert catalog in line
    line = genco_fails(env, "versions", "--store", "s3://genco-no-such-bucket/store")
    assert "s3://genco-no-such-bucket/store: no model store here" in line


def test_s3_without_credentials(bare_env, moto_endpoint: str) -> None:
    env = {**bare_env, "S3_ENDPOINT_URL": moto_endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
    line = genco_fails(env, "versions", "--store", "s3://genco-bucket/store")
    assert line == (
        "genco versions: error: no S3 credentials for s3://: set AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and S3_ENDPOINT_URL for MinIO"
    )


def test_s3_endpoint_unreachable(bare_env) -> None:
    url = _closed_url()
    env = _s3_env(bare_env, url)
    line = genco_fails(env, "versions", "--store", "s3://genco-bucket/store")
    assert f'Could not connect to the endpoint URL: "{url}/genco-bucket/store"' in line
    assert line.endswith("check S3_ENDPOINT_URL (or AWS_ENDPOINT_URL) and that the server is up")


@pytest.mark.parametrize("store", ["s3://genco-bucket", "s3://genco-bucket/store"])
def test_s3_bucket_check_does_not_turn_an_outage_into_no_such_bucket(bare_env, store) -> None:
    # s3fs' exists(bucket) answers False for any failed probe; genco asks HeadBucket and
    # lets everything but a 404 through, so a refused connection is not "no model store".
    url = _closed_url()
    line = genco_fails(_s3_env(bare_env, url), "versions", "--store", store)
    assert "no model store here" not in line and "does not exist" not in line
    assert f'Could not connect to the endpoint URL: "{url}/genco-bucket' in line


def test_s3_missing_bucket_alone_is_not_found(bare_env, moto_endpoint: str) -> None:
    line = genco_fails(
        _s3_env(bare_env, moto_endpoint), "versions", "--store", "s3://genco-no-such-bucket"
    )
    assert line == (
        "genco versions: error: s3://genco-no-such-bucket: no model store here (no such "
        "directory); check --store"
    )


# ------------------------------------------------------------------------------- GCS


def test_gs_without_credentials(bare_env) -> None:
    line = genco_fails(bare_env, "versions", "--store", "gs://genco-bucket/store")
    assert line == (
        "genco versions: error: no Google Cloud credentials for gs://: run 'gcloud auth "
        "application-default login' or set GOOGLE_APPLICATION_CREDENTIALS "
        "(STORAGE_EMULATOR_HOST for an emulator)"
    )


def test_gs_emulator_unreachable_through_aiohttp(bare_env) -> None:
    # gcsfs retries a refused connection 6 times with backoff (~30 s): a network error is
    # transient. What reaches the user at the end is still one line.
    url = _closed_url()
    env = {**bare_env, "STORAGE_EMULATOR_HOST": url}
    line = genco_fails(env, "versions", "--store", "gs://genco-bucket/store")
    port = url.rsplit(":", 1)[1]
    assert f"cannot connect: Cannot connect to host 127.0.0.1:{port}" in line
    assert "check the URL or endpoint setting (STORAGE_EMULATOR_HOST" in line


@pytest.fixture
def forbidding_store() -> Iterator[str]:
    """An object store that refuses everything with 403, in GCS's JSON and S3's XML."""

    def answer(path: str) -> tuple[int, dict | bytes]:
        if path.startswith(("/storage/", "/download/", "/upload/")):
            return 403, {"error": {"code": 403, "message": "no storage.objects.get (test)"}}
        return 403, b"<Error><Code>AccessDenied</Code><Message>denied (test)</Message></Error>"

    yield from _serve(answer)


@pytest.mark.parametrize("scheme", ["gs", "s3"])
@pytest.mark.parametrize("prefix", ["/store", ""])
def test_store_refusing_access(bare_env, forbidding_store: str, scheme: str, prefix: str) -> None:
    env = {**_s3_env(bare_env, forbidding_store), "STORAGE_EMULATOR_HOST": forbidding_store}
    store = f"{scheme}://genco-bucket{prefix}"
    line = genco_fails(env, "versions", "--store", store)
    assert line.startswith(f"genco versions: error: {store}: access denied (")
    assert line.endswith("); check that the credentials may use this bucket")
    if scheme == "gs":
        assert "no storage.objects.get (test)" in line


# ------------------------------------------------------------------------------- KFP


def test_unreachable_kfp_host(bare_env, tmp_path: Path) -> None:
    url = _closed_url()
    line = _schedule(bare_env, url, tmp_path / "retraining.yaml")
    assert line.startswith(f"genco pipeline: error: cannot connect to {url} (")
    assert "Connection refused" in line and "--host" in line


# ------------------------------------------------------------------ local pipeline


def test_failed_local_step_is_one_line_with_its_root_cause_and_is_not_retried(
    bare_env, tmp_path: Path
) -> None:
    """A misspelt catalog path: the real KFP local runner, the ingest step fails on its
    first attempt (no retry policy, no backoff), and stderr ends in one line naming the
    step, the error inside it and the log; no traceback, exit 2."""
    out = tmp_path / "run"
    catalog = str(tmp_path / "catalgo.csv")
    r = subprocess.run(
        [sys.executable, "-m", "genco.cli", "pipeline", "run", "--out", str(out),
         "--catalog", catalog, "--impressions", str(tmp_path / "impressions.csv")],
        env=bare_env, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert lines == [
        "decide-canary: running",  # no canary in a new store: nothing to decide
        "[genco] decide-canary: nothing to decide (no canary is running)",
        "decide-canary: success",
        "ingest: running",
        "ingest: failed",
        f"genco pipeline: error: step 'ingest' failed: ContractError: {catalog}: file not "
        f"found; full log: {out / 'pipeline.log'}",
    ]
    log = (out / "pipeline.log").read_text()
    assert log.count("Executing task") == 2 and "Retrying" not in log  # decide-canary, ingest
    assert "Traceback (most recent call last)" in log  # the detail stays in the log


# -------------------------------------------------------------------------------- HTTP


def _serve(answer) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1; ``answer(path)`` gives (status, JSON body or XML)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            status, body = answer(self.path)
            xml = isinstance(body, bytes)
            data = body if xml else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml" if xml else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def refusing_server() -> Iterator[str]:
    """Answers every request with the status in its path (``/405/...``) and a
    TorchServe-style JSON error body."""

    def answer(path: str) -> tuple[int, dict]:
        status = int(path.strip("/").split("/")[0].split("?")[0])
        return status, {"code": status, "type": "Test", "message": "refused by test"}

    yield from _serve(answer)


@pytest.fixture
def kfp_forbidding() -> Iterator[str]:
    """A KFP API that is healthy but refuses every other call with 403."""

    def answer(path: str) -> tuple[int, dict]:
        if path.startswith("/apis/v2beta1/healthz"):
            return 200, {"multi_user": False}
        return 403, {"error": "forbidden by test", "code": 7}

    yield from _serve(answer)


def _schedule(env: dict[str, str], host: str, package: Path) -> str:
    package.write_text("{}\n")
    return genco_fails(
        env,
        "pipeline",
        "schedule",
        "--host",
        host,
        "--cron",
        "0 3 * * *",
        "--store",
        "gs://b/store",
        "--catalog",
        "gs://b/catalog.csv",
        "--impressions",
        "gs://b/impressions.parquet",
        "--pipeline-yaml",
        str(package),
        "--image",
        "genco:test",
    )


def test_kfp_http_error(bare_env, kfp_forbidding: str, tmp_path: Path) -> None:
    line = _schedule(bare_env, kfp_forbidding, tmp_path / "retraining.yaml")
    assert line == (
        "genco pipeline: error: the Kubeflow Pipelines API answered 403 Forbidden; check the "
        "credentials (token, --key-file) and their permissions"
    )


def test_kfp_unhealthy_host(bare_env, refusing_server: str, tmp_path: Path) -> None:
    # kfp.Client checks /healthz 5 times, 5 s apart, logging a traceback each time on the
    # root logger; only the final one-line error may reach the user.
    line = _schedule(bare_env, f"{refusing_server}/503", tmp_path / "retraining.yaml")
    assert line.startswith("genco pipeline: error: cannot connect: Failed getting healthz")


def _raised(call) -> BaseException:
    try:
        call()
    except expected_errors() as exc:
        return exc
    raise AssertionError("the call did not fail with an expected error")


@pytest.mark.parametrize(
    ("status", "hint"),
    [
        (401, "check the credentials (token, --key-file) and their permissions"),
        (404, "check the URL and the names in it"),
        (405, "(for TorchServe: is its management API on?)"),
        (503, "the server failed; see its logs and retry"),
    ],
)
def test_http_error_names_status_url_and_what_to_do(refusing_server, status, hint) -> None:
    url = f"{refusing_server}/{status}/models"
    exc = _raised(lambda: requests.get(url, timeout=10).raise_for_status())
    line = error_message(exc)
    assert line.startswith(f"HTTP {status} from {url}: ")
    assert "refused by test" in line and line.endswith(hint)
    assert "\n" not in line


def test_torchserve_management_error(refusing_server) -> None:
    from genco.serving.management import ManagementClient

    client = ManagementClient(f"{refusing_server}/405", token="t", timeout_s=10)
    exc = _raised(lambda: client._call("POST", "/models", url="genco.mar"))
    assert error_message(exc) == (
        "TorchServe answered 405: refused by test; the server does not allow this call "
        "(for TorchServe: is its management API on?)"
    )


def test_requests_connection_error() -> None:
    url = _closed_url()
    exc = _raised(lambda: requests.get(url, timeout=10))
    line = error_message(exc)
    assert line.startswith("cannot connect: ") and "127.0.0.1" in line
    assert "\n" not in line


# -------------------------------------------------------------------------------- bugs


@pytest.mark.parametrize("bug", [ValueError("x"), KeyError("x"), TypeError("x"), OSError("x")])
def test_a_bug_is_not_an_expected_error(bug: BaseException) -> None:
    assert not isinstance(bug, expected_errors())
    with pytest.raises(TypeError, match="is not an expected error"):
        error_message(bug)


def test_a_bug_keeps_its_traceback(bare_env, tmp_path: Path) -> None:
    # A model directory whose metadata is not JSON: a parse error inside the loader is not
    # one of the expected failures, so the traceback stays.
    (tmp_path / "reward_model.pt").write_bytes(b"x")
    (tmp_path / "reward_model.json").write_text("{not json")
    names = ("reward_model.pt", "reward_model.json")
    files = {n: hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in names}
    (tmp_path / "manifest.json").write_text(json.dumps({"files": files}))  # passes verification
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "genco.cli",
            "recommend",
            "--model",
            str(tmp_path),
            "--out",
            "r.csv",
        ],
        env=bare_env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 1
    assert "Traceback (most recent call last)" in r.stderr
