"""Bundles and the store under faults and races (issue 14), on real files, a real GCS emulator,
real ``genco`` processes and real archives: every load verifies the manifest, a gate is bound
to the bundle it judged, the pointer is the commit point for serving, and two racing deploys
never both win."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests

from genco.data import storage
from genco.errors import BundleError, StoreError
from genco.evaluation.evaluate import evaluate_bundle, run_evaluate
from genco.inference.predictor import Predictor
from genco.models.checkpoint import CONSTRAINTS, MANIFEST, REWARD_META, REWARD_WEIGHTS
from genco.models.generator import GeneratorConfig
from genco.models.reward import RewardModelConfig
from genco.serving.archive import KSERVE_DIR, make_on_promote, serving_hook
from genco.serving.config import mar_name
from genco.store import (
    LOCK,
    POINTER,
    bundle_digest,
    clean_leftovers,
    current_version,
    promote,
    read_pointer,
    version_dir,
)
from genco.training.bundle import run_train
from genco.worlds.simulate import simulate, world_config

if TYPE_CHECKING:
    from tests.conftest import GcsEmulator

ROOT = Path(__file__).resolve().parents[1]


def genco(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, "-m", "genco.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def one_line_exit_2(r: subprocess.CompletedProcess, *needles: str) -> str:
    """An expected failure: exit 2 and one error line on stderr naming what is wrong (after
    any progress lines the command printed before it)."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and r.stderr.strip().endswith(errors[0]), r.stderr
    err = errors[0]
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("safety_world")
    return simulate(world_config("default", n_ads=4), seed=0, out_dir=str(root), n_impressions=3000)


