"""``attribute_rewards``: fit the reward model and attribute clicks to elements."""

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
) -> float:
    """Train the multi-instance reward model on all but the latest 10% of ``data`` and write
    it with per-impression and per-element attributions; returns the held-out AUC (NaN when
    the held-out rows have a single class).

    Warm-starts from the production bundle of ``model_store`` when its vocabulary matches,
    so a daily retrain refines yesterday's model instead of starting over.
    """
    from genco.models.reward import RewardModelConfig
    from genco.pipeline.steps import attribute_step

    metrics = attribute_step(
        data.path,
        rewards.path,
        RewardModelConfig(epochs=epochs, seed=seed),
        model_store or None,
        warm_start,
    )
    return float(metrics.get("test", {}).get("auc", float("nan")))
