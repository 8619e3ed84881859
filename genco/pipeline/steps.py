"""The retraining pipeline's data and training steps, one function per KFP component.

The pipeline splits ``genco train`` into steps with their own artifacts (validated data,
reward model with attributions, complete bundle), so that each can be cached, retried and
inspected on its own. Each step reads only its input directories, never the caller's
original (possibly mutable) paths: the ingest step copies the catalog and constraints next
to the validated log, which makes the data directory self-contained.

Data directory (ingest's output)::

    impressions.parquet   valid rows inside the window (all valid rows when window_days=0)
    quarantine.csv, summary.json   as ``genco.data.ingest`` writes them (+ window counts)
    catalog.csv, constraints.csv   the catalog and constraints the rows were checked against

Warm start: the attribute and train steps start from the production bundle of the model
store (``genco.store.current``) when its vocabulary matches today's catalog and context
columns; otherwise they start fresh and record why in the bundle manifest.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import pandas as pd

from genco.data import storage
from genco.data.contract import (
    CONTEXT_PREFIX,
    TIMESTAMP,
    Catalog,
    Constraints,
    load_catalog,
    load_constraints,
)
from genco.data.ingest import QUARANTINE_FILE, SUMMARY_FILE, VALID_FILE, IngestConfig, ingest
from genco.errors import ConfigError, ContractError
from genco.models.checkpoint import (
    CATALOG,
    CONSTRAINTS,
    ELEMENT_FILE,
    IMPRESSION_FILE,
    MANIFEST,
    METRICS_FILE,
    REWARD_META,
    REWARD_WEIGHTS,
    load_generator,
    load_reward_model,
    verify_bundle,
)
from genco.models.generator import Generator, GeneratorConfig
from genco.models.reward import RewardModel, RewardModelConfig
from genco.models.vocab import Vocab
from genco.pipeline.logs import progress_lines, say
from genco.retries import call_with_retries
from genco.training.attribution import fit_and_attribute
from genco.training.bundle import finish_bundle

if TYPE_CHECKING:
    from google.cloud.storage import Client

T = TypeVar("T")


def _step(name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """A pipeline step: retried here on transient failures only (``genco.retries``; the
    pipeline sets no Kubeflow retry policy), with tqdm bars turned into log lines. Every
    step is idempotent (it rewrites its own outputs), so running it again is safe."""

    def wrap(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> T:
            with progress_lines():
                return call_with_retries(fn, *args, what=name, log=say, **kwargs)

        return run

    return wrap


REWARD_FILES = (REWARD_WEIGHTS, REWARD_META, IMPRESSION_FILE, ELEMENT_FILE, METRICS_FILE)
DAY_SECONDS = 86_400.0


# ------------------------------------------------------------------------- ingest


@_step("ingest")
def ingest_step(
    catalog_path: str,
    impressions_path: str,
    out_dir: str,
    constraints_path: str | None = None,
    window_days: float = 0.0,
    max_bad_fraction: float = IngestConfig.max_bad_fraction,
    quarantine_path: str | None = None,
    client: Client | None = None,
) -> dict:
    """Validate the log into a self-contained data directory, keeping the last window_days.

    The window is relative to the newest timestamp in the log, not to the wall clock, so
    re-running a step on the same data gives the same rows (idempotent, cacheable).
    quarantine_path: where to also publish the quarantine CSV (the pipeline's artifact).
    """
    if window_days < 0:
        raise ConfigError(f"window_days must be >= 0 (0 = all), got {window_days}")
    catalog = load_catalog(catalog_path, client=client)
    constraints = load_constraints(constraints_path or None, catalog, client=client)
    summary = ingest(
        impressions_path,
        catalog,
        constraints,
        out_dir,
        IngestConfig(max_bad_fraction=max_bad_fraction),
        client=client,
        progress=True,
    ).to_dict()
    valid_path = storage.join(out_dir, VALID_FILE)
    rows = summary["rows_valid"]
    if window_days > 0:
        frame = storage.read_table(valid_path, client=client)
        if TIMESTAMP not in frame.columns:
            raise ContractError(
                f"{impressions_path}: window_days={window_days} needs a 'timestamp' column"
            )
        newest = frame[TIMESTAMP].max()
        frame = frame[frame[TIMESTAMP] >= newest - window_days * DAY_SECONDS]
        storage.write_table(frame.reset_index(drop=True), valid_path, client=client)
        rows = len(frame)
    if rows == 0:
        raise ContractError(f"{impressions_path}: no valid impressions to train on")
    summary.update(window_days=window_days, rows_in_window=rows)
    storage.write_json(storage.join(out_dir, SUMMARY_FILE), summary, client=client)
    storage.write_table(catalog.to_arrow(), storage.join(out_dir, CATALOG), client=client)
    storage.write_table(
        constraints.to_frame(catalog), storage.join(out_dir, CONSTRAINTS), client=client
    )
    if quarantine_path:
        storage.write_bytes(
            quarantine_path,
            storage.read_bytes(storage.join(out_dir, QUARANTINE_FILE), client=client),
            client=client,
        )
    by_reason = sorted(summary.get("quarantined_by_reason", {}).items())
    reasons = ", ".join(f"{k}: {v}" for k, v in by_reason)
    say(
        f"ingest: {summary['rows_in']} rows in, {summary['rows_valid']} valid, "
        f"{summary['rows_quarantined']} quarantined{f' ({reasons})' if reasons else ''}; "
        f"{rows} in the window"
    )
    return summary


def load_dataset(
    data_dir: str, client: Client | None = None
) -> tuple[Catalog, Constraints, pd.DataFrame]:
    """Catalog, constraints and valid impressions of an ingest step's data directory."""
    catalog = load_catalog(storage.join(data_dir, CATALOG), client=client)
    constraints = load_constraints(storage.join(data_dir, CONSTRAINTS), catalog, client=client)
    frame = storage.read_table(storage.join(data_dir, VALID_FILE), client=client)
    return catalog, constraints, frame


# ---------------------------------------------------------------------- warm start


def _production_bundle(model_store: str | None, client: Client | None) -> str | None:
    if not model_store:
        return None
    from genco.store import current

    production = current(model_store, client=client)
    if production is not None:
        verify_bundle(production, client=client)  # warm starts trust only a whole bundle
    return production


def _context_columns(frame: pd.DataFrame) -> tuple[str, ...]:
    return tuple(c for c in frame.columns if c.startswith(CONTEXT_PREFIX))


def _warm_reward(
    production: str | None, catalog: Catalog, frame: pd.DataFrame, client: Client | None
) -> tuple[RewardModel | None, str]:
    if production is None:
        return None, "none"
    model, _ = load_reward_model(production, client=client)
    if model.vocab != Vocab.from_catalog(catalog, _context_columns(frame)):
        return None, "skipped: vocabulary changed"
    return model, production


def _warm_generator(
    production: str | None, catalog: Catalog, frame: pd.DataFrame, client: Client | None
) -> tuple[Generator | None, str]:
    if production is None:
        return None, "none"
    model = load_generator(production, client=client)
    if model.vocab != Vocab.from_catalog(catalog, _context_columns(frame)):
        return None, "skipped: vocabulary changed"
    return model, production


# ---------------------------------------------------------------------- attribute


@_step("attribute-rewards")
def attribute_step(
    data_dir: str,
    out_dir: str,
    config: RewardModelConfig | None = None,
    model_store: str | None = None,
    warm_start: bool = True,
    client: Client | None = None,
    workers: int = 1,
    image: str = "",
    namespace: str = "kubeflow",
    launch=None,
) -> dict:
    """Fit the reward model on the data directory and write it with its attribution tables.

    Held out: the latest 10% by time (``fit_and_attribute``), the same rows the evaluate
    step scores. Returns reward_metrics.json's content plus the warm-start source.

    ``workers > 1``: the fit runs as a Kubeflow Trainer TrainJob of that many nodes on
    ``image`` in ``namespace`` (``genco.pipeline.trainjob``; ``launch`` replaces the
    cluster, e.g. ``launch_here``), from a fresh start; the attribution stays here.
    """
    catalog, constraints, frame = load_dataset(data_dir, client=client)
    production = _production_bundle(model_store, client) if warm_start else None
    init, warm = _warm_reward(production, catalog, frame, client)
    trained = None
    if workers > 1 and not image:
        raise ConfigError(f"workers={workers} needs the trainer image the job's nodes run")
    if workers > 1:
        from genco.pipeline.trainjob import distributed_reward_fit, launch_on_cluster

        trained = distributed_reward_fit(
            storage.join(data_dir, CATALOG),
            storage.join(out_dir, "distributed"),
            workers,
            image,
            config or RewardModelConfig(),
            namespace,
            launch=launch or launch_on_cluster,
            client=client,
        )
        init, warm = None, f"none: distributed fit on {workers} workers"
    storage.makedirs(out_dir)
    say(f"attribute-rewards: {len(frame)} impressions, warm start: {warm}")
    metrics = fit_and_attribute(
        catalog,
        frame,
        out_dir,
        config,
        init=init,
        progress=True,
        client=client,
        constraints=constraints,
        trained=trained,
    )
    metrics["warm_start"] = warm
    _say_reward_fit(metrics)
    storage.write_json(storage.join(out_dir, METRICS_FILE), metrics, client=client)
    return metrics


# -------------------------------------------------------------------------- train


@_step("train-generator")
def train_step(
    data_dir: str,
    rewards_dir: str,
    out_dir: str,
    config: GeneratorConfig | None = None,
    model_store: str | None = None,
    warm_start: bool = True,
    client: Client | None = None,
) -> dict:
    """Train the generator against the attribute step's reward model; write a full bundle.

    The bundle has the same files and manifest as ``genco train`` writes, so the predictor,
    evaluation, deploy and serving treat both alike.
    """
    config = config or GeneratorConfig()
    catalog, constraints, frame = load_dataset(data_dir, client=client)
    storage.makedirs(out_dir)
    for name in REWARD_FILES:
        data = storage.read_bytes(storage.join(rewards_dir, name), client=client)
        storage.write_bytes(storage.join(out_dir, name), data, client=client)
    reward_metrics = storage.read_json(storage.join(out_dir, METRICS_FILE), client=client)
    production = _production_bundle(model_store, client) if warm_start else None
    init, warm = _warm_generator(production, catalog, frame, client)
    say(f"train-generator: {config.rl_steps} RL steps, warm start: {warm}")
    report, manifest = finish_bundle(
        catalog,
        constraints,
        frame,
        out_dir,
        config,
        init,
        {"warm_start": warm, "reward_warm_start": reward_metrics.get("warm_start", "none")},
        progress=True,
        client=client,
    )
    _say_rl(report.history, report.seconds)
    return {
        "generator_seconds": report.seconds,
        "final_reward": report.history[-1]["reward"] if report.history else None,
        "warm_start": warm,
        "manifest": storage.join(out_dir, MANIFEST),
        "created_at": manifest["created_at"],
    }


def _say_reward_fit(metrics: dict) -> None:
    train = metrics.get("train", {})
    history = train.get("history", [])
    for record in history:  # the log keeps every epoch; the console the summary below
        losses = " ".join(f"{k} {v:.5f}" for k, v in record.items() if k != "epoch")
        print(f"reward model epoch {record['epoch']}/{train.get('epochs')}: {losses}")
    test = metrics.get("test", {})
    last = history[-1] if history else {}
    say(
        f"attribute-rewards: {len(history)} epochs (best {train.get('best_epoch')}), "
        f"train_loss {last.get('train_loss', float('nan')):.5f}, "
        f"val_loss {last.get('val_loss', float('nan')):.5f}; held-out AUC "
        f"{test.get('auc', float('nan')):.4f}, log loss {test.get('log_loss', float('nan')):.5f}"
    )


def _say_rl(history: list[dict], seconds: float) -> None:
    every = max(1, len(history) // 10)
    for record in history:
        if record["step"] % every == 0 or record["step"] == 1:
            print(
                f"generator RL step {record['step']}/{len(history)}: reward "
                f"{record['reward']:.4f}, entropy {record['entropy']:.3f}"
            )
    final = history[-1]["reward"] if history else float("nan")
    say(f"train-generator: {len(history)} RL steps in {seconds:.0f} s, final reward {final:.4f}")


# ---------------------------------------------------------------- evaluate, deploy


@_step("evaluate")
def evaluate_step(
    bundle_dir: str,
    data_dir: str,
    model_store: str | None,
    margin: float,
    ground_truth: str | None,
    gate_path: str,
    report_path: str,
    summary_path: str | None = None,
    log_metric: Callable[[str, float], None] | None = None,
    client: Client | None = None,
    served: str = "greedy",
) -> Any:
    """The evaluate component's work: ``run_evaluate`` against the store's production,
    with the gate file, HTML report and Markdown summary; returns the ``EvalResult``."""
    from genco.evaluation.evaluate import EvalConfig, run_evaluate

    result = run_evaluate(
        bundle_dir,
        data_dir,
        model_store,
        gate_path,
        report_path,
        EvalConfig(margin=margin, served=served),
        ground_truth,
        log_metric,
        client,
        summary_path=summary_path,
    )
    say(f"evaluate: {'PASSED' if result.passed else 'REFUSED'}: {result.reason}")
    return result


@_step("deploy")
def deploy_step(
    bundle_dir: str,
    model_store: str,
    gate_path: str,
    serving: bool = True,
    management_url: str | None = None,
    key_file: str | None = None,
) -> Any:
    """The deploy component's work: the gate re-checked where the pointer moves, and the
    serving layout (and a running TorchServe) following it; returns the ``DeployResult``.
    Retrying is safe: the same bundle maps to the same version."""
    from genco.serving.archive import serving_hook
    from genco.store import run_deploy

    hook = serving_hook(model_store, serving, management_url, key_file)
    result = run_deploy(bundle_dir, model_store, gate_path, on_promote=hook)
    say(f"deploy: {result.reason}: {result.version}")
    return result


# ---------------------------------------------------------------- canary


@_step("decide-canary")
def decide_canary_step(
    model_store: str,
    data_dir: str | None,
    margin: float = 0.0,
    min_impressions: int = 1000,
    serving: bool = True,
    management_url: str | None = None,
    key_file: str | None = None,
    canary_ab: str = "all",
) -> Any:
    """The decide_canary component's work: the running canary, if any, promoted or rolled
    back on the joined served log at ``data_dir`` (``canary_ab``: its A/B on every request,
    or "triggered"); returns the ``CanaryResult``."""
    from genco.evaluation import canary
    from genco.serving.archive import serving_hook

    record = canary.read_canary(model_store)
    if record is None or data_dir is None:
        why = "no canary is running" if record is None else "no canary_data given"
        say(f"decide-canary: nothing to decide ({why})")
        return canary.CanaryResult("none", None, None, why)
    hook = serving_hook(model_store, serving, management_url, key_file)
    result = canary.run_decide(
        model_store, data_dir, margin, 0.95, min_impressions, hook, canary_ab=canary_ab
    )
    say(f"decide-canary: {result.action}: {result.reason}")
    return result


@_step("start-canary")
def start_canary_step(
    bundle_dir: str, gate_path: str, model_store: str, share: float, serving: bool = True
) -> Any:
    """The start_canary component's work (``genco.evaluation.canary.start``); share 0 = no
    canary (``action`` none)."""
    from genco.evaluation import canary
    from genco.serving.archive import canary_hook

    if share <= 0:
        say("start-canary: canary share is 0, no canary")
        return canary.CanaryResult("none", None, None, "canary share is 0")
    result = canary.run_start(
        bundle_dir, model_store, share, gate_path, canary_hook(model_store, serving)
    )
    say(f"start-canary: {result.action}: {result.reason}")
    return result
