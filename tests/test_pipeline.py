"""The retraining pipeline: compiled YAML, a real local run end to end (deploy, then a gate
refusal), scheduling through the real kfp.Client against a stand-in API server, and the CLI
verbs of genco.cli.pipeline."""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from kfp import components as kfp_components

from components import GENCO_IMAGE
from genco.cli.pipeline import add_commands
from genco.data import storage
from genco.pipeline.runner import compile_pipeline, local_demo, schedule
from genco.store import POINTER, current_version, read_pointer
from genco.worlds.simulate import SimulationOutputs, simulate, world_config
from pipelines.retraining import COMPONENT_NAMES


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    path = str(tmp_path_factory.mktemp("yaml") / "retraining.yaml")
    compile_pipeline(path)
    with open(path) as f:
        return path, yaml.safe_load(f)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SimulationOutputs:
    out = tmp_path_factory.mktemp("pipeline_world")
    # 27 combinations per ad: a few thousand impressions teach a clearly good policy.
    config = world_config("default", n_ads=4, n_candidates=3, pool_size=4)
    return simulate(config, seed=1, out_dir=str(out), n_impressions=6000)


# --------------------------------------------------------------------------- compile


def test_compiled_yaml_names_all_five_components(compiled):
    _, spec = compiled
    assert set(spec["components"]) >= {f"comp-{n}" for n in COMPONENT_NAMES}
    executors = spec["deploymentSpec"]["executors"]
    assert {f"exec-{n}" for n in COMPONENT_NAMES} <= set(executors)
    for name, ex in executors.items():
        container = ex["container"]
        assert container["image"] == GENCO_IMAGE, name
        assert "pip install" not in " ".join(container["command"]), name
    assert executors["exec-train-generator"]["container"]["resources"]["cpuRequest"] >= 1


def test_deploy_is_conditional_on_the_gate_and_uncached(compiled):
    _, spec = compiled
    root = spec["root"]["dag"]["tasks"]
    cond = next(t for t in root.values() if "triggerPolicy" in t)
    assert "evaluate-Output" in cond["triggerPolicy"]["condition"]
    branch = spec["components"][cond["componentRef"]["name"]]["dag"]["tasks"]
    assert set(branch) == {"deploy"}
    assert branch["deploy"]["cachingOptions"] == {}  # caching off
    assert branch["deploy"]["retryPolicy"]["maxRetryCount"] == 3
    assert root["train-generator"]["cachingOptions"] == {"enableCache": True}
    assert root["ingest"]["cachingOptions"] == {}


def test_compiled_yaml_loads_back(compiled):
    path, _ = compiled
    loaded = kfp_components.load_component_from_file(path)
    assert loaded.name == "genco-retraining"
    inputs = set(loaded.component_spec.inputs)
    assert {"catalog", "impressions", "model_store", "margin", "window_days"} <= inputs


# ------------------------------------------------------------------------ local run


def test_local_pipeline_deploys_then_gate_refuses_a_worse_model(world, tmp_path):
    store = str(tmp_path / "store")
    data = {
        "catalog": world.catalog,
        "impressions": world.impressions,
        "constraints": world.constraints,
        "ground_truth": world.ground_truth,
        "model_store": store,
    }
    first = local_demo(str(tmp_path / "run1"), {**data, "reward_epochs": 5, "rl_steps": 30})
    assert first["deployed"] and first["production_before"] is None
    assert first["gate"]["reason"] == "no production model: first deployment"
    v1 = current_version(store)
    assert first["production_version"] == v1
    assert first["sample_recommendation"]["rank"] == 1
    assert "data:image/png;base64," in Path(first["report"]).read_text()
    pointer = storage.read_bytes(storage.join(store, POINTER))
    served = Path(store, "kserve", "config", "config.properties")
    assert f"genco-{v1}.mar" in served.read_text()  # the deploy step published it
    served_before = served.read_bytes()

    # Deliberately worse: no policy training, no warm start, one reward epoch; and it must
    # beat production by 50%.
    worse = {**data, "reward_epochs": 1, "rl_steps": 0, "warm_start": False, "margin": 0.5}
    second = local_demo(str(tmp_path / "run2"), worse)
    assert not second["deployed"] and second["gate"]["passed"] is False
    assert second["gate"]["candidate_value"] < second["gate"]["production_value"] * 1.5
    assert storage.read_bytes(storage.join(store, POINTER)) == pointer
    assert served.read_bytes() == served_before
    assert not (Path(second["pipeline_run"]) / "deploy").exists()  # branch skipped
    assert (Path(first["pipeline_run"]) / "deploy").is_dir()
    assert "REFUSED" in Path(second["report"]).read_text()


# ------------------------------------------------------------------------- schedule


