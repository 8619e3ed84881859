"""The ``genco`` command line: a thin shell over the library.

Expected failures (bad files, bad flags, failed validation, missing credentials, an unreachable
or refusing server) print one clear line to stderr and exit with status 2; only bugs produce
tracebacks. ``genco.cli.common.expected_errors`` lists them.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable, Sequence

from genco import __version__
from genco.cli.common import (
    add_config_args,
    bug_in_step,
    config_from_args,
    error_message,
    expected_errors,
)
from genco.cli.common import print_json as _print_json
from genco.errors import ConfigError
from genco.models.tables import REFINES

# Config fields each command exposes as flags (names, types, defaults and help from the
# dataclass; see add_config_args). --seed seeds both models of `genco train`.
_INGEST = ("max_bad_fraction",)
_CHUNKS = ("chunk_rows",)
_ATTRIBUTE = ("epochs", "dim", "dim3", "propensity_weighting", "seed", "device")
_TRAIN_REWARD = ("epochs", "seed", "device")
_TRAIN_GEN = ("rl_steps",)


def cmd_simulate(args: argparse.Namespace) -> None:
    from genco.worlds.simulate import simulate, world_summary

    if args.n_impressions is not None and args.n_impressions < 1:
        raise ConfigError(f"n_impressions must be >= 1, got {args.n_impressions}")
    if args.world == "catalog":
        _simulate_catalog(args)
        return
    if args.n_ads is not None:
        raise ConfigError("--n-ads is for --world catalog; the presets fix their ads")
    out = simulate(
        args.world,
        seed=args.seed,
        out_dir=args.out,
        n_impressions=args.n_impressions,
        impressions_format=args.format,
    )
    _print_json(world_summary(out))


def _simulate_catalog(args: argparse.Namespace) -> None:
    import json
    from dataclasses import replace

    from genco.data.storage import is_remote
    from genco.worlds.catalog import CatalogWorldConfig, simulate_catalog

    if is_remote(args.out):
        raise ConfigError(f"{args.out}: the catalog world is written to a local directory")
    config = CatalogWorldConfig()
    if args.n_ads is not None:
        config = replace(config, n_ads=args.n_ads)
    out = simulate_catalog(config, args.seed, args.out, args.n_impressions)
    with open(out.world, encoding="utf-8") as f:
        stats = json.load(f)
    for key in ("config", "weights"):
        stats.pop(key)
    _print_json(stats)


def cmd_validate(args: argparse.Namespace) -> None:
    from genco.data.contract import load_catalog, load_constraints
    from genco.data.ingest import IngestConfig, ingest

    catalog = load_catalog(args.catalog)
    constraints = load_constraints(args.constraints, catalog)
    config = config_from_args(args, IngestConfig, _INGEST + _CHUNKS)
    if (args.impressions is None) == (args.served_log is None):
        raise ConfigError("give either --impressions or --served-log with --clicks")
    if args.served_log is not None:
        from genco.data.served import join_served_log

        if args.clicks is None:
            raise ConfigError("--served-log needs --clicks (impression_id, click)")
        _print_json(
            join_served_log(
                args.served_log,
                args.clicks,
                catalog,
                constraints,
                args.out,
                config,
                progress=not args.quiet,
            )
        )
        return
    summary = ingest(
        args.impressions, catalog, constraints, args.out, config, progress=not args.quiet
    )
    _print_json(summary.to_dict())


def cmd_attribute(args: argparse.Namespace) -> None:
    from genco.data.ingest import IngestConfig
    from genco.models.reward import RewardModelConfig
    from genco.training.attribution import run_attribute

    config = config_from_args(args, RewardModelConfig, _ATTRIBUTE)
    result = run_attribute(
        args.catalog,
        args.impressions,
        args.out,
        constraints_path=args.constraints,
        config=config,
        ingest_config=config_from_args(args, IngestConfig, _INGEST),
        progress=not args.quiet,
    )
    test = result.get("test", {})
    _print_json(
        {
            "model_dir": args.out,
            "rows_valid": result["ingest"]["rows_valid"],
            "rows_quarantined": result["ingest"]["rows_quarantined"],
            "epochs": result["train"]["epochs"],
            "train_seconds": round(result["train"]["seconds"], 1),
            **{k: round(test[k], 5) for k in ("auc", "log_loss", "ece") if k in test},
        }
    )


def cmd_train(args: argparse.Namespace) -> None:
    from genco.data.ingest import IngestConfig
    from genco.models.generator import GeneratorConfig
    from genco.models.reward import RewardModelConfig
    from genco.training.bundle import run_train

    result = run_train(
        args.catalog,
        args.impressions,
        args.out,
        constraints_path=args.constraints,
        reward_config=config_from_args(args, RewardModelConfig, _TRAIN_REWARD),
        generator_config=config_from_args(args, GeneratorConfig, _TRAIN_GEN, seed=args.seed),
        ingest_config=config_from_args(args, IngestConfig, _INGEST),
        warm_start_dir=args.warm_start,
        progress=not args.quiet,
    )
    test = result["reward"].get("test", {})
    _print_json(
        {
            "model_dir": args.out,
            "rows_valid": result["ingest"]["rows_valid"],
            "rows_quarantined": result["ingest"]["rows_quarantined"],
            "reward_auc": round(test["auc"], 5) if "auc" in test else None,
            "reward_train_seconds": round(result["reward"]["train"]["seconds"], 1),
            "generator_seconds": round(result["generator"]["seconds"], 1),
            "warm_start": result["manifest"]["warm_start"],
        }
    )


def cmd_recommend(args: argparse.Namespace) -> None:
    from genco.data import storage
    from genco.data.contract import load_catalog, load_constraints
    from genco.inference.batch import CHUNK_ADS, parse_shard, write_recommendations
    from genco.inference.predictor import Predictor

    shard = parse_shard(args.shard)
    catalog = constraints = None
    if args.catalog:
        catalog = load_catalog(args.catalog)
        constraints = load_constraints(args.constraints, catalog)
    predictor = Predictor.load(args.model, catalog, constraints)
    predictor.refine = args.refine
    contexts = storage.read_table(args.contexts, dtype={"ad_id": str}) if args.contexts else None
    summary = write_recommendations(
        predictor, args.out, args.top_k, shard, contexts, chunk_ads=args.chunk_ads or CHUNK_ADS
    )
    _print_json(
        {
            "out": summary.out,
            "shard": summary.shard,
            "inputs": summary.inputs,
            "ads": summary.ads,
            "rows": summary.rows,
            "seconds": round(summary.seconds, 2),
            "inputs_per_second": round(summary.inputs_per_second, 1),
        }
    )


def _add_io(p: argparse.ArgumentParser, out_help: str, served: bool = False) -> None:
    from genco.data.ingest import IngestConfig

    p.add_argument("--catalog", required=True, help="catalog CSV/Parquet (local or gs://)")
    p.add_argument("--impressions", required=not served, help="impressions CSV/Parquet")
    if served:
        p.add_argument(
            "--served-log",
            default=None,
            help="instead of --impressions: the served log (README 'Served log')",
        )
        p.add_argument("--clicks", default=None, help="clicks CSV/Parquet: impression_id, click")
    p.add_argument("--constraints", default=None, help="forbidden pairs CSV/Parquet (optional)")
    p.add_argument("--out", required=True, help=out_help)
    add_config_args(p, IngestConfig, _INGEST)


def cmd_demo(args: argparse.Namespace) -> None:
    from genco.pipeline.demo import run_demo

    _print_json(run_demo(args.out, seed=args.seed, serve=not args.no_serve, verbose=args.verbose))


def build_parser() -> argparse.ArgumentParser:
    from genco.data.ingest import IngestConfig
    from genco.models.generator import GeneratorConfig
    from genco.models.reward import RewardModelConfig
    from genco.worlds.simulate import WORLDS

    p = argparse.ArgumentParser(
        prog="genco",
        description="GenCO: learn the best combination of ad creative elements from click logs.",
    )
    p.add_argument("--version", action="version", version=f"genco {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "simulate",
        help="write a simulated world: catalog, constraints, impressions, ground truth",
        description="Simulate a world with known ground truth and log impressions from its "
        "logging policy (uniform or epsilon-greedy, with exact propensities).",
    )
    s.add_argument(
        "--world",
        default="default",
        choices=[*WORLDS, "catalog"],
        help="world preset; catalog: 100k products with their own elements, logged as a "
        "date-partitioned Parquet dataset (local --out; --n-ads to shrink it)",
    )
    s.add_argument("--n-ads", type=int, default=None, help="catalog world: products (100000)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument(
        "--n-impressions", type=int, default=None, help="log size (default: the world's own)"
    )
    s.add_argument(
        "--format",
        choices=("csv", "parquet"),
        default="csv",
        help="impressions file format (default csv)",
    )
    s.add_argument("--out", required=True, help="output directory (local or gs://)")
    s.set_defaults(func=cmd_simulate)

    v = sub.add_parser(
        "validate",
        help="validate an impression log; write valid rows, quarantine and summary",
        description="Check impressions against the catalog and constraints. Valid rows go to "
        "OUT/impressions.parquet, rejected rows to OUT/quarantine.csv with a reason, counts to "
        "OUT/summary.json (also printed).",
    )
    _add_io(v, "output directory (local or gs://)", served=True)
    add_config_args(v, IngestConfig, _CHUNKS)
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.set_defaults(func=cmd_validate)

    a = sub.add_parser(
        "attribute",
        help="train the reward model and attribute clicks to elements",
        description="Validate the log, train the multi-instance reward model on all but the "
        "latest 10%% of impressions, evaluate on them, and write OUT/reward_model.{pt,json}, "
        "OUT/attributions.parquet (per impression), OUT/element_attribution.csv (per element) "
        "and OUT/reward_metrics.json.",
    )
    _add_io(a, "model directory (local or gs://)")
    add_config_args(a, RewardModelConfig, _ATTRIBUTE)
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    a.set_defaults(func=cmd_attribute)

    t = sub.add_parser(
        "train",
        help="validate, fit the reward model, train the generator: one bundle",
        description="Validate the log, fit the reward model (attribution tables included), "
        "train the generator by policy gradient against it, and write one bundle directory.",
    )
    _add_io(t, "bundle directory (local or gs://)")
    add_config_args(t, RewardModelConfig, _TRAIN_REWARD)
    add_config_args(t, GeneratorConfig, _TRAIN_GEN)
    t.add_argument("--warm-start", default=None, help="previous bundle to start from")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser(
        "recommend",
        help="best combinations per ad (or per context row) from a bundle",
        description="Write recommendations (ad_id, ctx_*, rank, one column per component, "
        "score = predicted CTR) for every ad of the catalog, or for each row of --contexts.",
    )
    r.add_argument("--model", required=True, help="bundle directory from 'genco train'")
    r.add_argument("--catalog", default=None, help="catalog (default: the bundle's own)")
    r.add_argument("--constraints", default=None, help="constraints (with --catalog)")
    r.add_argument("--contexts", default=None, help="ad_id + ctx_* rows (default: every ad)")
    r.add_argument("--top-k", type=int, default=1, help="combinations per row (default 1)")
    r.add_argument("--out", required=True, help="recommendations CSV/Parquet")
    r.add_argument(
        "--shard",
        default="0/1",
        help="i/n: only the i-th of n contiguous blocks of the catalog's ads (default 0/1: "
        "all); n workers with 0/n .. n-1/n cover the catalog once",
    )
    r.add_argument(
        "--chunk-ads",
        type=int,
        default=None,
        help="ads decoded and written at a time; memory is one chunk of output (default "
        "genco.inference.batch.CHUNK_ADS)",
    )
    r.add_argument(
        "--refine",
        choices=REFINES,
        default="pairs",
        help="local search on the reward model after the beam: swaps of one component then "
        "of two (pairs, default), of one (single), or none",
    )
    r.set_defaults(func=cmd_recommend)

    d = sub.add_parser(
        "demo",
        help="the main job on the embedded default world (no cluster, no cloud)",
        description="Simulate the default world, run the retraining pipeline on the local "
        "KFP runner (gated deploy into OUT/model_store), serve the production model with a "
        "local TorchServe and print one REST response.",
    )
    d.add_argument("--out", default="runs/demo", help="working directory (default runs/demo)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.add_argument(
        "--verbose",
        action="store_true",
        help="show the local runner's whole log, not one line per task",
    )
    d.add_argument("--no-serve", action="store_true", help="stop after the pipeline")
    d.set_defaults(func=cmd_demo)

    from genco.cli.pipeline import add_commands as add_pipeline_commands

    add_pipeline_commands(sub)

    from genco.cli.serve import add_commands as add_serve_commands

    add_serve_commands(sub)

    from genco.cli.canary import add_commands as add_canary_commands

    add_canary_commands(sub)
    return p


def _no_kfp_healthz_retries(record: logging.LogRecord) -> bool:
    # kfp.Client logs each failed health check with a traceback on the root logger, then
    # raises TimeoutError, which is reported as one line.
    return not str(record.msg).startswith("Failed to get healthz info")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    # Noise that would bury the one line below: gcsfs logs a traceback when it gives up
    # retrying (the error itself is reported), kfp.Client warns about server versions.
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", "This client only works with Kubeflow", FutureWarning)
    logging.getLogger().addFilter(_no_kfp_healthz_retries)
    try:
        func(args)
    # Typed: genco's errors, missing paths, credentials, network and HTTP failures. Anything
    # else (a ValueError from deep inside numpy, a KeyError) is a bug and keeps its traceback.
    except expected_errors() as exc:
        bug = bug_in_step(exc)
        if bug is not None:  # a step failed on a bug: its traceback, as if raised here
            print(bug, file=sys.stderr)
            return 1
        print(f"genco {args.command}: error: {error_message(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
