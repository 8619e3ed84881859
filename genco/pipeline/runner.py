"""Run, compile and schedule the ``retraining`` pipeline (``pipelines/retraining.py``).

The same definition runs under ``kfp.local.SubprocessRunner`` (every step a subprocess of
this Python, genco installed), compiles to the YAML that Kubeflow Pipelines and Vertex AI
Pipelines run unchanged, and becomes a recurring run through ``kfp.Client``. The definition
is imported when needed: kfp stays out of everything else.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from types import ModuleType
from typing import Any

from genco.data import storage
from genco.errors import ConfigError, GencoError, StepError
from genco.pipeline.logs import RunLog, failed_step, root_cause

# The one deliberate departure from GeneratorConfig.rl_steps, for `genco pipeline run` and
# the demo: on the small default world 100 generator updates already close ~95% of the gap
# (more only add minutes), so the local loop stays well under 3 minutes.
LOCAL_RL_STEPS = 100


def pipeline_module(name: str) -> ModuleType:
    """``pipelines.<name>`` (the KFP pipeline definitions ship beside the library, in a source
    checkout or the project image)."""
    import importlib

    try:
        return importlib.import_module(f"pipelines.{name}")
    except ModuleNotFoundError as exc:
        if exc.name not in ("pipelines", f"pipelines.{name}", "components"):
            raise
        raise GencoError(
            "the pipeline definition (pipelines/, components/) is not installed; install genco "
            "from a source checkout (pip install -e .)"
        ) from None


def retraining_module() -> ModuleType:
    """The pipeline module (``compile_pipeline`` sets the image in the YAML it writes)."""
    return pipeline_module("retraining")


def compile_pipeline(out_path: str, image: str | None = None, local: bool = False) -> str:
    """Write the pipeline YAML (KFP IR) for Kubeflow Pipelines / Vertex AI Pipelines.

    Every step runs ``image`` (default ``$GENCO_IMAGE``). Without one the YAML would name
    the placeholder image, which no cluster can pull: that is refused unless ``local``
    (a YAML for the local runner or for tests, which never pull an image).
    """
    from kfp import compiler

    image = require_image(image, local)
    compiler.Compiler().compile(retraining_module().retraining, package_path=out_path)
    if image is not None:
        _set_image(out_path, image)
    return out_path


def require_image(image: str | None, local: bool) -> str | None:
    """``image``, else ``$GENCO_IMAGE``; neither is an error unless ``local`` (None: the
    placeholder image, for the local runner or tests, which never pull one)."""
    image = image or os.environ.get("GENCO_IMAGE") or None
    if image is None and not local:
        raise ConfigError(
            "no component image: pass --image REGISTRY/genco:TAG (built from "
            "Dockerfiles/component.Dockerfile) or set GENCO_IMAGE; --local compiles against "
            "the placeholder image for the local runner"
        )
    return image


def _set_image(path: str, image: str) -> None:
    # components.image is read once, at import: if the components were imported before
    # (another compile, a test), they still name the old image. The YAML is the contract,
    # so every executor's image is set there.
    import yaml

    with open(path, encoding="utf-8") as f:
        docs = list(yaml.safe_load_all(f))  # the pipeline spec, then any platform spec
    for executor in docs[0]["deploymentSpec"]["executors"].values():
        executor["container"]["image"] = image
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump_all(docs, f, sort_keys=False)


def run_local(
    arguments: dict[str, Any],
    pipeline_root: str | None = None,
    log_path: str | None = None,
    verbose: bool = False,
) -> str:
    """Run the pipeline on this machine, each step a subprocess of this interpreter.

    ``use_venv=False``: the steps import genco from this environment, as they would from
    the image; nothing is installed. Everything the runner and the steps print goes to
    ``log_path`` (default PIPELINE_ROOT/pipeline.log); stderr shows one line per task and
    the steps' ``[genco]`` progress lines, or everything with ``verbose``. Returns the run's
    directory under ``pipeline_root`` (one folder per task, one file or folder per output).
    A failed step raises ``StepError`` naming the step and the error that ended it.
    """
    from kfp import local

    root = os.path.abspath(pipeline_root or tempfile.mkdtemp(prefix="genco-pipeline-"))
    os.makedirs(root, exist_ok=True)
    log_path = os.path.abspath(log_path or os.path.join(root, "pipeline.log"))
    before = set(os.listdir(root))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=root)
    run_log = RunLog(log_path, sys.stderr, verbose)
    try:
        with (
            contextlib.redirect_stdout(run_log),
            contextlib.redirect_stderr(run_log),
            warnings.catch_warnings(),
        ):
            # The runner warns that the image name has no "python" in it: by design here,
            # the steps run in this interpreter, which has what the image has.
            warnings.filterwarnings("ignore", message=".*non-Python base image.*")
            # Resource requests are for the cluster; the local runner ignores them.
            warnings.filterwarnings("ignore", message=".*have no effect in the current local.*")
            retraining_module().retraining(**arguments)
    except RuntimeError as exc:
        run_log.close()
        with open(log_path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        failed = failed_step(text)
        if failed is None:
            raise
        raise _step_error(failed, text, log_path) from exc
    finally:
        if not run_log.closed:
            run_log.close()
    new = sorted(set(os.listdir(root)) - before - {os.path.basename(log_path)})
    return os.path.join(root, new[-1]) if new else root


def _step_error(step: str, log_text: str, log_path: str) -> StepError:
    cause = root_cause(log_text, step)
    if cause is None:
        return StepError(
            step,
            f"step '{step}' failed without a Python error (killed, or out of memory?); "
            f"see its log in {log_path}",
            log_path,
        )
    name = cause.type_name.rpartition(".")[2]
    return StepError(
        step,
        f"step '{step}' failed: {name}: {cause.message}; full log: {log_path}",
        log_path,
        cause.exception_type(),
        cause.traceback,
    )


def local_demo(
    out_dir: str, arguments: dict[str, Any] | None = None, seed: int = 0, verbose: bool = False
) -> dict:
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
    os.makedirs(out_dir, exist_ok=True)
    log = os.path.join(out_dir, "pipeline.log")
    run_dir = run_local(args, storage.join(out_dir, "pipeline_root"), log, verbose)
    after = current_version(store)
    gate_path = os.path.join(run_dir, "evaluate", "gate")
    gate = storage.read_json(gate_path) if os.path.exists(gate_path) else {}
    # The artifact has no extension; a copy named .html opens in any browser.
    report = os.path.join(out_dir, "report.html")
    storage.write_bytes(report, storage.read_bytes(os.path.join(run_dir, "evaluate", "report")))
    summary_md = os.path.join(out_dir, "summary.md")
    storage.write_bytes(
        summary_md, storage.read_bytes(os.path.join(run_dir, "evaluate", "summary"))
    )
    summary: dict[str, Any] = {
        "deployed": after is not None and after != before,
        "production_version": after,
        "production_before": before,
        "gate": {
            k: gate.get(k) for k in ("passed", "reason", "candidate_value", "production_value")
        },
        "report": report,
        "summary": summary_md,
        "pipeline_run": run_dir,
        "log": log,
        "model_store": store,
    }
    if after is not None:
        predictor = Predictor.load(current(store))
        ad = predictor.catalog.ads[0]
        ctx = dict.fromkeys(predictor.context_columns, 0.0) or None
        top = predictor.recommend(ad, ctx, top_k=1)[0]
        summary["sample_recommendation"] = {"ad_id": ad, **top.to_dict()}
    return summary
