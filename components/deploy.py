"""``deploy``: promote the bundle into the model store, re-checking the evaluation gate."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Input, Model

from components.image import GENCO_IMAGE


@dsl.component(base_image=GENCO_IMAGE, install_kfp_package=False)
def deploy(
    bundle: Input[Model],
    gate: Input[Artifact],
    model_store: str,
    serving: bool = True,
    management_url: str = "",
    key_file: str = "",
) -> NamedTuple("Deployment", [("deployed", bool), ("version", str), ("reason", str)]):
    """Copy ``bundle`` into ``model_store`` as a new version and move the production pointer.

    The gate is checked again here, where the pointer moves: a failed gate, a gate for
    another bundle, or a production model that changed since the evaluation leaves
    production untouched (``deployed`` false, ``reason`` says why). Retrying is safe: the
    same bundle maps to the same version.
    ``serving``: also publish the version as a .mar in ``model_store``/kserve, the layout an
    InferenceService with KServe's TorchServe runtime reads. ``management_url`` (and the
    TorchServe ``key_file`` for token auth): register it on a running TorchServe and make
    it the default. A publishing failure fails the step with production unchanged.
    """
    from genco.pipeline.steps import deploy_step

    result = deploy_step(
        bundle.path, model_store, gate.path, serving, management_url or None, key_file or None
    )
    return (result.deployed, result.version or "", result.reason)
