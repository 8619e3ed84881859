"""Run, compile and schedule the ``retraining`` pipeline (``pipelines/retraining.py``).

The same definition runs under ``kfp.local.SubprocessRunner`` (every step a subprocess of
this Python, genco installed), compiles to the YAML that Kubeflow Pipelines and Vertex AI
Pipelines run unchanged, and becomes a recurring run through ``kfp.Client``. The definition
is imported when needed: kfp stays out of everything else.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from types import ModuleType
from typing import Any

from genco.data import storage
from genco.errors import ConfigError, GencoError

# The one deliberate departure from GeneratorConfig.rl_steps, for `genco pipeline run` and
# the demo: on the small default world 100 generator updates already close ~95% of the gap
# (more only add minutes), so the local loop stays well under 3 minutes.
LOCAL_RL_STEPS = 100


def retraining_module(image: str | None = None) -> ModuleType:
    """The pipeline module, importing the components with ``image`` when given."""
    if image:
        os.environ["GENCO_IMAGE"] = image  # read by components.image at import
    try:
        import pipelines.retraining as module
    except ModuleNotFoundError as exc:
        if exc.name not in ("pipelines", "components"):
            raise
        raise GencoError(
            "the pipeline definition (pipelines/, components/) is not installed; install genco "
            "from a source checkout (pip install -e .)"
        ) from None
    return module


def compile_pipeline(out_path: str, image: str | None = None) -> str:
    """Write the pipeline YAML (KFP IR) for Kubeflow Pipelines / Vertex AI Pipelines; ``image``
    overrides the components' image."""
    from kfp import compiler

    compiler.Compiler().compile(retraining_module(image).retraining, package_path=out_path)
    return out_path


def run_local(arguments: dict[str, Any], pipeline_root: str | None = None) -> str:
    """Run the pipeline on this machine, each step a subprocess of this interpreter.

    ``use_venv=False``: the steps import genco from this environment, as they would from
    the image; nothing is installed. Returns the run's directory under ``pipeline_root``
    (one folder per task, one file or folder per output). Raises RuntimeError naming the
    failed step.
    """
    from kfp import local

    root = os.path.abspath(pipeline_root or tempfile.mkdtemp(prefix="genco-pipeline-"))
    os.makedirs(root, exist_ok=True)
    before = set(os.listdir(root))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=root)
    with warnings.catch_warnings():
        # The runner warns that the image name has no "python" in it: by design here,
        # the steps run in this interpreter, which has what the image has.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        # Resource requests are for the cluster; the local runner says it ignores them.
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        retraining_module().retraining(**arguments)
    new = sorted(set(os.listdir(root)) - before)
    return os.path.join(root, new[-1]) if new else root


def local_demo(out_dir: str, arguments: dict[str, Any] | None = None, seed: int = 0) -> dict:
    """``genco pipeline run``: the whole loop on this machine, by default on a simulated world.

    Without ``catalog``/``impressions`` in ``arguments`` it simulates the embedded default
    world into OUT/data first (and passes its ground truth to the report). The model store
    defaults to OUT/model_store, so running twice retrains against the first run's
    production model, warm-started from it. Returns what happened and one recommendation
    from the production model.
    """
    from genco.inference.predictor import Predictor
    from genco.store import current, current_version

    if storage.is_remote(out_dir):
        raise ConfigError(
            f"{out_dir}: the local runner needs a local working directory; put the model "
            "store on gs:// or s3:// instead (model_store / --store)"
        )
    args = dict(arguments or {})
    if not args.get("catalog"):
        from genco.worlds.simulate import simulate

        sim = simulate("default", seed=seed, out_dir=storage.join(out_dir, "data"))
        args.update(
            catalog=sim.catalog,
            impressions=sim.impressions,
            constraints=sim.constraints or "",
            ground_truth=sim.ground_truth,
        )
    args.setdefault("model_store", storage.join(out_dir, "model_store"))
    store = args["model_store"]
    before = current_version(store)
    run_dir = run_local(args, storage.join(out_dir, "pipeline_root"))
    after = current_version(store)
    gate_path = os.path.join(run_dir, "evaluate", "gate")
    gate = storage.read_json(gate_path) if os.path.exists(gate_path) else {}
    # The artifact has no extension; a copy named .html opens in any browser.
    report = os.path.join(out_dir, "report.html")
    storage.write_bytes(report, storage.read_bytes(os.path.join(run_dir, "evaluate", "report")))
    summary: dict[str, Any] = {
        "deployed": after is not None and after != before,
        "production_version": after,
        "production_before": before,
        "gate": {
            k: gate.get(k) for k in ("passed", "reason", "candidate_value", "production_value")
        },
        "report": report,
        "pipeline_run": run_dir,
        "model_store": store,
    }
    if after is not None:
        predictor = Predictor.load(current(store))
        ad = predictor.catalog.ads[0]
        ctx = dict.fromkeys(predictor.context_columns, 0.0) or None
        top = predictor.recommend(ad, ctx, top_k=1)[0]
        summary["sample_recommendation"] = {"ad_id": ad, **top.to_dict()}
    return summary


def schedule(
    host: str,
    cron: str,
    arguments: dict[str, Any],
    experiment: str = "genco",
    job_name: str = "genco-retraining-daily",
    pipeline_yaml: str | None = None,
    client: Any = None,
    image: str | None = None,
) -> dict[str, str]:
    """Create a recurring run on a Kubeflow Pipelines endpoint.

    ``cron`` has five fields ("0 3 * * *") or KFP's six (seconds first); five get a
    leading "0". One run at a time (``max_concurrency=1``: deploys into one store must not
    overlap) and no catch-up, so a paused or broken schedule does not fire a backlog.
    client: a ``kfp.Client`` (tests pass a stand-in); by default one for ``host``.
    """
    import kfp

    fields = cron.split()
    if len(fields) not in (5, 6):
        raise ConfigError(f"cron '{cron}' must have 5 fields (minute hour day month weekday)")
    kfp_cron = " ".join(["0", *fields]) if len(fields) == 5 else cron
    client = client or kfp.Client(host=host)
    with tempfile.TemporaryDirectory() as tmp:
        package = pipeline_yaml or compile_pipeline(os.path.join(tmp, "retraining.yaml"), image)
        exp = client.create_experiment(name=experiment)
        run = client.create_recurring_run(
            experiment_id=exp.experiment_id,
            job_name=job_name,
            cron_expression=kfp_cron,
            max_concurrency=1,
            no_catchup=True,
            params=arguments,
            pipeline_package_path=package,
            enable_caching=True,
        )
    return {
        "experiment_id": str(exp.experiment_id),
        "recurring_run_id": str(getattr(run, "recurring_run_id", "")),
        "cron": kfp_cron,
    }
