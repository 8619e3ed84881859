"""``genco pipeline run|compile|schedule``, ``genco evaluate``, ``deploy``, ``rollback``,
``versions``, ``loop``: the command-line verbs of the retraining loop.

Registered on the main parser by ``add_commands`` so that ``genco.cli.main`` stays the single
entry point and error policy (user mistakes -> one line on stderr, exit 2). Each handler
parses nothing itself and makes one call into the library or the pipeline module.
"""

from __future__ import annotations

import argparse
from typing import Any

from genco.cli.common import add_config_args
from genco.cli.common import print_json as _print_json
from genco.errors import ConfigError, NotFoundError, StoreError
from genco.models.tables import REFINES


def _pipeline_arguments(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "window_days": args.window_days,
        "max_bad_fraction": args.max_bad_fraction,
        "reward_epochs": args.reward_epochs,
        "rl_steps": args.rl_steps,
        "seed": args.seed,
        "margin": args.margin,
        "served": args.served,
        "warm_start": not args.no_warm_start,
        "canary_share": args.canary_share,
    }
    for key in ("catalog", "impressions", "constraints", "ground_truth", "canary_data"):
        if getattr(args, key, None):
            out[key] = getattr(args, key)
    if getattr(args, "store", None):
        out["model_store"] = args.store
    return out


# ------------------------------------------------------------------------ handlers


def cmd_pipeline_run(args: argparse.Namespace) -> None:
    from genco.pipeline import runner

    if bool(args.catalog) != bool(args.impressions):
        raise ConfigError("give both --catalog and --impressions, or neither (simulated world)")
    _print_json(
        runner.local_demo(args.out, _pipeline_arguments(args), seed=args.seed, verbose=args.verbose)
    )


def cmd_pipeline_compile(args: argparse.Namespace) -> None:
    from genco.pipeline import runner
    from genco.pipeline.recommend import compile_recommend

    if args.pipeline == "recommend":
        path = args.out or "batch_recommend.yaml"
        print(compile_recommend(path, image=args.image, local=args.local))
        return
    print(
        runner.compile_pipeline(args.out or "retraining.yaml", image=args.image, local=args.local)
    )


def cmd_pipeline_recommend(args: argparse.Namespace) -> None:
    from genco.pipeline.recommend import run_recommend_local

    rows = run_recommend_local(
        args.model, args.out, args.shards, args.top_k, args.contexts or "", args.refine
    )
    _print_json({"out": args.out, "shards": args.shards, "rows": rows})


def cmd_pipeline_schedule(args: argparse.Namespace) -> None:
    from genco.pipeline.schedule import ScheduleTarget, schedule

    target = ScheduleTarget(
        host=args.host,
        namespace=args.namespace,
        service_account=args.service_account,
        pipeline_root=args.pipeline_root,
        token_file=args.token_file,
        experiment=args.experiment,
        job_name=args.job_name,
    )
    _print_json(
        schedule(
            args.cron,
            _pipeline_arguments(args),
            target,
            pipeline_yaml=args.pipeline_yaml,
            image=args.image,
            replace=args.replace,
        )
    )


def cmd_evaluate(args: argparse.Namespace) -> None:
    from genco.data import storage
    from genco.evaluation.evaluate import GATE_FILE, EvalConfig, run_evaluate

    result = run_evaluate(
        args.model,
        args.data,
        args.store,
        storage.join(args.out, GATE_FILE),
        storage.join(args.out, "report.html"),
        EvalConfig(margin=args.margin),
        args.ground_truth,
    )
    _print_json({**result.metrics(), "passed": result.passed, "reason": result.reason})


def cmd_deploy(args: argparse.Namespace) -> None:
    from genco.store import run_deploy

    hook = _serving_hook(args)
    result = run_deploy(args.model, args.store, args.gate_file, args.version, hook)
    _print_json(result.to_dict())
    if not result.deployed:
        raise StoreError(f"not deployed: {result.reason}")


