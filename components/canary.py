"""``decide_canary`` and ``start_canary``: a refused candidate served beside production on a
share of traffic (KServe ``canaryTrafficPercent``), then promoted or rolled back on the
online A/B of the two arms' clicks (``genco.evaluation.canary``)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Input, Model

from components.image import GENCO_IMAGE


@dsl.component(base_image=GENCO_IMAGE, install_kfp_package=False)
def decide_canary(
    model_store: str,
    canary_data: str = "",
    margin: float = 0.0,
    min_impressions: int = 1000,
    serving: bool = True,
    management_url: str = "",
    key_file: str = "",
    canary_ab: str = "all",
) -> NamedTuple("CanaryDecision", [("action", str), ("version", str), ("reason", str)]):
    """Before the candidate is evaluated: decide the store's running canary, if any, on
    ``canary_data`` (the served log joined to its clicks: ``genco validate --served-log``'s
    output). ``action``: promoted, rolled_back, continue (too few canary impressions yet),
    or none (no canary running, or no ``canary_data`` given)."""
    from genco.pipeline.steps import decide_canary_step

    r = decide_canary_step(
        model_store,
        canary_data or None,
        margin,
        min_impressions,
        serving,
        management_url or None,
        key_file or None,
        canary_ab,
    )
    return (r.action, r.version or "", r.reason)


@dsl.component(base_image=GENCO_IMAGE, install_kfp_package=False)
def start_canary(
    bundle: Input[Model],
    gate: Input[Artifact],
    model_store: str,
    share: float = 0.0,
    serving: bool = True,
) -> NamedTuple("CanaryStart", [("action", str), ("version", str), ("reason", str)]):
    """When the offline gate refused the candidate: start it as the store's canary on
    ``share`` of the requests (0 = never; ``action`` none). One canary at a time: while one
    runs, ``action`` is refused and nothing changes."""
    from genco.pipeline.steps import start_canary_step

    r = start_canary_step(bundle.path, gate.path, model_store, share, serving)
    return (r.action, r.version or "", r.reason)