@pytest.fixture(scope="module")
def bundles(world, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Two real, different bundles of one catalog, trained in seconds."""
    root = tmp_path_factory.mktemp("safety_bundles")
    out = []
    for seed in (0, 1):
        path = str(root / f"bundle{seed}")
        run_train(
            world.catalog,
            world.impressions,
            path,
            world.constraints,
            RewardModelConfig(epochs=2, seed=seed),
            GeneratorConfig(rl_steps=2, seed=seed),
        )
        out.append(path)
    return out[0], out[1]


def _copy(src: str, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("ingest"))
    return dest


# ============================================================ 1. bundles verified at every load


def test_torn_retrain_new_reward_model_under_the_old_manifest_is_refused(bundles, tmp_path):
    # What kill -9 during a retrain over an existing bundle left before: the old manifest, a
    # new reward model (here: another real one), the old generator.
    a, b = bundles
    torn = _copy(a, tmp_path / "torn")
    for name in (REWARD_WEIGHTS, REWARD_META):
        shutil.copyfile(Path(b) / name, torn / name)
    with pytest.raises(BundleError, match=r"reward_model\.(pt|json) does not match its sha256"):
        Predictor.load(str(torn))
    r = genco("recommend", "--model", str(torn), "--out", str(tmp_path / "recs.csv"))
    one_line_exit_2(r, "does not match its sha256 in manifest.json", str(torn))
    assert not (tmp_path / "recs.csv").exists()
    # serve refuses before starting Java
    r = genco("serve", "--model", str(torn), "--once", "--no-auth")
    one_line_exit_2(r, "does not match its sha256")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("empty", r"constraints\.csv does not match its sha256 in manifest\.json"),
        ("header_only", r"constraints\.csv does not match its sha256 in manifest\.json"),
        ("deleted", r"constraints\.csv: missing, but named in manifest\.json"),
        ("manifest_deleted", r"not a complete bundle \(missing manifest\.json"),
    ],
)
def test_emptied_constraints_or_missing_manifest_is_refused(bundles, tmp_path, damage, message):
    a, _ = bundles
    bad = _copy(a, tmp_path / "bad")
    assert len((bad / CONSTRAINTS).read_text().splitlines()) > 1  # the world forbids pairs
    if damage == "empty":
        (bad / CONSTRAINTS).write_bytes(b"")
    elif damage == "header_only":
        header = (bad / CONSTRAINTS).read_text().splitlines()[0]
        (bad / CONSTRAINTS).write_text(header + "\n")
    elif damage == "deleted":
        (bad / CONSTRAINTS).unlink()
    else:
        (bad / MANIFEST).unlink()
    with pytest.raises(BundleError, match=message):
        Predictor.load(str(bad))
    # the store refuses it too, and so does a rollback's or an evaluation's load
    with pytest.raises(BundleError, match=message):
        promote(str(bad), str(tmp_path / "store"))
    assert not (tmp_path / "store").exists()


def test_a_loaded_file_added_after_the_manifest_is_refused(bundles, tmp_path):
    a, _ = bundles
    bad = _copy(a, tmp_path / "bad")
    manifest = json.loads((bad / MANIFEST).read_text())
    del manifest["files"][CONSTRAINTS]  # an old bundle format: constraints written later
    (bad / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"constraints\.csv: not named in manifest\.json"):
        Predictor.load(str(bad))


def test_an_intact_bundle_loads_and_reports_its_store_version(bundles):
    a, _ = bundles
    pred = Predictor.load(a)
    assert pred.version.endswith(bundle_digest(a)[:8])
    assert len(pred.constraints.to_frame(pred.catalog)) > 0


def test_kill_9_while_retraining_over_a_bundle_never_leaves_a_loadable_mix(
    world, bundles, tmp_path
):
    a, _ = bundles
    target = _copy(a, tmp_path / "retrain")
    before = (target / REWARD_WEIGHTS).stat().st_mtime_ns
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "genco.cli",
            "train",
            "--catalog",
            world.catalog,
            "--impressions",
            world.impressions,
            "--constraints",
            world.constraints,
            "--out",
            str(target),
            "--rl-steps",
            "400",
            "--quiet",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            weights = target / REWARD_WEIGHTS
            if weights.exists() and weights.stat().st_mtime_ns != before:
                break  # the new reward model is in place; the generator is training
            time.sleep(0.02)
        assert proc.poll() is None, "training finished before the new reward model appeared"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert not (target / MANIFEST).exists()  # removed before anything new was written
    with pytest.raises(BundleError, match="not a complete bundle"):
        Predictor.load(str(target))


# ======================================================== 2. gate bound to the bundle it judged


def test_gate_written_by_evaluate_deploys_only_the_bundle_it_judged(bundles, tmp_path):
    a, b = bundles
    store = str(tmp_path / "store")
    v1 = promote(a, store).version
    gate_path = str(tmp_path / "eval" / "gate.json")
    data = str(Path(b) / "ingest" / "impressions.parquet")
    result = run_evaluate(b, data, store, gate_path)
    gate = json.loads(Path(gate_path).read_text())
    assert gate["candidate_digest"] == bundle_digest(b) and gate["production_version"] == v1
    if not gate["passed"]:  # make the judged bundle win: a real gate, only the verdict forced
        gate["passed"] = True
        Path(gate_path).write_text(json.dumps(gate))
    # the same gate file for another bundle (a copy of production under a new version id)
    r = genco("deploy", "--model", a, "--store", store, "--gate-file", gate_path, "--version", "x")
    one_line_exit_2(r, "computed for another bundle", bundle_digest(a)[:16])
    assert current_version(store) == v1
    r = genco("deploy", "--model", b, "--store", store, "--gate-file", gate_path)
    assert r.returncode == 0, r.stderr
    pointer = read_pointer(store)
    assert pointer["previous"] == [v1] and pointer["gate"]["candidate_digest"] == bundle_digest(b)
    assert result.candidate_digest == bundle_digest(b)


@pytest.mark.parametrize(
    ("gate", "needle"),
    [
        ({"passed": True}, "'candidate_digest' is None, not a sha256"),
        ({"passed": True, "candidate_digest": "abc"}, "computed for another bundle"),
        ({"passed": True, "candidate_digest": "PROD"}, "'production_version' is missing"),
        ({"passed": True, "candidate_digest": "0" * 64}, "computed for another bundle"),
    ],
)
def test_hand_written_gate_is_refused(bundles, tmp_path, gate, needle):
    a, b = bundles
    store = str(tmp_path / "store")
    promote(a, store)
    before = (Path(store) / POINTER).read_bytes()
    if gate.get("candidate_digest") == "PROD":
        gate = {**gate, "candidate_digest": bundle_digest(b)}
    gate_path = tmp_path / "gate.json"
    gate_path.write_text(json.dumps(gate))
    r = genco("deploy", "--model", b, "--store", store, "--gate-file", str(gate_path))
    one_line_exit_2(r, "not deployed", needle)
    assert (Path(store) / POINTER).read_bytes() == before


def test_gate_file_that_is_not_json_is_one_line(bundles, tmp_path):
    gate_path = tmp_path / "gate.json"
    gate_path.write_text('{"passed": tru')
    r = genco(
        "deploy",
        "--model",
        bundles[0],
        "--store",
        str(tmp_path / "s"),
        "--gate-file",
        str(gate_path),
    )
    one_line_exit_2(r, str(gate_path), "not a gate file")


def test_torn_production_fails_the_gate_closed(bundles, tmp_path):
    a, b = bundles
    prod = _copy(a, tmp_path / "prod")
    shutil.copyfile(Path(b) / REWARD_WEIGHTS, prod / REWARD_WEIGHTS)
    data = str(Path(b) / "ingest" / "impressions.parquet")
    result = evaluate_bundle(b, data, str(prod))
    assert not result.passed
    assert "production cannot score" in result.reason and "reward_model.pt" in result.reason


# ================================================ 3. publish and pointer: one step, with cleanup


def _config_version(store: Path) -> str:
    text = (store / KSERVE_DIR / "config" / "config.properties").read_text()
    names = [v for v in ("v1", "v2", "v3") if mar_name(v) in text]
    assert len(names) == 1, text
    return names[0]


@pytest.fixture(scope="module")
def published(bundles, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store serving v1 from its KServe layout, with v2 archived too (built once)."""
    a, b = bundles
    store = tmp_path_factory.mktemp("published") / "store"
    promote(a, str(store), version="v1", on_promote=make_on_promote(str(store)))
    promote(b, str(store), version="v2", on_promote=make_on_promote(str(store)))
    promote(a, str(store), version="v1")  # an earlier rollback's pointer; layout left at v2
    return store


def _fresh(published: Path, tmp_path: Path) -> Path:
    store = tmp_path / "store"
    shutil.copytree(published, store)
    return store


def test_crash_between_publish_and_pointer_leaves_serving_on_production(published, tmp_path):
    store = _fresh(published, tmp_path)
    serving_hook(str(store))  # bring the layout in step with the pointer first
    assert (current_version(str(store)), _config_version(store)) == ("v1", "v1")
    hook = make_on_promote(str(store))

    def killed_after_publish(vd: str, version: str) -> None:
        hook(vd, version)  # archive built (and a TorchServe would be registered)
        raise KeyboardInterrupt("killed before the pointer write")

    with pytest.raises(KeyboardInterrupt):
        promote(str(store / "versions" / "v2"), str(store), "v3", on_promote=killed_after_publish)
    assert (store / KSERVE_DIR / "model-store" / mar_name("v3")).is_file()
    assert current_version(str(store)) == "v1"
    assert _config_version(store) == "v1"  # serving never ran ahead of CURRENT.json


@pytest.mark.parametrize("verb", ["deploy", "rollback"])
def test_next_deploy_or_rollback_repairs_a_layout_behind_the_pointer(published, tmp_path, verb):
    # The state a crash right after the pointer write leaves: CURRENT.json names v1, the
    # layout still serves v2 (or, with the old order, a layout ahead of the pointer).
    store = _fresh(published, tmp_path)
    assert (current_version(str(store)), _config_version(store)) == ("v1", "v2")
    if verb == "deploy":  # redeploying production: nothing to promote, the layout is repaired
        v1 = str(store / "versions" / "v1")
        r = genco("deploy", "--model", v1, "--store", str(store), "--version", "v1")
        assert r.returncode == 0 and "already the current version" in r.stdout, r.stderr
        assert _config_version(store) == "v1"
    else:
        r = genco("rollback", "--store", str(store), "--to", "v2")
        assert r.returncode == 0, r.stderr
        assert (current_version(str(store)), _config_version(store)) == ("v2", "v2")


def test_a_deploy_cleans_leftovers_of_dead_runs_but_not_of_running_ones(bundles, tmp_path):
    a, b = bundles
    store = tmp_path / "store"
    v1 = promote(a, str(store)).version
    old = time.time() - 3600
    dead_version = store / "versions" / "20260101T000000Z-deadbeef"
    dead_version.mkdir()
    (dead_version / REWARD_WEIGHTS).write_bytes(b"half a copy")
    dead_tmp = store / f".{POINTER}.abc123.tmp"
    dead_tmp.write_text("{")
    dead_mar = store / KSERVE_DIR / "model-store" / ".genco-v9.mar.x1.tmp"
    dead_mar.parent.mkdir(parents=True)
    dead_mar.write_bytes(b"PK")
    for p in (dead_version / REWARD_WEIGHTS, dead_version, dead_tmp, dead_mar):
        os.utime(p, (old, old))
    running = store / "versions" / "29990101T000000Z-running0"  # a copy still being written
    running.mkdir()
    (running / REWARD_WEIGHTS).write_bytes(b"in progress")
    future = time.time() + 3600
    os.utime(running / REWARD_WEIGHTS, (future, future))

    result = promote(b, str(store))
    assert result.deployed and result.previous == v1
    assert set(result.removed) == {str(dead_version), str(dead_tmp), str(dead_mar)}
    assert not dead_version.exists() and not dead_tmp.exists() and not dead_mar.exists()
    assert (running / REWARD_WEIGHTS).exists()
    assert (store / LOCK).exists() and (store / "versions" / v1 / MANIFEST).exists()


def test_gcs_cleanup_removes_incomplete_versions_only(bundles, gcs: GcsEmulator):
    store = gcs.url("store")
    v1 = promote(bundles[0], store).version
    dead = storage.join(store, "versions", "20260101T000000Z-deadbeef", REWARD_WEIGHTS)
    storage.write_bytes(dead, b"half a copy")
    assert clean_leftovers(store, time.time() - 3600) == ()  # written after that: kept
    assert clean_leftovers(store, time.time() + 60) == (dead,)
    assert not storage.exists(dead)
    assert storage.exists(storage.join(version_dir(store, v1), MANIFEST))


# ============================================================== 4. compare-and-swap pointer


def _race(bundles, store: str, barrier_parties: int = 2) -> list[object]:
    """Two deploys that both read the pointer before either writes it."""
    barrier = threading.Barrier(barrier_parties, timeout=60)
    outcomes: list[object] = [None, None]

    def hold(vd: str, version: str) -> None:
        barrier.wait()

    def run(i: int) -> None:
        try:
            outcomes[i] = promote(bundles[i], store, f"race-{i}", on_promote=hold)
        except StoreError as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return outcomes


@pytest.mark.parametrize("rounds", [5])
def test_two_racing_deploys_exactly_one_wins_locally(bundles, tmp_path, rounds):
    for n in range(rounds):
        store = str(tmp_path / f"store{n}")
        v0 = promote(bundles[0], store, "base").version
        outcomes = _race(bundles, store)
        wins = [o for o in outcomes if not isinstance(o, StoreError)]
        losses = [o for o in outcomes if isinstance(o, StoreError)]
        assert len(wins) == 1 and len(losses) == 1, outcomes
        assert "production moved while this deploy ran" in str(losses[0])
        pointer = read_pointer(store)  # parses: never torn
        assert pointer["version"] == wins[0].version and pointer["previous"] == [v0]


def test_racing_cli_deploys_one_wins_the_other_exits_2(bundles, tmp_path):
    a, b = bundles
    store = tmp_path / "store"
    promote(a, str(store), "base")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    fd = os.open(store / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # hold both at the pointer write, after each read it
    try:
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "genco.cli",
                    "deploy",
                    "--model",
                    m,
                    "--store",
                    str(store),
                    "--version",
                    v,
                ],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for m, v in ((b, "cli-b"), (a, "cli-a"))
        ]
        deadline = time.time() + 240
        while time.time() < deadline and not all(
            (store / "versions" / v / MANIFEST).exists() for v in ("cli-b", "cli-a")
        ):
            assert all(p.poll() is None for p in procs)
            time.sleep(0.05)
        time.sleep(0.5)  # both are now waiting on the lock (or just before it)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[0] == 2)
    err = loser[2].strip()
    assert "\n" not in err and "production moved while this deploy ran" in err, err
    winner = json.loads(next(r for r in results if r[0] == 0)[1])
    pointer = read_pointer(str(store))
    assert pointer["version"] == winner["version"] and pointer["previous"] == ["base"]


