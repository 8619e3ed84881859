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
) -> NamedTuple("Deployment", [("deployed", bool), ("version", str), ("reason", str)]):
    """Copy ``bundle`` into ``model_store`` as a new version and move the production pointer.

    The gate is checked again here, where the pointer moves: a failed gate, a gate for
    another bundle, or a production model that changed since the evaluation leaves
    production untouched (``deployed`` false, ``reason`` says why). Retrying is safe: the
    same bundle maps to the same version.
    """
    from genco.deploy import run_deploy

    result = run_deploy(bundle.path, model_store, gate.path)
    print(f"deploy: {result.reason}: {result.version}")
    return (result.deployed, result.version or "", result.reason)
