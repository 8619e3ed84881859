"""``train_generator``: policy-gradient training against the reward model; a full bundle."""

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
) -> str:
    """Train the generator for ``rl_steps`` updates against the reward model in ``rewards``
    and write a complete bundle (the same layout ``genco train`` writes, manifest last);
    returns the bundle's warm-start source.

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
    return str(result["warm_start"])