def test_gcs_deploy_refused_when_the_pointer_moved_after_it_read_it(bundles, gcs: GcsEmulator):
    store = gcs.url("store")
    promote(bundles[0], store, "base")
    other_done = threading.Event()

    def wait_for_the_other(vd: str, version: str) -> None:
        other = threading.Thread(target=promote, args=(bundles[1], store, "fast"))
        other.start()
        other.join(60)
        other_done.set()

    with pytest.raises(StoreError, match="production moved while this deploy ran"):
        promote(bundles[0], store, "slow", on_promote=wait_for_the_other)
    assert other_done.is_set()
    pointer = read_pointer(store)
    assert pointer["version"] == "fast" and pointer["previous"] == ["base"]


class _Recording(requests.Session):
    """A real HTTP session that keeps the URLs it sent (to see the precondition go out)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, str]] = []

    def request(self, method, url, *args, **kwargs):  # type: ignore[override]
        params = kwargs.get("params") or {}
        self.sent.append((method, f"{url} {params}"))
        return super().request(method, url, *args, **kwargs)


def test_gcs_pointer_write_carries_the_generation_precondition(bundles, gcs: GcsEmulator):
    # gcp-storage-emulator ignores ifGenerationMatch (a stale precondition still uploads), so
    # the atomicity on real GCS is shown by the request carrying it; the emulator race above
    # is caught by the generation re-read just before the write.
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs_storage

    session = _Recording()
    client = gcs_storage.Client(
        project="test",
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": gcs.host},
        _http=session,
    )
    store = gcs.url("store")
    promote(bundles[0], store, "first", client=client)
    first = client.bucket(gcs.bucket).get_blob(store[len(f"gs://{gcs.bucket}/") :] + "/" + POINTER)
    promote(bundles[1], store, "second", client=client)
    sent = [re.search(r"ifGenerationMatch\W+(\d+)", u) for m, u in session.sent if m == "POST"]
    preconditions = [int(m.group(1)) for m in sent if m]
    assert preconditions == [0, first.generation], session.sent  # create-if-absent, then CAS
