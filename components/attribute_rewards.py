"""``attribute_rewards``: fit the reward model and attribute clicks to elements."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.image import GENCO_IMAGE


@dsl.component(base_image=GENCO_IMAGE, install_kfp_package=False)
def attribute_rewards(
    data: Input[Dataset],
    rewards: Output[Model],
    epochs: int = 30,
    seed: int = 0,
    model_store: str = "",
    warm_start: bool = True,
    workers: int = 1,
    trainer_image: str = "",
) -> NamedTuple(
    "RewardFit",
    [("heldout_auc", float), ("heldout_log_loss", float), ("epochs_run", int), ("warm_start", str)],
):
    """Train the multi-instance reward model on all but the latest 10% of ``data`` and write
    it with per-impression and per-element attributions. Outputs, named in the UI: the
    held-out AUC and log loss (NaN when the held-out rows have a single class), the epochs
    run (early stopping) and the warm-start source.

    Warm-starts from the production bundle of ``model_store`` when its vocabulary matches,
    so a daily retrain refines yesterday's model instead of starting over. ``workers`` > 1:
    the fit runs as a Kubeflow Trainer TrainJob of that many nodes on ``trainer_image``,
    reading and writing the artifacts' object-store URIs.
    """
    from genco.models.reward import RewardModelConfig
    from genco.pipeline.steps import attribute_step

    remote = workers > 1  # the job's nodes reach the artifacts by URI, not this pod's mount
    metrics = attribute_step(
        data.uri if remote else data.path,
        rewards.uri if remote else rewards.path,
        RewardModelConfig(epochs=epochs, seed=seed),
        model_store or None,
        warm_start,
        workers=workers,
        image=trainer_image,
    )
    test = metrics.get("test", {})
    return (
        float(test.get("auc", float("nan"))),
        float(test.get("log_loss", float("nan"))),
        len(metrics["train"]["history"]),
        str(metrics["warm_start"]),
    )
