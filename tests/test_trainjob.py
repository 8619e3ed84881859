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
