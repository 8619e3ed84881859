"""``train_generator``: policy-gradient training against the reward model; a full bundle."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.image import GENCO_IMAGE


@dsl.component(base_image=GENCO_IMAGE, install_kfp_package=False)
def train_generator(
    data: Input[Dataset],
    rewards: Input[Model],
    bundle: Output[Model],
    rl_steps: int = 300,
    seed: int = 0,
    model_store: str = "",
    warm_start: bool = True,
) -> NamedTuple(
    "GeneratorFit", [("warm_start", str), ("final_reward", float), ("train_seconds", float)]
):
    """Train the generator for ``rl_steps`` updates against the reward model in ``rewards``
    and write a complete bundle (the same layout ``genco train`` writes, manifest last).
    Outputs, named in the UI: the warm-start source, the mean reward (creative logit) of
    the last RL step's samples (NaN with no step) and the training time.

    Warm-starts from the production generator of ``model_store`` when its vocabulary
    matches; ``warm_start=False`` trains from scratch (e.g. after a catalog redesign).
    """
    from genco.models.generator import GeneratorConfig
    from genco.pipeline.steps import train_step

    result = train_step(
        data.path,
        rewards.path,
        bundle.path,
        GeneratorConfig(rl_steps=rl_steps, seed=seed),
        model_store or None,
        warm_start,
    )
    final = result["final_reward"]
    return (
        str(result["warm_start"]),
        float("nan") if final is None else float(final),
        float(result["generator_seconds"]),
    )
