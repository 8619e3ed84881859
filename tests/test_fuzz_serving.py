"""A seeded fuzz run against a real ``genco serve`` TorchServe on 127.0.0.1.

2,400 requests, valid ones mixed with hostile ones (deep nesting, huge integers, NaN and
Infinity, wrong types, form and multipart posts, binary junk, oversize bodies, absurd
features), sent by 8 threads at once so TorchServe batches them together. Every valid
request must succeed, no hostile one may get a 5xx, the worker must be the same process
with about the same memory afterwards, and the log must hold one line per client error in
files that roll over. Bounded: startup waits at most ``STARTUP_S``, each call ``HTTP_S``.
"""

from __future__ import annotations

import glob
import json
import math
import os
import random
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from genco.inference.predictor import Predictor
from genco.serving import torchserve
from genco.serving.limits import MAX_BODY_BYTES
from tests.test_handler import tiny_bundle

pytestmark = pytest.mark.skipif(
    shutil.which("java") is None, reason="TorchServe needs Java 17 (.ci/run installs it)"
)

STARTUP_S = 240.0
HTTP_S = 60.0
N_REQUESTS = 2400
THREADS = 8
SEED = 14
LOG_MAX_BYTES = 32 * 1024  # small, so the fuzz run rolls the log over several times
JSON_CT = "application/json"


