"""The Kubeflow Trainer TrainJob for a distributed reward fit: built by the SDK's own models,
checked against the API's schema by a round trip, and its command accepted by the worker."""

from __future__ import annotations

import pytest
import yaml

from genco.errors import ConfigError
from genco.models.reward import RewardModelConfig
from genco.pipeline.trainjob import reward_trainjob
from genco.training.distributed import parser


def job(**kw):
    args = {
        "name": "genco-reward-1",
        "image": "us-docker.pkg.dev/p/genco/genco:0.1.0",
        "catalog": "gs://b/catalog.csv",
        "impressions": "gs://b/impressions/",
        "out": "gs://b/runs/1/model",
        "workers": 4,
    }
    return reward_trainjob(**{**args, **kw})


def test_trainjob_spec_is_valid_and_runs_the_worker_under_torchrun():
    from kubeflow_trainer_api import models

    config = RewardModelConfig(epochs=7, seed=3, device="cuda")
    spec = job(config=config, resources_per_node={"cpu": 8, "memory": "32Gi", "gpu": 1})
    d = spec.to_dict()
    # What the cluster gets: the CRD's camelCase fields, and a strict round trip through the
    # API models (unknown or mistyped fields fail there).
    assert models.TrainerV1alpha1TrainJob.from_dict(d).to_dict() == d
    assert yaml.safe_load(yaml.safe_dump(d)) == d
    bad = {**d, "spec": {**d["spec"], "trainer": {**d["spec"]["trainer"], "numNodes": "four"}}}
    with pytest.raises(ValueError, match="numNodes"):  # the check can fail
        models.TrainerV1alpha1TrainJob.from_dict(bad)
    assert d["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and d["kind"] == "TrainJob"
    assert d["spec"]["runtimeRef"] == {
        "kind": "ClusterTrainingRuntime",
        "name": "torch-distributed",
    }
    trainer = d["spec"]["trainer"]
    assert trainer["numNodes"] == 4
    assert trainer["image"] == "us-docker.pkg.dev/p/genco/genco:0.1.0"
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 1
    assert trainer["command"] == ["torchrun"]
    assert trainer["args"][:2] == ["-m", "genco.training.distributed"]
    # The worker's own parser accepts the arguments and reads back the config.
    args = parser().parse_args(trainer["args"][2:])
    assert (args.epochs, args.seed, args.device) == (7, 3, "cuda")
    assert (args.catalog, args.out) == ("gs://b/catalog.csv", "gs://b/runs/1/model")


def test_cpu_jobs_pin_one_thread_per_worker_and_bad_worker_counts_are_refused():
    trainer = job(config=RewardModelConfig(device="cpu")).to_dict()["spec"]["trainer"]
    assert trainer["env"] == [{"name": "OMP_NUM_THREADS", "value": "1"}]
    with pytest.raises(ConfigError, match="workers must be >= 1, got 0"):
        job(workers=0)


def test_attribute_step_with_workers_fits_through_the_trainjobs_own_command(tmp_path):
    """workers > 1: the training rows go to the job, the job's command (run here by torchrun,
    one process per node) fits them, and the step attributes with the model it wrote."""
    from genco.pipeline.steps import attribute_step, ingest_step
    from genco.pipeline.trainjob import launch_here
    from genco.worlds.simulate import simulate

    sim = simulate("default", 0, str(tmp_path / "world"), n_impressions=20_000)
    ingest_step(sim.catalog, sim.impressions, str(tmp_path / "data"), sim.constraints)
    out = tmp_path / "rewards"
    config = RewardModelConfig(epochs=2, device="cpu")
    with pytest.raises(ConfigError, match="workers=2 needs the trainer image"):
        attribute_step(str(tmp_path / "data"), str(out), config, workers=2)
    metrics = attribute_step(
        str(tmp_path / "data"), str(out), config, workers=2, image="genco:test", launch=launch_here
    )
    assert metrics["warm_start"] == "none: distributed fit on 2 workers"
    job = yaml.safe_load((out / "distributed" / "model" / "reward_metrics.json").read_text())
    assert job["workers"] == 2
    assert metrics["train"]["train_rows"] + metrics["train"]["val_rows"] == 18_000  # not test
    assert metrics["test"]["auc"] > 0.5
    assert (out / "reward_model.pt").exists() and (out / "attributions.parquet").exists()
