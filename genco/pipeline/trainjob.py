"""The distributed reward-model fit as a Kubeflow Trainer ``TrainJob`` (Trainer v2).

Why Trainer v2 and not the Training Operator's ``PyTorchJob``: Kubeflow Trainer v2 (the
``TrainJob`` API, ``trainer.kubeflow.org/v1alpha1``, with the ``torch-distributed``
ClusterTrainingRuntime, driven by the ``kubeflow`` SDK's ``TrainerClient``) is the project's
current engine since 2025; the Training Operator v1 and its ``kubeflow-training`` SDK (1.9.x)
are its predecessor, kept for existing users. Both SDKs install here; this module pins
``kubeflow==0.5.0`` (``kubeflow-trainer-api`` 2.3.0), whose own models build the spec.

The job runs ``torchrun -m genco.training.distributed`` on ``workers`` nodes of the project
image; the torch runtime sets ``PET_NNODES``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and
``PET_MASTER_PORT``, which torchrun reads, so the command is the same as on one machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import pandas as pd

from genco.data import storage
from genco.errors import ConfigError
from genco.models.checkpoint import METRICS_FILE, load_reward_model
from genco.models.reward import RewardModel, RewardModelConfig
from genco.training.reward_fit import TrainReport

if TYPE_CHECKING:
    from kubeflow_trainer_api import models

# The Trainer's default ClusterTrainingRuntime for PyTorch (torchrun, gloo or NCCL).
TORCH_RUNTIME = "torch-distributed"


def reward_trainjob(
    name: str,
    image: str,
    catalog: str,
    impressions: str,
    out: str,
    workers: int,
    config: RewardModelConfig | None = None,
    resources_per_node: dict | None = None,
    runtime: str = TORCH_RUNTIME,
) -> models.TrainerV1alpha1TrainJob:
    """A TrainJob that fits the reward model on ``workers`` nodes and writes it to ``out``
    (``gs://`` or ``s3://`` on a cluster). ``resources_per_node`` as the SDK takes it, e.g.
    ``{"cpu": 8, "memory": "32Gi", "gpu": 1}`` (with a GPU, use ``config.device='cuda'``)."""
    from kubeflow.trainer import CustomTrainerContainer
    from kubeflow.trainer.backends.kubernetes.utils import get_trainer_cr_from_custom_trainer
    from kubeflow.trainer.constants import constants
    from kubeflow.trainer.types.types import Runtime, RuntimeKind, RuntimeTrainer, TrainerType
    from kubeflow_trainer_api import models

    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    config = config or RewardModelConfig()
    torch_runtime = Runtime(
        name=runtime,
        trainer=RuntimeTrainer(TrainerType.CUSTOM_TRAINER, "torch", image),
        kind=RuntimeKind.CLUSTER_TRAINING_RUNTIME,
    )
    trainer = get_trainer_cr_from_custom_trainer(
        torch_runtime,
        CustomTrainerContainer(
            image=image,
            num_nodes=workers,
            resources_per_node=resources_per_node,
            env={"OMP_NUM_THREADS": "1"} if config.device != "cuda" else None,
        ),
    )
    trainer.command = ["torchrun"]
    trainer.args = [
        "-m", "genco.training.distributed",
        "--catalog", catalog, "--impressions", impressions, "--out", out,
        "--epochs", str(config.epochs), "--batch-size", str(config.batch_size),
        "--lr", str(config.lr), "--seed", str(config.seed), "--device", config.device,
        "--l2-id", str(config.l2_id), "--val-fraction", str(config.val_fraction),
        "--residual-sd", str(config.residual_sd), "--patience", str(config.patience),
    ]  # fmt: skip
    return models.TrainerV1alpha1TrainJob(
        apiVersion=constants.API_VERSION,
        kind=constants.TRAINJOB_KIND,
        metadata=models.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            name=name, labels={"app.kubernetes.io/part-of": "genco"}
        ),
        spec=models.TrainerV1alpha1TrainJobSpec(
            runtimeRef=models.TrainerV1alpha1RuntimeRef(
                name=torch_runtime.name, kind=torch_runtime.kind.value
            ),
            trainer=trainer,
        ),
    )


def submit_trainjob(
    job: models.TrainerV1alpha1TrainJob, namespace: str = "default", wait_seconds: int = 0
) -> str:
    """Create the TrainJob in the cluster of the current kube config; with ``wait_seconds``,
    wait (the SDK's TrainerClient) until it completes or fails. Returns its name."""
    from kubeflow.trainer import KubernetesBackendConfig, TrainerClient
    from kubeflow.trainer.constants import constants

    client = TrainerClient(KubernetesBackendConfig(namespace=namespace))
    client.backend.custom_api.create_namespaced_custom_object(
        constants.GROUP, constants.VERSION, namespace, constants.TRAINJOB_PLURAL, job.to_dict()
    )
    name = job.metadata.name
    if wait_seconds:
        client.wait_for_job_status(name, {constants.TRAINJOB_COMPLETE}, timeout=wait_seconds)
    return name


def launch_on_cluster(job: models.TrainerV1alpha1TrainJob, namespace: str, wait: int) -> None:
    """The default launcher: the TrainJob goes to the cluster, and this waits for it."""
    submit_trainjob(job, namespace, wait_seconds=wait)


def launch_here(job: models.TrainerV1alpha1TrainJob, namespace: str, wait: int) -> None:
    """The same job's command on this machine: torchrun with one process per node."""
    trainer = job.spec.trainer
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(trainer.num_nodes), *trainer.args]
    env = {**os.environ, **{e.name: e.value for e in trainer.env or []}}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=wait or None)
    if done.returncode:
        raise RuntimeError(f"distributed reward fit failed: {done.stderr[-2000:]}")


Launcher = Callable[["models.TrainerV1alpha1TrainJob", str, int], None]


def distributed_reward_fit(
    catalog_path: str,
    work_dir: str,
    workers: int,
    image: str,
    config: RewardModelConfig,
    namespace: str = "kubeflow",
    wait_seconds: int = 6 * 3600,
    launch: Launcher = launch_on_cluster,
    client=None,
) -> Callable[[pd.DataFrame], tuple[RewardModel, TrainReport]]:
    """What ``fit_and_attribute`` calls to fit elsewhere: the training rows are written to
    ``work_dir/train.parquet``, a TrainJob of ``workers`` nodes fits them into
    ``work_dir/model`` (``launch``: on the cluster, or ``launch_here``), and the model and
    its training report are read back."""

    def fit(train: pd.DataFrame) -> tuple[RewardModel, TrainReport]:
        storage.makedirs(work_dir)
        rows, model_dir = storage.join(work_dir, "train.parquet"), storage.join(work_dir, "model")
        storage.write_table(train, rows, client=client)
        name = f"genco-reward-{uuid.uuid4().hex[:8]}"
        job = reward_trainjob(name, image, catalog_path, rows, model_dir, workers, config)
        launch(job, namespace, wait_seconds)
        model, _ = load_reward_model(model_dir, client=client)
        metrics = storage.read_json(storage.join(model_dir, METRICS_FILE), client=client)
        return model, TrainReport(**metrics["train"])

    return fit
