"""``evaluate``: candidate vs production on the same data; the deploy gate and the report."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components.image import GENCO_IMAGE


@dsl.component(base_image=GENCO_IMAGE, install_kfp_package=False)
def evaluate(
    bundle: Input[Model],
    data: Input[Dataset],
    metrics: Output[Metrics],
    report: Output[HTML],
    summary: Output[Markdown],
    gate: Output[Artifact],
    model_store: str = "",
    margin: float = 0.0,
    ground_truth: str = "",
    served: str = "greedy",
) -> bool:
    """Score the candidate ``bundle`` and the production bundle of ``model_store`` on ``data``.

    ``metrics`` gets held-out AUC / log loss and each policy's off-policy value (SNIPS CTR
    with its interval); ``report`` an HTML page with reliability and learning curves and
    attribution plots; ``summary`` the verdict and figures as Markdown; ``gate`` the
    decision as JSON, which the deploy step re-checks.
    Returns the gate's decision: true when there is no production model or the candidate's
    value reaches production's x (1 + ``margin``). A single unnamed output, because local
    runs resolve ``dsl.If`` conditions only on a task's ``Output``.
    ``ground_truth``: a simulated world's ground_truth.npz, to add the true-CTR gap closed
    (never used by the gate). ``served``: the policy judged, "greedy" or "thompson".
    """
    from genco.pipeline.steps import evaluate_step

    return evaluate_step(
        bundle.path,
        data.path,
        model_store or None,
        margin,
        ground_truth or None,
        gate.path,
        report.path,
        summary.path,
        metrics.log_metric,
        served=served,
    ).passed
