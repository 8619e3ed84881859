"""``genco serve`` and ``genco archive``: shells over ``genco.serving.torchserve`` and
``genco.serving.archive``.

Registered into the main parser by ``genco.cli.main`` through ``add_commands``; errors follow the
CLI's rule (user mistakes raise GencoError or FileNotFoundError -> one line, exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING

import requests

from genco.cli.common import print_json as _print_json
from genco.errors import ConfigError

if TYPE_CHECKING:
    from genco.serving.torchserve import ServeHandle

RENEW_BEFORE_S = 60.0


def _curl(url: str, body: dict, key_file: str | None, token_file: str | None = None) -> str:
    """A copy-pasteable request; the key is read from its file, never printed."""
    lines = []
    auth = ""
    if key_file:
        read = "import json,sys; print(json.load(open(sys.argv[1]))['inference']['key'])"
        lines.append(f'TOKEN=$(python3 -c "{read}" {key_file})')
    elif token_file:
        lines.append(f"TOKEN=$(grep -m1 '[^[:space:]]' {token_file})")  # its first token
    if key_file or token_file:
        auth = '-H "Authorization: Bearer $TOKEN" '
    body_json = json.dumps(body)
    lines.append(f"curl -s {url} {auth}-H 'Content-Type: application/json' -d '{body_json}'")
    return "\n".join(lines)


def _expiry(handle: ServeHandle) -> str | None:
    expiry = handle.token_expiry("inference")
    return expiry.isoformat() if expiry else None


def _renew(handle: ServeHandle) -> None:
    """Renew keys a minute before they expire, so "serving" stays true for key-file readers
    (with the default expiry this never happens while the server runs)."""
    from genco.serving.management import ManagementError

    if handle.key_file is None:
        return
    try:
        renewed = handle.renew_expiring(RENEW_BEFORE_S)
    except (OSError, ValueError, ManagementError, requests.RequestException) as exc:
        # TorchServe busy or restarting: tried again next second
        print(f"could not renew a key yet: {exc}", file=sys.stderr)
        return
    for api in renewed:
        print(f"renewed the {api} key in {handle.key_file}", file=sys.stderr)


def _model_store(store: str | None) -> str | None:
    """TorchServe's model store for ``--store STORE``: the layout's, where ``genco deploy``
    publishes the archives it registers (local stores only: TorchServe reads files)."""
    if store is None:
        return None
    from genco.data.fs import is_remote
    from genco.serving.archive import KSERVE_DIR

    if is_remote(store):
        raise ConfigError(f"--store {store}: a local model store (TorchServe reads its files)")
    return os.path.join(store, KSERVE_DIR, "model-store")


def cmd_serve(args: argparse.Namespace) -> None:
    from genco.serving.torchserve import serve, serve_layout

    print("starting TorchServe (Java frontend + Python worker) ...", file=sys.stderr)
    if args.layout:
        for flag, value in (
            ("--port-base", args.port_base),
            ("--no-auth", args.no_auth),
            ("--token-expiry-min", args.token_expiry_min),
            ("--enable-model-api", args.enable_model_api),
            ("--store", args.store),
        ):
            if value:
                raise ConfigError(f"{flag} applies to --model; a layout brings its own config")
        handle = serve_layout(
            args.layout, startup_timeout_s=args.startup_timeout, token_file=args.token_file
        )
    else:
        if args.token_file and (args.no_auth or args.token_expiry_min is not None):
            raise ConfigError("--token-file replaces TorchServe's keys: no --no-auth, no expiry")
        expiry = (
            {} if args.token_expiry_min is None else {"token_expiry_min": args.token_expiry_min}
        )
        handle = serve(
            args.model,
            port_base=args.port_base,
            token_auth=not args.no_auth,
            workers=args.workers,
            startup_timeout_s=args.startup_timeout,
            enable_model_api=args.enable_model_api,
            model_store=_model_store(args.store),
            token_file=args.token_file,
            **expiry,
        )
    with handle:
        _print_json(
            {
                "model_version": handle.version,
                "inference_url": handle.predictions_url(),
                "management_url": handle.management_url,
                "metrics_url": handle.metrics_url,
                "grpc_target": handle.grpc_target,
                "token_auth": handle.key_file is not None or handle.token_file is not None,
                "key_file": handle.key_file,
                "token_file": handle.token_file,
                "token_expires": _expiry(handle),
                "workdir": handle.workdir,
            }
        )
        print("\n# one REST request:", file=sys.stderr)
        print(
            _curl(
                handle.predictions_url(), handle.sample_request, handle.key_file, handle.token_file
            )
        )
        print("# its response:", file=sys.stderr)
        _print_json(handle.sample_response)
        if args.once:
            return
        print("serving; Ctrl-C stops TorchServe", file=sys.stderr)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(1.0) and handle.process.poll() is None:
                _renew(handle)
        except KeyboardInterrupt:
            pass
        if handle.process.poll() is not None:
            raise RuntimeError(f"TorchServe exited on its own\n{handle.log_tail()}")


def cmd_archive(args: argparse.Namespace) -> None:
    from genco.models.checkpoint import bundle_version, check_version
    from genco.serving.archive import publish
    from genco.serving.management import ManagementClient, ManagementError, read_token

    version = check_version(args.version) if args.version else bundle_version(args.model)
    management = None
    if args.management_url:
        token = args.token or (read_token(args.key_file) if args.key_file else None)
        management = ManagementClient(args.management_url, token)
    try:
        token_auth = False if args.no_token_auth else None
        _print_json(publish(args.model, args.store, version, management, token_auth=token_auth))
    except (ManagementError, requests.RequestException) as exc:
        # The server or its URL is the user's to fix; the layout still serves the old version.
        raise ConfigError(f"{args.management_url}: {exc}") from exc


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``serve`` and ``archive`` to the ``genco`` parser."""
    s = sub.add_parser(
        "serve",
        help="serve a bundle (or a published layout) with a local TorchServe and print one "
        "REST response",
        description="Archive the bundle, start TorchServe on 127.0.0.1 (token auth on; keys "
        "in WORKDIR/key_file.json), wait until a real prediction succeeds, print the URLs, "
        "a curl command and its response, then serve until Ctrl-C (or stop with --once).",
    )
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="bundle directory from 'genco train'")
    what.add_argument(
        "--layout",
        help="a published KServe layout (STORE/kserve, local or gs://): serve its current "
        "version with its own config.properties, as the InferenceService's pod does "
        "(addresses moved to free loopback ports)",
    )
    s.add_argument(
        "--port-base",
        type=int,
        default=None,
        help="inference, management, metrics, gRPC ports = N..N+4 (default: free ports)",
    )
    s.add_argument(
        "--no-auth",
        action="store_true",
        help="disable TorchServe token authorization (local demos only)",
    )
    s.add_argument(
        "--token-file",
        default=None,
        help="the cluster's auth (serving/kserve.yaml): TorchServe's token auth off, the genco "
        "handler accepts 'Authorization: Bearer T' for each token T (a line) of this file, a "
        "mounted Kubernetes Secret, read again when it changes; 401 otherwise. Works with "
        "--model and --layout",
    )
    s.add_argument(
        "--token-expiry-min",
        type=float,
        default=None,
        help="minutes the inference and management keys last (TorchServe's "
        "token_expiration_min; default genco.serving.config.TOKEN_EXPIRY_MIN, ten years: "
        "as long as "
        "the server runs). Shorter keys are renewed a minute before they expire, in the key "
        "file",
    )
    s.add_argument(
        "--enable-model-api",
        action="store_true",
        help="allow registering, switching and unregistering versions on the management API "
        "(genco deploy/rollback --management-url, with the management key of the key file); "
        "off by default",
    )
    s.add_argument(
        "--store",
        default=None,
        help="a local model store: TorchServe's model store becomes STORE/kserve/model-store, "
        "where genco deploy --store STORE --management-url URL publishes what it registers",
    )
    s.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    s.add_argument(
        "--startup-timeout", type=float, default=180.0, help="seconds to wait (default 180)"
    )
    s.add_argument("--once", action="store_true", help="stop after printing the response")
    s.set_defaults(func=cmd_serve)

    a = sub.add_parser(
        "archive",
        help="build the .mar and publish it in a KServe model store; optionally register it",
        description="Build STORE/model-store/genco-<version>.mar with torch-model-archiver and "
        "point STORE/config/config.properties at it (the layout KServe's TorchServe runtime "
        "loads). With --management-url, register that version on a running TorchServe whose "
        "model store is STORE/model-store and make it the default (the previous default is "
        "kept for rollback).",
    )
    a.add_argument("--model", required=True, help="bundle directory (local or gs://)")
    a.add_argument("--store", required=True, help="KServe storageUri (local or gs://)")
    a.add_argument("--version", default=None, help="model version (default: the bundle's)")
    a.add_argument("--management-url", default=None, help="TorchServe management API URL")
    a.add_argument("--token", default=None, help="management API key")
    a.add_argument("--key-file", default=None, help="TorchServe key_file.json to read it from")
    a.add_argument(
        "--no-token-auth",
        action="store_true",
        help="publish the layout with TorchServe token auth off: only where an authenticating "
        "ingress fronts the InferenceService (default: on; a switch keeps the layout's setting)",
    )
    a.set_defaults(func=cmd_archive)
