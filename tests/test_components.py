"""Every component through ``.python_func()`` on a tiny world, chained as the pipeline does;
plus the shell rules: project image, nothing installed at runtime, genco imported in the body."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pytest
from kfp import dsl

from components import (
    GENCO_IMAGE,
    attribute_rewards,
    deploy,
    evaluate,
    ingest,
    train_generator,
)
from genco.data import storage
from genco.inference.predictor import Predictor
from genco.store import bundle_digest, current_version, read_pointer
from genco.worlds.simulate import SimulationOutputs, simulate, world_config

if TYPE_CHECKING:
    from tests.conftest import GcsEmulator

COMPONENTS = {
    "ingest": ingest,
    "attribute_rewards": attribute_rewards,
    "train_generator": train_generator,
    "evaluate": evaluate,
    "deploy": deploy,
}
COMPONENT_DIR = Path(__file__).resolve().parents[1] / "components"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SimulationOutputs:
    out = tmp_path_factory.mktemp("components_world")
    return simulate(world_config("default", n_ads=4), seed=3, out_dir=str(out), n_impressions=4000)


@pytest.fixture(scope="module")
def chain(world: SimulationOutputs, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """ingest -> attribute_rewards -> train_generator, run once for the module."""
    root = tmp_path_factory.mktemp("chain")
    data = dsl.Dataset(uri=str(root / "data"))
    quarantine = dsl.Dataset(uri=str(root / "quarantine.csv"))
    counts = ingest.python_func(
        catalog=world.catalog,
        impressions=world.impressions,
        data=data,
        quarantine=quarantine,
        constraints=world.constraints,
    )
    rewards = dsl.Model(uri=str(root / "rewards"))
    auc = attribute_rewards.python_func(data=data, rewards=rewards, epochs=3)
    bundle = dsl.Model(uri=str(root / "bundle"))
    warm = train_generator.python_func(data=data, rewards=rewards, bundle=bundle, rl_steps=5)
    return {
        "root": root,
        "data": data,
        "quarantine": quarantine,
        "counts": counts,
        "rewards": rewards,
        "auc": auc,
        "bundle": bundle,
        "warm": warm,
    }


def test_ingest_outputs_data_quarantine_and_counts(chain):
    rows_in, rows_valid, rows_quarantined, rows_in_window = chain["counts"]
    assert (rows_in, rows_valid, rows_quarantined, rows_in_window) == (4000, 4000, 0, 4000)
    data = Path(chain["data"].path)
    for name in ("impressions.parquet", "summary.json", "catalog.csv", "constraints.csv"):
        assert (data / name).is_file(), name
    q = pd.read_csv(chain["quarantine"].path)
    assert list(q.columns[:2]) == ["row", "ad_id"] and len(q) == 0


def test_ingest_quarantines_bad_rows_and_keeps_the_window(world, tmp_path):
    log = pd.read_csv(world.impressions, dtype=str)
    log.loc[0, "click"] = "2"
    log.loc[1, "ad_id"] = "nope"
    raw = tmp_path / "raw.csv"
    log.to_csv(raw, index=False)
    data = dsl.Dataset(uri=str(tmp_path / "data"))
    quarantine = dsl.Dataset(uri=str(tmp_path / "q.csv"))
    rows_in, rows_valid, rows_quarantined, rows_in_window = ingest.python_func(
        catalog=world.catalog,
        impressions=str(raw),
        data=data,
        quarantine=quarantine,
        constraints=world.constraints,
        window_days=10.0,
    )
    assert (rows_in, rows_valid, rows_quarantined) == (4000, 3998, 2)
    assert sorted(pd.read_csv(quarantine.path)["reason_code"]) == ["bad_click", "unknown_ad"]
    kept = pd.read_parquet(Path(data.path) / "impressions.parquet")
    assert len(kept) == rows_in_window and 0 < rows_in_window < rows_valid
    assert kept["timestamp"].max() - kept["timestamp"].min() <= 10 * 86_400
    summary = json.loads((Path(data.path) / "summary.json").read_text())
    assert summary["rows_in_window"] == rows_in_window and summary["window_days"] == 10.0


def test_ingest_window_needs_timestamps(world, tmp_path):
    log = pd.read_csv(world.impressions, dtype=str).drop(columns=["timestamp"])
    raw = tmp_path / "raw.csv"
    log.to_csv(raw, index=False)
    with pytest.raises(ValueError, match="window_days=5.0 needs a 'timestamp' column"):
        ingest.python_func(
            catalog=world.catalog,
            impressions=str(raw),
            data=dsl.Dataset(uri=str(tmp_path / "d")),
            quarantine=dsl.Dataset(uri=str(tmp_path / "q.csv")),
            window_days=5.0,
        )


def test_attribute_rewards_writes_model_and_attributions(chain):
    rewards = Path(chain["rewards"].path)
    for name in (
        "reward_model.pt",
        "reward_model.json",
        "attributions.parquet",
        "element_attribution.csv",
        "reward_metrics.json",
    ):
        assert (rewards / name).is_file(), name
    auc, log_loss, epochs_run, warm = chain["auc"]  # named outputs, in signature order
    assert 0.0 < auc <= 1.0 and log_loss > 0
    assert epochs_run >= 1 and warm == "none"
    assert json.loads((rewards / "reward_metrics.json").read_text())["warm_start"] == "none"


def test_train_generator_writes_a_complete_bundle(chain):
    bundle = chain["bundle"].path
    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    assert {"generator.pt", "reward_model.pt", "catalog.csv"} <= set(manifest["files"])
    warm, final_reward, seconds = chain["warm"]
    assert warm == "none" and manifest["warm_start"] == "none"
    assert final_reward == final_reward and seconds > 0  # a number, not NaN
    recs = Predictor.load(bundle).recommend("ad_0000", top_k=2)
    assert [r.rank for r in recs] == [1, 2]


def test_evaluate_logs_metrics_html_and_gate(chain, tmp_path):
    metrics = dsl.Metrics(uri=str(tmp_path / "metrics"))
    report = dsl.HTML(uri=str(tmp_path / "report.html"))
    summary = dsl.Markdown(uri=str(tmp_path / "summary.md"))
    gate = dsl.Artifact(uri=str(tmp_path / "gate.json"))
    passed = evaluate.python_func(
        bundle=chain["bundle"],
        data=chain["data"],
        metrics=metrics,
        report=report,
        summary=summary,
        gate=gate,
    )
    assert passed is True
    assert {"candidate_auc", "candidate_log_loss", "candidate_matched", "passed"} <= set(
        metrics.metadata
    )
    # a policy value where some held-out row shows the candidate's choice (on this 4,000-row
    # log, 125 combinations an ad, it may show none: then no value, and the matched count 0)
    matched = metrics.metadata["candidate_matched"]
    assert ("candidate_value" in metrics.metadata) == (matched > 0)
    page = Path(report.path).read_text()
    assert page.count("data:image/png;base64,") == 4 and "PASSED" in page
    decision = json.loads(Path(gate.path).read_text())
    assert decision["passed"] is True and decision["production_version"] is None
    md = Path(summary.path).read_text()
    assert md.startswith("# GenCO evaluation\n")
    assert "**PASSED: deploy**: no production model: first deployment" in md
    candidate = next(line for line in md.splitlines() if line.startswith("| candidate |"))
    assert f"{metrics.metadata['candidate_auc']:.4f}" in candidate
    assert "| production | none |" in md


def test_deploy_promotes_then_evaluate_against_production_and_refuse(chain, tmp_path):
    store = str(tmp_path / "store")
    gate = dsl.Artifact(uri=str(tmp_path / "gate.json"))
    evaluate.python_func(
        bundle=chain["bundle"],
        data=chain["data"],
        metrics=dsl.Metrics(uri=str(tmp_path / "m")),
        report=dsl.HTML(uri=str(tmp_path / "r.html")),
        summary=dsl.Markdown(uri=str(tmp_path / "r.md")),
        gate=gate,
        model_store=store,
    )
    deployed, version, reason = deploy.python_func(
        bundle=chain["bundle"], gate=gate, model_store=store
    )
    assert deployed and reason == "promoted" and current_version(store) == version
    # Published for serving by default: the KServe layout serves the promoted version.
    served = Path(store, "kserve", "config", "config.properties")
    assert f"genco-{version}.mar" in served.read_text()
    assert Path(store, "kserve", "model-store", f"genco-{version}.mar").stat().st_size > 0

    # The same model again, required to beat itself by 10%: the gate refuses, and a deploy
    # that is forced through anyway still refuses on the gate file.
    gate2 = dsl.Artifact(uri=str(tmp_path / "gate2.json"))
    passed = evaluate.python_func(
        bundle=chain["bundle"],
        data=chain["data"],
        metrics=dsl.Metrics(uri=str(tmp_path / "m2")),
        report=dsl.HTML(uri=str(tmp_path / "r2.html")),
        summary=dsl.Markdown(uri=str(tmp_path / "r2.md")),
        gate=gate2,
        model_store=store,
        margin=0.1,
    )
    assert passed is False
    assert json.loads(Path(gate2.path).read_text())["production_version"] == version
    pointer = read_pointer(store)
    deployed, _, reason = deploy.python_func(bundle=chain["bundle"], gate=gate2, model_store=store)
    # Same bundle as production: nothing to change, whatever the gate says.
    assert deployed and reason == "already the current version"
    assert read_pointer(store) == pointer
    assert f"genco-{version}.mar" in served.read_text()


def test_warm_start_from_the_store(chain, tmp_path):
    store = str(tmp_path / "store")
    gate = dsl.Artifact(uri=str(tmp_path / "gate.json"))
    # A first production, as a gate bound to this bundle would let it in (empty store).
    digest = bundle_digest(chain["bundle"].path)
    storage.write_json(
        gate.path, {"passed": True, "candidate_digest": digest, "production_version": None}
    )
    deploy.python_func(bundle=chain["bundle"], gate=gate, model_store=store)
    rewards = dsl.Model(uri=str(tmp_path / "rewards"))
    attribute_rewards.python_func(data=chain["data"], rewards=rewards, epochs=1, model_store=store)
    bundle = dsl.Model(uri=str(tmp_path / "bundle"))
    warm = train_generator.python_func(
        data=chain["data"], rewards=rewards, bundle=bundle, rl_steps=1, model_store=store
    )[0]
    assert warm.endswith(current_version(store))
    manifest = json.loads((Path(bundle.path) / "manifest.json").read_text())
    assert manifest["warm_start"] == manifest["reward_warm_start"] == warm


def test_gcs_paths_end_to_end(world, gcs: GcsEmulator, tmp_path):
    """Inputs and model store on gs:// (the emulator); artifacts stay local as on KFP."""
    root = gcs.url("")
    remote = {}
    for name in ("catalog", "impressions", "constraints"):
        local = getattr(world, name)
        remote[name] = storage.join(root, Path(local).name)
        storage.write_bytes(remote[name], storage.read_bytes(local))
    data = dsl.Dataset(uri=str(tmp_path / "data"))
    counts = ingest.python_func(
        data=data, quarantine=dsl.Dataset(uri=str(tmp_path / "q.csv")), **remote
    )
    assert counts[1] == 4000
    rewards = dsl.Model(uri=str(tmp_path / "rewards"))
    attribute_rewards.python_func(data=data, rewards=rewards, epochs=1)
    bundle = dsl.Model(uri=str(tmp_path / "bundle"))
    train_generator.python_func(data=data, rewards=rewards, bundle=bundle, rl_steps=1)
    store = storage.join(root, "store")
    gate = dsl.Artifact(uri=str(tmp_path / "gate.json"))
    assert evaluate.python_func(
        bundle=bundle,
        data=data,
        metrics=dsl.Metrics(uri=str(tmp_path / "m")),
        report=dsl.HTML(uri=str(tmp_path / "r.html")),
        summary=dsl.Markdown(uri=str(tmp_path / "r.md")),
        gate=gate,
        model_store=store,
    )
    deployed, version, _ = deploy.python_func(bundle=bundle, gate=gate, model_store=store)
    assert deployed and storage.exists(storage.join(store, "versions", version, "manifest.json"))
    assert current_version(store) == version


