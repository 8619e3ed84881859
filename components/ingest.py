"""``ingest``: validate the raw log into a self-contained data directory."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Output

from components.image import GENCO_IMAGE


@dsl.component(base_image=GENCO_IMAGE, install_kfp_package=False)
def ingest(
    catalog: str,
    impressions: str,
    data: Output[Dataset],
    quarantine: Output[Dataset],
    constraints: str = "",
    window_days: float = 0.0,
    max_bad_fraction: float = 0.05,
) -> NamedTuple(
    "IngestCounts",
    [("rows_in", int), ("rows_valid", int), ("rows_quarantined", int), ("rows_in_window", int)],
):
    """Validate impressions (local or gs://) against the catalog and constraints.

    ``data`` gets the valid rows of the last ``window_days`` (0 = all) with copies of the
    catalog and constraints, so later steps never re-read the mutable source paths;
    ``quarantine`` gets every rejected row with its reason. Fails, after writing both, when
    more than ``max_bad_fraction`` of the rows are bad: training on a broken export is worse
    than not retraining.
    """
    from genco.pipeline.steps import ingest_step

    s = ingest_step(
        catalog,
        impressions,
        data.path,
        constraints or None,
        window_days,
        max_bad_fraction,
        quarantine.path,
    )
    return (s["rows_in"], s["rows_valid"], s["rows_quarantined"], s["rows_in_window"])
