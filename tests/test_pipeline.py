"""The retraining pipeline: compiled YAML, a real local run end to end (deploy, then a gate
refusal), scheduling through the real kfp.Client against a stand-in API server, and the CLI
verbs of genco.cli.pipeline."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import yaml
from kfp import components as kfp_components

from components import GENCO_IMAGE
from genco.cli.pipeline import add_commands
from genco.data import storage
from genco.evaluation.canary import read_canary
from genco.pipeline.runner import compile_pipeline, local_demo
from genco.store import POINTER, current_version, read_pointer
from genco.worlds.simulate import SimulationOutputs, simulate, world_config
from pipelines.retraining import COMPONENT_NAMES


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    path = str(tmp_path_factory.mktemp("yaml") / "retraining.yaml")
    compile_pipeline(path, local=True)
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
    branches = {}
    for cond in (t for t in root.values() if "triggerPolicy" in t):
        assert "evaluate-Output" in cond["triggerPolicy"]["condition"]
        tasks = spec["components"][cond["componentRef"]["name"]]["dag"]["tasks"]
        branches[cond["taskInfo"]["name"]] = tasks
    assert {k: set(v) for k, v in branches.items()} == {
        "candidate-wins": {"deploy"},
        "candidate-refused": {"start-canary"},
    }
    assert branches["candidate-wins"]["deploy"]["cachingOptions"] == {}  # caching off
    assert branches["candidate-refused"]["start-canary"]["cachingOptions"] == {}
    # the running canary is decided before the candidate is judged against production
    assert "decide-canary" in root["evaluate"]["dependentTasks"]
    assert root["decide-canary"]["cachingOptions"] == {}
    assert root["train-generator"]["cachingOptions"] == {"enableCache": True}
    assert root["ingest"]["cachingOptions"] == {}


def test_no_task_has_a_kfp_retry_policy(compiled):
    # KFP reruns a failed container whatever the error; steps retry transient errors
    # themselves (genco.retries), so a contract error fails the run at once.
    _, spec = compiled
    tasks = [t for c in [spec["root"], *spec["components"].values()] for t in
             c.get("dag", {}).get("tasks", {}).values()]  # fmt: skip
    assert {t["taskInfo"]["name"] for t in tasks} >= set(COMPONENT_NAMES)
    assert [t["taskInfo"]["name"] for t in tasks if "retryPolicy" in t] == []


def test_scalar_outputs_are_named_and_evaluate_has_a_markdown_summary(compiled):
    _, spec = compiled

    def outputs(name: str, kind: str) -> dict:
        return spec["components"][f"comp-{name}"]["outputDefinitions"][kind]

    assert set(outputs("ingest", "parameters")) == {
        "rows_in", "rows_valid", "rows_quarantined", "rows_in_window"
    }  # fmt: skip
    assert set(outputs("attribute-rewards", "parameters")) == {
        "heldout_auc", "heldout_log_loss", "epochs_run", "warm_start"
    }  # fmt: skip
    assert set(outputs("train-generator", "parameters")) == {
        "warm_start", "final_reward", "train_seconds"
    }  # fmt: skip
    assert set(outputs("deploy", "parameters")) == {"deployed", "version", "reason"}
    artifacts = {k: v["artifactType"]["schemaTitle"] for k, v in
                 outputs("evaluate", "artifacts").items()}  # fmt: skip
    assert artifacts == {
        "metrics": "system.Metrics",
        "report": "system.HTML",
        "summary": "system.Markdown",
        "gate": "system.Artifact",
    }


def test_compiled_yaml_loads_back(compiled):
    path, _ = compiled
    loaded = kfp_components.load_component_from_file(path)
    assert loaded.name == "genco-retraining"
    inputs = set(loaded.component_spec.inputs)
    assert {"catalog", "impressions", "model_store", "margin", "window_days"} <= inputs


# ------------------------------------------------------------------------ local run


def test_local_pipeline_deploys_then_gate_refuses_a_worse_model(world, tmp_path, capfd):
    store = str(tmp_path / "store")
    data = {
        "catalog": world.catalog,
        "impressions": world.impressions,
        "constraints": world.constraints,
        "ground_truth": world.ground_truth,
        "model_store": store,
    }
    first = local_demo(str(tmp_path / "run1"), {**data, "reward_epochs": 5, "rl_steps": 30})
    # Quiet by default: one line per task and the steps' progress lines on stderr; the
    # executor JSON and every step's output only in the log file.
    console = capfd.readouterr().err.splitlines()
    assert console[0] == "decide-canary: running" and "ingest: success" in console
    assert "[genco] decide-canary: nothing to decide (no canary is running)" in console
    assert "[genco] ingest: 6000 rows in, 6000 valid, 0 quarantined; 6000 in the window" in console
    assert any(re.fullmatch(r"\[genco\] attribute-rewards: \d+ epochs \(best \d+\), "
                            r"train_loss 0\.\d+, val_loss 0\.\d+; held-out AUC 0\.\d+, log loss "
                            r"0\.\d+", line) for line in console), console  # fmt: skip
    assert any(line.startswith("[genco] train-generator: 30 RL steps in ") for line in console)
    assert "[genco] deploy: promoted: " + first["production_version"] in console
    assert len(console) < 30 and not any("executor_input" in line for line in console)
    log = Path(first["log"]).read_text()
    assert "executor_input" in log and "reward model epoch 5/5: train_loss " in log
    assert "generator RL step 30/30: reward " in log
    assert Path(first["summary"]).read_text().startswith("# GenCO evaluation")
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
    # beat production by 50%. Refused, it becomes the store's canary on 20% of requests.
    worse = {**data, "reward_epochs": 1, "rl_steps": 0, "warm_start": False, "margin": 0.5}
    second = local_demo(str(tmp_path / "run2"), {**worse, "canary_share": 0.2})
    assert not second["deployed"] and second["gate"]["passed"] is False
    assert second["gate"]["candidate_value"] < second["gate"]["production_value"] * 1.5
    assert storage.read_bytes(storage.join(store, POINTER)) == pointer
    assert served.read_bytes() == served_before
    assert not (Path(second["pipeline_run"]) / "deploy").exists()  # branch skipped
    assert (Path(first["pipeline_run"]) / "deploy").is_dir()
    assert "REFUSED" in Path(second["report"]).read_text()
    canary = read_canary(store)
    assert canary["share"] == 0.2 and canary["production_version"] == v1
    assert f"[genco] start-canary: started: serving 20% of requests beside {v1}" in (
        capfd.readouterr().err.splitlines()
    )
    canary_config = Path(store, "kserve-canary", "config", "config.properties").read_text()
    assert f"genco-{canary['version']}.mar" in canary_config


# ------------------------------------------------------------------------------ CLI


def _cli(*argv: str) -> None:
    parser = argparse.ArgumentParser(prog="genco")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_cli_compile_needs_an_image_unless_local(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GENCO_IMAGE", raising=False)
    out = tmp_path / "retraining.yaml"
    with pytest.raises(ValueError, match="no component image: pass --image"):
        _cli("pipeline", "compile", "--out", str(out))
    assert not out.exists()
    _cli("pipeline", "compile", "--out", str(out), "--local")
    assert capsys.readouterr().out.strip() == str(out)
    assert "comp-deploy" in yaml.safe_load(out.read_text())["components"]
    # The image given is the one every step runs, even with the components imported
    # earlier under the placeholder.
    _cli("pipeline", "compile", "--out", str(out), "--image", "registry.test/genco:1.2.3")
    executors = yaml.safe_load(out.read_text())["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {"registry.test/genco:1.2.3"}
    assert kfp_components.load_component_from_file(str(out)).name == "genco-retraining"


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