class _FakeKfpApi(BaseHTTPRequestHandler):
    """The three KFP v2beta1 endpoints kfp.Client touches to create a recurring run."""

    requests: list[tuple[str, str, dict | None]]

    def _reply(self, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.requests.append(("GET", self.path, None))
        self._reply({"experiments": []} if "/experiments" in self.path else {})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self.requests.append(("POST", self.path, body))
        key = "experiment_id" if self.path.endswith("/experiments") else "recurring_run_id"
        self._reply({**body, key: f"{key}-1"})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def kfp_api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[str, list]]:
    monkeypatch.setenv("HOME", str(tmp_path))  # kfp.Client keeps a context file there
    requests: list = []
    handler = type("Handler", (_FakeKfpApi,), {"requests": requests})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", requests
    finally:
        server.shutdown()


def test_schedule_creates_one_at_a_time_recurring_run(kfp_api):
    host, requests = kfp_api
    params = {"catalog": "gs://b/c.csv", "impressions": "gs://b/i.csv", "model_store": "gs://b/s"}
    with pytest.warns(FutureWarning):  # kfp.Client's notice about server versions
        out = schedule(host, "0 3 * * *", params, experiment="genco", job_name="nightly")
    assert out == {
        "experiment_id": "experiment_id-1",
        "recurring_run_id": "recurring_run_id-1",
        "cron": "0 0 3 * * *",
    }
    posts = {path: body for method, path, body in requests if method == "POST"}
    assert posts["/apis/v2beta1/experiments"]["display_name"] == "genco"
    run = posts["/apis/v2beta1/recurringruns"]
    assert run["display_name"] == "nightly" and run["experiment_id"] == "experiment_id-1"
    assert run["max_concurrency"] == 1 and run["no_catchup"] is True
    assert run["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert run["runtime_config"]["parameters"] == params
    assert set(run["pipeline_spec"]["components"]) >= {f"comp-{n}" for n in COMPONENT_NAMES}


@pytest.mark.parametrize("cron", ["0 3 * *", "every day", "1 2 3 4 5 6 7"])
def test_schedule_rejects_bad_cron_before_any_request(cron):
    with pytest.raises(ValueError, match="must have 5 fields"):
        schedule("http://127.0.0.1:9", cron, {})


# ------------------------------------------------------------------------------ CLI


def _cli(*argv: str) -> None:
    parser = argparse.ArgumentParser(prog="genco")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_cli_compile(tmp_path, capsys):
    out = tmp_path / "retraining.yaml"
    _cli("pipeline", "compile", "--out", str(out))
    assert capsys.readouterr().out.strip() == str(out)
    assert "comp-deploy" in yaml.safe_load(out.read_text())["components"]


def test_cli_evaluate_deploy_versions_rollback(world, tmp_path, capsys):
    from genco.models.generator import GeneratorConfig
    from genco.models.reward import RewardModelConfig
    from genco.training.bundle import run_train

    bundles = []
    for seed in (0, 1):
        path = str(tmp_path / f"b{seed}")
        run_train(
            world.catalog,
            world.impressions,
            path,
            world.constraints,
            RewardModelConfig(epochs=2, seed=seed),
            GeneratorConfig(rl_steps=2, seed=seed),
        )
        bundles.append(path)
    store = str(tmp_path / "store")
    _cli("deploy", "--model", bundles[0], "--store", store)
    v1 = json.loads(capsys.readouterr().out)["version"]

    data = str(Path(bundles[1]) / "ingest")
    _cli("evaluate", "--model", bundles[1], "--data", data, "--store", store,
         "--margin", "100", "--out", str(tmp_path / "ev"))  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    assert printed["passed"] is False and "production_value" in printed
    assert (tmp_path / "ev" / "report.html").is_file()

    with pytest.raises(ValueError, match="not deployed: evaluation gate not passed"):
        _cli("deploy", "--model", bundles[1], "--store", store,
             "--gate-file", str(tmp_path / "ev" / "gate.json"))  # fmt: skip
    capsys.readouterr()
    assert current_version(store) == v1

    _cli("deploy", "--model", bundles[1], "--store", store, "--version", "hand-picked")
    capsys.readouterr()
    _cli("versions", "--store", store)
    listed = json.loads(capsys.readouterr().out)
    assert [(v["version"], v["current"]) for v in listed] == [(v1, False), ("hand-picked", True)]
    _cli("rollback", "--store", store)
    assert json.loads(capsys.readouterr().out)["version"] == v1
    assert read_pointer(store)["rolled_back_from"] == "hand-picked"


def test_cli_run_needs_both_data_paths(tmp_path):
    with pytest.raises(ValueError, match="give both --catalog and --impressions"):
        _cli("pipeline", "run", "--out", str(tmp_path), "--catalog", "c.csv")


def test_local_run_needs_a_local_working_directory():
    with pytest.raises(ValueError, match="needs a local working directory"):
        local_demo("gs://bucket/runs")
