"""Serving latency: the predictor in process, then TorchServe over REST and gRPC side by
side, in one run. Prints JSON.

World: 4 components x 10 candidates per ad (the issue's size), trained briefly; requests ask
for the top 5 by beam search. In process: ``Predictor.recommend`` and the handler's whole
path on a batch row (``genco.serving.kserve.answer_rows``: bytes in, parse, validate, predict,
JSON bytes out). REST and gRPC: one local TorchServe (token auth on, one worker, metrics on)
driven by threads with one ``requests.Session`` or one gRPC channel each, at concurrency 1
and 8, interleaved so both see the same machine; latency is client-side wall time per request.
``--set key=value`` adds TorchServe properties (e.g. ``number_of_netty_threads=1``) to find
where the frontend's time goes.

    .venv/bin/python bench/serving.py [--calls 2000] [--requests 2000] [--quick]

Targets (2 cores): in-process p99 <= 2 ms; REST p50 <= 5 ms, p99 <= 15 ms, >= 300 req/s,
0 errors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import psutil
import requests
import torch

from genco.inference.predictor import Predictor
from genco.models.generator import GeneratorConfig
from genco.models.reward import RewardModelConfig
from genco.models.tables import TableCache
from genco.serving import kserve, torchserve
from genco.serving.grpc_client import GrpcClient
from genco.serving.requests import load_predictor
from genco.training.bundle import run_train
from genco.worlds.simulate import simulate, world_config


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
        "max_ms": round(float(a.max()), 3),
    }


def make_bundle(out: str) -> str:
    """4 x 10 world (pool 12 per component), small training: latency, not quality."""
    config = world_config("default", n_components=4, n_candidates=10, pool_size=12)
    world = simulate(config, seed=0, out_dir=os.path.join(out, "world"), n_impressions=20_000)
    bundle = os.path.join(out, "bundle")
    run_train(
        world.catalog,
        world.impressions,
        bundle,
        constraints_path=world.constraints,
        reward_config=RewardModelConfig(epochs=3),
        generator_config=GeneratorConfig(rl_steps=30),
    )
    return bundle


def in_process(predictor: Predictor, calls: int) -> dict:
    ads = predictor.catalog.ads
    out = {}
    # The serving default (beam re-ranked), sampling, and the beam with each local search.
    for name, mode, refine in (
        ("beam", "beam", None),
        ("sample", "sample", None),
        ("beam_refine_single", "beam", "single"),
        ("beam_refine_pairs", "beam", "pairs"),
    ):
        for i in range(200):  # warm-up
            predictor.recommend(ads[i % len(ads)], top_k=5, mode=mode, refine=refine)
        ms = []
        for i in range(calls):
            t = time.perf_counter()
            predictor.recommend(ads[i % len(ads)], top_k=5, mode=mode, refine=refine)
            ms.append((time.perf_counter() - t) * 1e3)
        out[f"recommend_{name}"] = percentiles(ms)
    # thompson: the policy is built once per (ad, context) and cached; a continuous context
    # makes every request a first one, measured with the cache emptied before each call.
    for name, fresh in (("thompson", False), ("thompson_first_request", True)):
        for i in range(200):
            predictor.recommend(ads[i % len(ads)], top_k=5, mode="thompson")
        ms = []
        for i in range(calls):
            if fresh:
                predictor._thompson = TableCache()
            t = time.perf_counter()
            predictor.recommend(ads[i % len(ads)], top_k=5, mode="thompson")
            ms.append((time.perf_counter() - t) * 1e3)
        out[f"recommend_{name}"] = percentiles(ms)
    ms = []
    for i in range(calls):
        row = {"body": json.dumps({"ad_id": ads[i % len(ads)], "top_k": 5}).encode()}
        t = time.perf_counter()
        kserve.answer_rows(predictor, [row], ["application/json"], [False])
        ms.append((time.perf_counter() - t) * 1e3)
    out["handler_row_1"] = percentiles(ms)
    return out


def group_cpu_s(pgid: int) -> dict[str, float]:
    """CPU seconds used so far by a process group (TorchServe), split into the Java frontend
    and the Python side (workers, launcher)."""
    total = {"java": 0.0, "python": 0.0}
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                t = proc.cpu_times()
                total["java" if "java" in proc.name() else "python"] += t.user + t.system
        except (psutil.Error, ProcessLookupError):
            continue
    return total


def drive(
    handle: torchserve.ServeHandle,
    call: Any,
    ads: tuple[str, ...],
    concurrency: int,
    n: int,
    warmup: int,
) -> dict:
    """n calls of ``call(i) -> (ms, error or None)`` from ``concurrency`` threads."""
    errors: list[str] = []

    def one(i: int) -> float:
        ms, error = call(i)
        if error:
            errors.append(error)
        return ms

    me = psutil.Process()
    with ThreadPoolExecutor(concurrency) as pool:
        # Warm-up: connections, and above all the JVM's JIT, which needs ~1000 requests
        # before the frontend's CPU per request settles (3.3 -> 1.4 ms with a no-op model).
        list(pool.map(one, range(warmup)))
        errors.clear()
        server0, client0, t = group_cpu_s(handle.process.pid), me.cpu_times(), time.perf_counter()
        ms = list(pool.map(one, range(n)))
        wall = time.perf_counter() - t
        server1, client1 = group_cpu_s(handle.process.pid), me.cpu_times()
    return {
        "concurrency": concurrency,
        "requests": n,
        **percentiles(ms),
        "throughput_rps": round(n / wall, 1),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        # CPU per request, independent of what else runs on the machine:
        "server_cpu_ms_per_request": round(
            (sum(server1.values()) - sum(server0.values())) / n * 1e3, 3
        ),
        "frontend_cpu_ms_per_request": round((server1["java"] - server0["java"]) / n * 1e3, 3),
        "worker_cpu_ms_per_request": round((server1["python"] - server0["python"]) / n * 1e3, 3),
        "client_cpu_ms_per_request": round(
            (client1.user + client1.system - client0.user - client0.system) / n * 1e3, 3
        ),
    }


def rest_call(handle: torchserve.ServeHandle, ads: tuple[str, ...]) -> Any:
    url = handle.predictions_url()
    headers = {**handle.headers(), "Content-Type": "application/json"}
    local = threading.local()

    def call(i: int) -> tuple[float, str | None]:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        body = json.dumps({"ad_id": ads[i % len(ads)], "top_k": 5})
        t = time.perf_counter()
        resp = session.post(url, data=body, headers=headers, timeout=30)
        ms = (time.perf_counter() - t) * 1e3
        if resp.status_code != 200 or len(resp.json()["recommendations"]) != 5:
            return ms, f"{resp.status_code}: {resp.text[:200]}"
        return ms, None

    return call


def grpc_call(handle: torchserve.ServeHandle, ads: tuple[str, ...]) -> Any:
    local = threading.local()
    token = handle.token("inference")

    def call(i: int) -> tuple[float, str | None]:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = GrpcClient(handle.grpc_target, token)
        body = json.dumps({"ad_id": ads[i % len(ads)], "top_k": 5}).encode()
        t = time.perf_counter()
        try:
            out = json.loads(client.predict_bytes(body))
        except Exception as exc:  # an error is counted, not fatal to the benchmark
            return (time.perf_counter() - t) * 1e3, repr(exc)[:200]
        ms = (time.perf_counter() - t) * 1e3
        if len(out.get("recommendations", [])) != 5:
            return ms, json.dumps(out)[:200]
        return ms, None

    return call


def _property(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"'{text}' is not key=value")
    return key, value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=2000, help="in-process calls per measurement")
    p.add_argument("--requests", type=int, default=2000, help="REST requests per concurrency")
    p.add_argument("--batch-size", type=int, default=8, help="TorchServe batch size")
    p.add_argument("--max-batch-delay-ms", type=int, default=1, help="TorchServe batch wait")
    p.add_argument("--workers", type=int, default=1, help="TorchServe workers")
    p.add_argument("--warmup", type=int, default=1000, help="REST warm-up requests")
    p.add_argument("--quick", action="store_true", help="200 calls / requests")
    p.add_argument(
        "--set",
        type=_property,
        action="append",
        default=[],
        help="extra TorchServe property key=value (repeatable)",
    )
    p.add_argument(
        "--env",
        type=_property,
        action="append",
        default=[],
        help="environment variable KEY=VALUE for TorchServe and its worker (repeatable)",
    )
    p.add_argument("--label", default="", help="a name for this configuration in the JSON")
    p.add_argument("--bundle", default=None, help="a trained bundle (default: train the world's)")
    args = p.parse_args()
    calls, n = (200, 200) if args.quick else (args.calls, args.requests)
    warmup = 100 if args.quick else args.warmup

    with tempfile.TemporaryDirectory(prefix="genco-bench-serving-") as tmp:
        torch.set_num_threads(1)  # as a serving worker runs; also keeps training quick
        t = time.perf_counter()
        bundle = args.bundle or make_bundle(tmp)
        train_s = time.perf_counter() - t
        predictor = load_predictor(bundle)
        result: dict = {
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
                "load_average_1m_at_start": round(os.getloadavg()[0], 2),
            },
            "world": {
                "components": predictor.catalog.n_components,
                "candidates_per_component": [len(c) for c in predictor.catalog.candidates[0]],
                "forbidden_pairs": len(predictor.constraints),
                "top_k": 5,
                "beam_width": predictor.generator.config.beam_width,
                "train_seconds": round(train_s, 1),
            },
            "in_process": in_process(predictor, calls),
        }
        t = time.perf_counter()
        extra = dict(args.set)
        os.environ.update(dict(args.env))  # serve() hands its environment to TorchServe
        with torchserve.serve(
            bundle,
            workers=args.workers,
            batch_size=args.batch_size,
            max_batch_delay_ms=args.max_batch_delay_ms,
            properties=extra,
        ) as handle:
            startup_s = time.perf_counter() - t
            ads = predictor.catalog.ads
            runs: dict[str, list[dict]] = {"rest": [], "grpc": []}
            for c in (1, 8):  # interleaved: both protocols see the same machine
                runs["rest"].append(drive(handle, rest_call(handle, ads), ads, c, n, warmup))
                runs["grpc"].append(drive(handle, grpc_call(handle, ads), ads, c, n, warmup))
            result["server"] = {
                "label": args.label,
                "startup_seconds": round(startup_s, 1),
                "workers": args.workers,
                "batch_size": args.batch_size,
                "max_batch_delay_ms": args.max_batch_delay_ms,
                "properties": extra,
                "env": dict(args.env),
                "load_average_1m_at_end": round(os.getloadavg()[0], 2),
            }
            result.update(runs)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