def cmd_rollback(args: argparse.Namespace) -> None:
    from genco.store import rollback

    _print_json(rollback(args.store, args.to, _serving_hook(args)).to_dict())


def _serving_hook(args: argparse.Namespace):
    from genco.serving.archive import serving_hook

    return serving_hook(args.store, args.serving, args.management_url, args.key_file)


def _add_serving_flags(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--serving",
        action="store_true",
        help=f"also publish {what} as a .mar into STORE/kserve (KServe TorchServe layout); "
        "automatic once the store has that layout",
    )
    p.add_argument(
        "--management-url",
        default=None,
        help=f"TorchServe management URL: register {what} and make it the default "
        "(implies --serving)",
    )
    p.add_argument("--key-file", default=None, help="TorchServe key_file.json (token auth)")


def cmd_versions(args: argparse.Namespace) -> None:
    from genco.data import storage
    from genco.store import list_versions

    # A store that never had a version lists as []; a path with nothing at all is a typo.
    if not storage.exists(args.store):
        raise NotFoundError(f"{args.store}: no model store here (no such directory); check --store")
    _print_json(list_versions(args.store))


# -------------------------------------------------------------------------- parser


def _add_pipeline_params(
    p: argparse.ArgumentParser, data_required: bool, rl_steps_override: dict | None = None
) -> None:
    hint = "" if data_required else "; default: simulate the default world"
    p.add_argument(
        "--catalog", required=data_required, help=f"catalog CSV/Parquet (local or gs://){hint}"
    )
    p.add_argument("--impressions", required=data_required, help=f"impressions CSV/Parquet{hint}")
    p.add_argument("--constraints", default=None, help="forbidden pairs (optional)")
    p.add_argument(
        "--window-days",
        type=float,
        default=0.0,
        help="train on the last N days of the log, counted back from its newest timestamp "
        "(default 0 = all)",
    )
    from genco.data.ingest import IngestConfig
    from genco.evaluation.evaluate import EvalConfig
    from genco.models.generator import GeneratorConfig
    from genco.models.reward import RewardModelConfig

    add_config_args(p, IngestConfig, ["max_bad_fraction"])
    add_config_args(p, RewardModelConfig, ["epochs"], prefix="reward_")
    add_config_args(p, GeneratorConfig, ["rl_steps"], overrides=rl_steps_override)
    add_config_args(p, RewardModelConfig, ["seed"])  # seeds both models
    add_config_args(p, EvalConfig, ["margin", "served"])
    p.add_argument(
        "--no-warm-start", action="store_true", help="train from scratch, not from production"
    )
    p.add_argument("--ground-truth", default=None, help="simulated ground_truth.npz (report)")
    p.add_argument(
        "--canary-share",
        type=float,
        default=0.0,
        help="start a refused candidate as the store's canary on this share of requests "
        "(genco canary; default 0 = never)",
    )
    p.add_argument(
        "--canary-data",
        default=None,
        help="joined served log (genco validate --served-log --out): first promote or roll "
        "back the running canary on it",
    )


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``pipeline``, ``evaluate``, ``deploy``, ``rollback`` and ``versions``."""
    p = sub.add_parser(
        "pipeline",
        help="the Kubeflow retraining pipeline: run locally, compile, schedule",
        description="ingest -> attribute_rewards -> train_generator -> evaluate -> (if the "
        "candidate beats production by the margin) deploy.",
    )
    psub = p.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")

    run = psub.add_parser(
        "run",
        help="run the pipeline on this machine (kfp.local.SubprocessRunner)",
        description="Run every step as a local subprocess. Without --catalog/--impressions, "
        "simulate the embedded default world first. Prints the gate's decision, the "
        "production version and a sample recommendation from it.",
    )
    run.add_argument("--out", default="runs/pipeline", help="working dir (runs/pipeline)")
    run.add_argument("--store", default=None, help="model store (default OUT/model_store)")
    run.add_argument(
        "--verbose",
        action="store_true",
        help="show the local runner's whole log (executor JSON, every step's output); by "
        "default stderr shows one line per task and the steps' progress, OUT/pipeline.log all",
    )
    from genco.pipeline.runner import LOCAL_RL_STEPS

    _add_pipeline_params(run, data_required=False, rl_steps_override={"rl_steps": LOCAL_RL_STEPS})
    run.set_defaults(func=cmd_pipeline_run)

    comp = psub.add_parser(
        "compile",
        help="write the pipeline YAML for Kubeflow Pipelines / Vertex AI Pipelines",
        description="Compile the retraining pipeline to KFP IR YAML; upload it to a cluster as is.",
    )
    comp.add_argument(
        "--out", default=None, help="YAML path (retraining.yaml, batch_recommend.yaml)"
    )
    comp.add_argument(
        "--image", default=None, help="component image (default $GENCO_IMAGE; one is required)"
    )
    comp.add_argument(
        "--local",
        action="store_true",
        help="compile against the placeholder image (for the local runner, never a cluster)",
    )
    comp.add_argument(
        "--pipeline",
        choices=("retraining", "recommend"),
        default="retraining",
        help="retraining (default), or recommend: the catalog's recommendations fanned out "
        "over ad shards (dsl.ParallelFor)",
    )
    comp.set_defaults(func=cmd_pipeline_compile)

    rec = psub.add_parser(
        "recommend",
        help="run the batch-recommend pipeline on this machine: one task per ad shard",
        description="Recommend for every ad of a bundle, fanned out over --shards ad shards "
        "with KFP's ParallelFor on the local runner; one Parquet file per shard in --out.",
    )
    rec.add_argument("--model", required=True, help="bundle directory (local or gs://)")
    rec.add_argument("--out", required=True, help="directory for the shard files")
    rec.add_argument("--shards", type=int, default=2, help="ad shards (default 2)")
    rec.add_argument("--top-k", type=int, default=1, help="combinations per ad (default 1)")
    rec.add_argument("--contexts", default=None, help="ad_id + ctx_* rows (default: every ad)")
    rec.add_argument("--refine", choices=REFINES, default="pairs", help="as genco recommend")
    rec.set_defaults(func=cmd_pipeline_recommend)

    sch = psub.add_parser(
        "schedule",
        help="create a recurring run on a Kubeflow Pipelines endpoint",
        description="Create (or reuse) an experiment and a recurring run of the pipeline: one "
        "run at a time, no catch-up of missed runs. A recurring run of the same name is "
        "refused unless --replace.",
    )
    sch.add_argument("--host", default=None, help="KFP API endpoint URL ($KF_PIPELINES_ENDPOINT)")
    sch.add_argument("--cron", required=True, help='cron schedule, e.g. "0 3 * * *" (UTC)')
    sch.add_argument("--store", required=True, help="model store (gs://bucket/prefix)")
    sch.add_argument("--experiment", default="genco", help="experiment name (genco)")
    sch.add_argument("--job-name", default="genco-retraining-daily", help="recurring run name")
    sch.add_argument(
        "--replace",
        action="store_true",
        help="replace a recurring run of the same name (default: refuse, exit 2)",
    )
    sch.add_argument(
        "--namespace", default=None, help="Kubeflow profile namespace ($KF_PIPELINES_NAMESPACE)"
    )
    sch.add_argument(
        "--service-account",
        default=None,
        help="Kubernetes service account the runs use ($KF_PIPELINES_SERVICE_ACCOUNT)",
    )
    sch.add_argument(
        "--pipeline-root",
        default=None,
        help="where the runs' artifacts go, e.g. s3://bucket/pipeline-root "
        "($KF_PIPELINES_PIPELINE_ROOT; default: the installation's)",
    )
    sch.add_argument(
        "--token-file",
        default=None,
        help="service account token file, re-read on every call ($KF_PIPELINES_SA_TOKEN_PATH); "
        "or set KF_PIPELINES_TOKEN (bearer token) or KF_PIPELINES_COOKIES (session cookie)",
    )
    sch.add_argument("--pipeline-yaml", default=None, help="compiled YAML (default: compile)")
    sch.add_argument(
        "--image", default=None, help="component image to compile with (default $GENCO_IMAGE)"
    )
    _add_pipeline_params(sch, data_required=True)
    sch.set_defaults(func=cmd_pipeline_schedule)

    ev = sub.add_parser(
        "evaluate",
        help="score a bundle against the store's production model: gate + HTML report",
        description="Held-out AUC/log loss and the off-policy value (SNIPS) of each bundle's "
        "top-1 policy on validated impressions; writes OUT/gate.json and OUT/report.html.",
    )
    ev.add_argument("--model", required=True, help="candidate bundle directory")
    ev.add_argument(
        "--data",
        required=True,
        help="validated impressions: genco validate's impressions.parquet or its directory",
    )
    ev.add_argument("--store", default=None, help="model store holding production (optional)")
    from genco.evaluation.evaluate import EvalConfig

    add_config_args(ev, EvalConfig, ["margin"])
    ev.add_argument("--ground-truth", default=None, help="simulated ground_truth.npz")
    ev.add_argument("--out", required=True, help="directory for gate.json and report.html")
    ev.set_defaults(func=cmd_evaluate)

    dp = sub.add_parser(
        "deploy",
        help="promote a bundle into a model store (versioned, atomic pointer)",
        description="Copy a bundle to STORE/versions/<version>/ and point STORE/CURRENT.json "
        "at it. With --gate-file, refuse (exit 2, production unchanged) unless the "
        "evaluation passed for this bundle against the current production.",
    )
    dp.add_argument("--model", required=True, help="bundle directory")
    dp.add_argument("--store", required=True, help="model store (local dir or gs://)")
    dp.add_argument("--gate-file", default=None, help="gate.json from genco evaluate")
    dp.add_argument("--version", default=None, help="version id (default: time + sha)")
    _add_serving_flags(dp, "the new version")
    dp.set_defaults(func=cmd_deploy)

    rb = sub.add_parser(
        "rollback",
        help="point production back at the previous (or a given) version",
        description="Undo the last promotion (repeat to walk back), or --to a listed version.",
    )
    rb.add_argument("--store", required=True, help="model store (local dir or gs://)")
    rb.add_argument("--to", default=None, help="version id (see genco versions)")
    _add_serving_flags(rb, "the version rolled back to")
    rb.set_defaults(func=cmd_rollback)

    vs = sub.add_parser("versions", help="list the versions in a model store")
    vs.add_argument("--store", required=True, help="model store (local dir or gs://)")
    vs.set_defaults(func=cmd_versions)

    from genco.pipeline.loop import LOOP_FLAGS, LoopConfig

    lp = sub.add_parser(
        "loop",
        help="closed loop on a simulated world: serve, log, retrain, gate, repeat",
        description="Round 0 serves uniformly; each round then runs the retraining pipeline "
        "(local runner) on every round's served log so far, deploys through the gate into "
        "OUT/model_store and serves production with its exploration. Peers get the same "
        "requests. Writes OUT/rounds.csv, rounds.json and loop.png.",
    )
    lp.add_argument("--out", required=True, help="working directory (local)")
    add_config_args(lp, LoopConfig, LOOP_FLAGS)
    lp.add_argument("--quiet", action="store_true", help="no per-round lines on stderr")
    lp.set_defaults(func=cmd_loop)


def cmd_loop(args: argparse.Namespace) -> None:
    import sys

    from genco.cli.common import config_from_args
    from genco.pipeline.loop import LOOP_FLAGS, LoopConfig, run_loop

    if args.out.startswith(("gs://", "s3://")):
        raise ConfigError(f"{args.out}: the loop needs a local working directory")
    config = config_from_args(args, LoopConfig, LOOP_FLAGS)
    say = None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    summary = run_loop(args.out, config, progress=say)
    _print_json({"final": summary["final"], "out": args.out})