# ----------------------------------------------------------------------- shell rules


@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_component_runs_on_project_image_without_installs(name):
    container = COMPONENTS[name].component_spec.implementation.container
    assert container.image == GENCO_IMAGE
    script = " ".join([*container.command, *(container.args or [])])
    assert "pip install" not in script and "packages_to_install" not in script


@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_component_module_imports_only_stdlib_and_kfp_at_top_level(name):
    tree = ast.parse((COMPONENT_DIR / f"{name}.py").read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            top.add((node.module or "").split(".")[0])
    assert top <= {"typing", "kfp", "components"}, top
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef))
    inner = {n.module.split(".")[0] for n in ast.walk(func) if isinstance(n, ast.ImportFrom)}
    assert inner == {"genco"}


def test_warm_start_refuses_a_tampered_production(chain, tmp_path):
    """The retraining steps trust a production bundle only when it matches its manifest."""
    from genco.errors import BundleError
    from genco.store import current

    store = str(tmp_path / "store")
    gate = dsl.Artifact(uri=str(tmp_path / "gate.json"))
    digest = bundle_digest(chain["bundle"].path)
    storage.write_json(
        gate.path, {"passed": True, "candidate_digest": digest, "production_version": None}
    )
    deploy.python_func(bundle=chain["bundle"], gate=gate, model_store=store)
    (Path(current(store)) / "constraints.csv").write_text("")  # changed after the manifest
    rewards = dsl.Model(uri=str(tmp_path / "rewards"))
    with pytest.raises(BundleError, match="constraints.csv"):
        attribute_rewards.python_func(
            data=chain["data"], rewards=rewards, epochs=1, model_store=store
        )