@dataclass(frozen=True)
class Case:
    kind: str
    data: bytes
    content_type: str | None
    valid: bool
    path: str = "predictions"
    files: dict[str, Any] | None = None


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def server(bundle_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``genco serve``'s server with its default config; logs roll over at 32 KB here (the
    shipped log4j2.xml reads the size from GENCO_LOG_MAX_SIZE) and are kept after stop."""
    workdir = tmp_path_factory.mktemp("fuzz_server")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GENCO_LOG_MAX_SIZE", f"{LOG_MAX_BYTES // 1024} KB")
        mp.setenv("GENCO_LOG_BACKUPS", "100")  # keep every rolled file, to count lines
        handle = torchserve.serve(
            bundle_dir, version="v1", workdir=str(workdir), startup_timeout_s=STARTUP_S
        )
    try:
        yield handle
    finally:
        handle.stop()


# ---------------------------------------------------------------------------- generator


def _valid(rng: random.Random, p: Predictor) -> Case:
    cat = p.catalog
    body: dict[str, Any] = {"top_k": rng.randint(1, 10)}
    if rng.random() < 0.7:
        body["ad_id"] = rng.choice(cat.ads)
    else:
        cands: dict[str, list[Any]] = {}
        for k, comp in enumerate(cat.components):
            known = rng.sample(list(cat.elements[k]), rng.randint(1, 3))
            new = [
                {"id": f"new_{comp}_{i}", **{f: rng.uniform(-1e6, 1e6) for f in cat.feature_names}}
                for i in range(rng.randint(0, 2))
            ]
            cands[comp] = known + new
        body["candidates"] = cands
    if rng.random() < 0.3:
        body.update(mode="sample", seed=rng.randrange(2**63), temperature=rng.uniform(0.01, 100))
    else:
        body["refine"] = rng.choice(["none", "single", "pairs"])
    body["explain"] = rng.random() < 0.3
    path = "explanations" if rng.random() < 0.1 else "predictions"
    ct = rng.choice([JSON_CT, JSON_CT, "application/json; charset=utf-8", None])
    return Case("valid", json.dumps(body).encode(), ct, True, path)


def _nest(rng: random.Random, depth: int) -> bytes:
    opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
    return (opener * depth + "1" + closer * depth).encode()


def _hostile(rng: random.Random, p: Predictor) -> Case:
    ad = p.catalog.ads[0]
    kind = rng.choice(
        [
            "deep_top",
            "deep_field",
            "huge_int",
            "non_finite",
            "wrong_type",
            "unknown_field",
            "form",
            "multipart",
            "text_plain",
            "junk",
            "bad_utf8",
            "truncated",
            "oversize",
            "absurd_feature",
            "temperature",
            "unknown_ad",
            "too_many",
            "empty",
        ]
    )
    ct: str | None = JSON_CT
    files = None
    if kind == "deep_top":
        data = _nest(rng, rng.randint(33, 20_000))
    elif kind == "deep_field":
        data = b'{"ad_id": "%s", "constraints": ' % ad.encode() + _nest(rng, rng.randint(33, 9000))
        data += b"}"
    elif kind == "huge_int":
        field = rng.choice(["top_k", "seed", "temperature", "ctx_0", "x"])
        digits = "9" * rng.randint(20, 6000)
        data = f'{{"ad_id": "{ad}", "{field}": {rng.choice(["", "-"])}{digits}}}'.encode()
    elif kind == "non_finite":
        literal = rng.choice(["NaN", "Infinity", "-Infinity", "1e400", "-1e999"])
        field = rng.choice(["top_k", "seed", "temperature"])
        data = f'{{"ad_id": "{ad}", "{field}": {literal}}}'.encode()
    elif kind == "wrong_type":
        field, value = rng.choice(
            [
                ("ad_id", 7),
                ("ad_id", [ad]),
                ("ad_id", {"id": ad}),
                ("top_k", "5"),
                ("top_k", 2.5),
                ("top_k", True),
                ("explain", "yes"),
                ("mode", 3),
                ("candidates", []),
                ("constraints", {}),
                ("seed", -1),
            ]
        )
        body = {"ad_id": ad, field: value} if field != "candidates" else {field: value}
        data = json.dumps(body).encode()
    elif kind == "unknown_field":
        data = json.dumps({"ad_id": ad, "x" * rng.randint(1, 5000): 1}).encode()
    elif kind == "form":
        ct = "application/x-www-form-urlencoded"
        data = rng.choice([f"ad_id={ad}&top_k=3", json.dumps({"ad_id": ad})]).encode()
    elif kind == "multipart":
        ct, data = None, b""
        files = {"data": ("r.json", json.dumps({"ad_id": ad}).encode(), JSON_CT)}
    elif kind == "text_plain":
        ct = rng.choice(["text/plain", "application/octet-stream", "application/xml"])
        data = json.dumps({"ad_id": ad}).encode()
    elif kind == "junk":
        data = rng.randbytes(rng.randint(1, 4000))
    elif kind == "bad_utf8":
        data = b'{"ad_id": "\xff\xfe' + rng.randbytes(10) + b'"}'
    elif kind == "truncated":
        full = json.dumps({"ad_id": ad, "top_k": 3, "explain": True}).encode()
        data = full[: rng.randint(1, len(full) - 1)]
    elif kind == "oversize":
        size = rng.choice([MAX_BODY_BYTES + 1, 200_000, 1_100_000])
        data = b'{"ad_id": "' + b"x" * size + b'"}'
    elif kind == "absurd_feature":
        value = rng.choice(["1e300", "-1e300", "1e7", "1e38", "NaN"])
        comps = p.catalog.components
        cands = ", ".join(f'"{c}": [{{"id": "e", "feat_0": {value}}}]' for c in comps)
        data = f'{{"candidates": {{{cands}}}}}'.encode()
    elif kind == "temperature":
        t = rng.choice([1e-300, 1e-9, 1e9, 0, -1])
        data = json.dumps({"ad_id": ad, "mode": "sample", "temperature": t}).encode()
    elif kind == "unknown_ad":
        data = json.dumps({"ad_id": f"ad_{rng.randint(10**6, 10**7)}"}).encode()
    elif kind == "too_many":
        comps = p.catalog.components
        cands = {c: [f"e{i}" for i in range(300)] for c in comps}
        data = json.dumps({"candidates": cands}).encode()
    else:
        data = rng.choice([b"", b"   ", b"null", b"[]", b'"ad_0000"'])
    return Case(kind, data, ct, False, files=files)


def fuzz_cases(p: Predictor, n: int, seed: int) -> list[Case]:
    """n requests, ~40% valid, in a seeded random order."""
    rng = random.Random(seed)
    return [_valid(rng, p) if rng.random() < 0.4 else _hostile(rng, p) for _ in range(n)]


# ---------------------------------------------------------------------------- the run


def _worker(handle: Any) -> psutil.Process:
    """The model's worker process, by the PID TorchServe's describe API reports."""
    described = requests.get(
        f"{handle.management_url}/models/genco",
        headers=handle.headers("management"),
        timeout=HTTP_S,
    )
    assert described.status_code == 200, described.text
    [worker] = described.json()[0]["workers"]
    return psutil.Process(int(worker["pid"]))


def _sender(handle: Any) -> Callable[[Case], tuple[Case, int, bytes]]:
    local = threading.local()
    token = handle.headers()

    def send(case: Case) -> tuple[Case, int, bytes]:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        headers = dict(token)
        if case.content_type is not None:
            headers["Content-Type"] = case.content_type
        url = f"{handle.inference_url}/{case.path}/genco"
        if case.files is not None:
            resp = local.session.post(url, files=case.files, headers=headers, timeout=HTTP_S)
        else:
            resp = local.session.post(url, data=case.data, headers=headers, timeout=HTTP_S)
        return case, resp.status_code, resp.content

    return send


def _log_lines(workdir: str, pattern: str) -> int:
    n = 0
    for path in glob.glob(os.path.join(workdir, "logs", "model_log*.log")):
        with open(path, encoding="utf-8", errors="replace") as f:
            n += sum(1 for line in f if re.search(pattern, line))
    return n


def test_fuzz_against_a_real_server(server: Any, bundle_dir: str) -> None:
    predictor = Predictor.load(bundle_dir)
    send = _sender(server)
    warm = fuzz_cases(predictor, 200, SEED + 1)  # grow the allocator's pools first
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(send, warm))
    worker = _worker(server)
    rss_before = worker.memory_info().rss
    refused_before = _log_lines(server.workdir, r"genco request refused")

    cases = fuzz_cases(predictor, N_REQUESTS, SEED)
    n_valid = sum(c.valid for c in cases)
    assert n_valid >= 800 and len(cases) - n_valid >= 1200
    assert len({c.kind for c in cases}) == 19  # every hostile kind, and valid ones
    started = time.monotonic()
    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(send, cases))
    elapsed = time.monotonic() - started

    failed_valid = [(c.kind, s, b[:200]) for c, s, b in results if c.valid and s != 200]
    assert failed_valid == [], f"{len(failed_valid)} valid requests failed: {failed_valid[:5]}"
    server_errors = [(c.kind, s, b[:200]) for c, s, b in results if not c.valid and s >= 500]
    assert server_errors == [], f"{len(server_errors)} 5xx: {server_errors[:5]}"
    assert all(400 <= s < 500 for c, s, _ in results if not c.valid)
    for case, status, body in results:
        if case.valid:
            out = json.loads(body, parse_constant=_not_json)
            assert out["recommendations"], case
            assert all(math.isfinite(r["score"]) for r in out["recommendations"])
        elif not _netty_413(status, body):  # ours: the field names itself in the message
            error = json.loads(body)["error"]
            assert (error["status"], error["message"].startswith(f"{error['field']}: ")) == (
                status,
                True,
            ), (case.kind, error)

    assert _worker(server).pid == worker.pid, "the worker was replaced"
    assert server.process.poll() is None
    rss_after = worker.memory_info().rss
    assert rss_after < 1.10 * rss_before, f"worker RSS {rss_before} -> {rss_after}"
    print(f"\n{N_REQUESTS} requests in {elapsed:.1f}s; worker RSS {rss_before} -> {rss_after}")

    # One log line per client error the worker saw (Netty answers > 1 MiB bodies itself),
    # no traceback, and files that rolled over at the configured size.
    expected = sum(1 for c, s, b in results if not c.valid and not _netty_413(s, b))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the frontend writes the worker's lines async
        refused = _log_lines(server.workdir, r"genco request refused") - refused_before
        if refused >= expected:
            break
        time.sleep(0.2)
    assert refused == expected
    assert _log_lines(server.workdir, r"Traceback|Failed json decoding") == 0
    logs = glob.glob(os.path.join(server.workdir, "logs", "model_log*.log"))
    assert len(logs) > 2, "the model log never rolled over"
    assert all(os.path.getsize(f) <= LOG_MAX_BYTES + 4096 for f in logs)


def _not_json(literal: str) -> float:
    raise AssertionError(f"{literal} in a response: not JSON")


def _netty_413(status: int, body: bytes) -> bool:
    """TorchServe's frontend refuses bodies over max_request_size before the worker."""
    return status == 413 and b'"field"' not in body


def test_default_keys_outlive_torchserve_default_expiry(server: Any) -> None:
    """TorchServe's own default would expire the keys 60 minutes after start."""
    for api in ("inference", "management"):
        expiry = server.token_expiry(api)
        assert expiry is not None
        assert expiry > datetime.now(UTC) + timedelta(days=365 * 9)
    config = Path(server.workdir, "config.properties").read_text()
    assert "token_expiration_min=5256000\n" in config
