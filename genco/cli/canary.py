"""``genco canary start|decide|stop|status|manifest``: a candidate served beside production
on a share of traffic, then promoted or rolled back on the online A/B
(``genco.evaluation.canary``; on a cluster KServe splits the traffic, ``manifest``)."""

from __future__ import annotations

import argparse

from genco.cli.common import print_json
from genco.errors import StoreError


def cmd_start(args: argparse.Namespace) -> None:
    from genco.evaluation import canary
    from genco.serving.archive import canary_hook

    hook = canary_hook(args.store, args.serving)
    result = canary.run_start(args.model, args.store, args.share, args.gate_file, hook)
    print_json(result.to_dict())
    if result.action == "refused":
        raise StoreError(f"no canary started: {result.reason}")


def cmd_decide(args: argparse.Namespace) -> None:
    from genco.cli.pipeline import _serving_hook
    from genco.evaluation import canary

    result = canary.run_decide(
        args.store,
        args.data,
        args.margin,
        args.confidence,
        args.min_impressions,
        _serving_hook(args),
        canary_ab=args.canary_ab,
    )
    print_json(result.to_dict())


def cmd_stop(args: argparse.Namespace) -> None:
    from genco.evaluation import canary

    print_json(canary.stop(args.store, args.reason).to_dict())


def cmd_status(args: argparse.Namespace) -> None:
    from genco.evaluation import canary
    from genco.store import current_version

    print_json(
        {
            "production_version": current_version(args.store),
            "canary": canary.read_canary(args.store),
        }
    )


def cmd_manifest(args: argparse.Namespace) -> None:
    from genco.evaluation import canary
    from genco.serving.manifest import inference_service, render

    record = canary.read_canary(args.store)
    share = None if record is None else float(record["share"])
    doc = inference_service(args.storage_uri or args.store, share, args.name)
    print(render(doc), end="")


def add_commands(sub: argparse._SubParsersAction) -> None:
    from genco.cli.pipeline import _add_serving_flags
    from genco.evaluation.canary import MIN_IMPRESSIONS

    c = sub.add_parser(
        "canary",
        help="serve a refused candidate to a share of traffic; promote or roll back on the A/B",
        description="A candidate the offline gate refused (too little evidence at a low "
        "exploration rate) is started as the store's canary; the cluster serves it to a share "
        "of requests (KServe canaryTrafficPercent: genco canary manifest); genco canary decide "
        "compares the two arms' clicks in the joined served log and promotes or rolls back.",
    )
    csub = c.add_subparsers(dest="canary_command", required=True)
    st = csub.add_parser("start", help="start a refused candidate as the store's canary")
    st.add_argument("--model", required=True, help="candidate bundle directory")
    st.add_argument("--store", required=True, help="model store (local dir or gs://)")
    st.add_argument("--gate-file", required=True, help="the candidate's gate.json (refused)")
    st.add_argument("--share", type=float, default=0.2, help="share of requests (default 0.2)")
    st.add_argument(
        "--serving",
        action="store_true",
        help="publish its layout STORE/kserve-canary (automatic once the store publishes)",
    )
    st.set_defaults(func=cmd_start)

    de = csub.add_parser("decide", help="promote or roll back the canary on the online A/B")
    de.add_argument("--store", required=True, help="model store (local dir or gs://)")
    de.add_argument(
        "--data",
        required=True,
        help="the joined served log: the --out of genco validate --served-log --clicks",
    )
    de.add_argument("--margin", type=float, default=0.0, help="relative CTR gain to require")
    de.add_argument("--confidence", type=float, default=0.95, help="of the lower bound")
    de.add_argument(
        "--min-impressions",
        type=int,
        default=MIN_IMPRESSIONS,
        help=f"keep serving the canary below this many of its rows (default {MIN_IMPRESSIONS})",
    )
    de.add_argument(
        "--canary-ab",
        choices=("all", "triggered"),
        default="all",
        help="triggered: count only the requests where the two bundles' greedy picks differ "
        "(both arms serve greedy picks with the same exploration floor: beam, or sample at "
        "temperature 0); all: every request (default)",
    )
    _add_serving_flags(de, "a promoted canary")
    de.set_defaults(func=cmd_decide)

    sp = csub.add_parser("stop", help="roll the running canary back by hand")
    sp.add_argument("--store", required=True, help="model store (local dir or gs://)")
    sp.add_argument("--reason", required=True, help="kept in the canary's record")
    sp.set_defaults(func=cmd_stop)

    ss = csub.add_parser("status", help="production and the running canary, as JSON")
    ss.add_argument("--store", required=True, help="model store (local dir or gs://)")
    ss.set_defaults(func=cmd_status)

    mf = csub.add_parser(
        "manifest",
        help="the KServe InferenceService for the store's state (kubectl apply -f -)",
    )
    mf.add_argument("--store", required=True, help="model store (local dir or gs://)")
    mf.add_argument(
        "--storage-uri", default=None, help="the store as the cluster reaches it (default --store)"
    )
    mf.add_argument("--name", default=None, help="InferenceService name (default genco)")
    mf.set_defaults(func=cmd_manifest)
