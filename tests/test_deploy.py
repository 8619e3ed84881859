"""genco.store: versioned model store, atomic pointer, gate refusal, rollback; local and gs://."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from genco.data import storage
from genco.errors import BundleError
from genco.inference.predictor import Predictor
from genco.models.checkpoint import MANIFEST
from genco.models.generator import GeneratorConfig
from genco.models.reward import RewardModelConfig
from genco.store import (
    POINTER,
    bundle_digest,
    current,
    current_version,
    list_versions,
    promote,
    read_pointer,
    rollback,
    run_deploy,
    version_dir,
)
from genco.training.bundle import run_train
from genco.worlds.simulate import simulate, world_config

if TYPE_CHECKING:
    from tests.conftest import GcsEmulator


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Two real, different bundles trained in seconds on a tiny world."""
    root = tmp_path_factory.mktemp("deploy_bundles")
    sim = simulate(
        world_config("default", n_ads=4), seed=0, out_dir=str(root / "w"), n_impressions=3000
    )
    out = []
    for seed in (0, 1):
        path = str(root / f"bundle{seed}")
        run_train(
            sim.catalog,
            sim.impressions,
            path,
            sim.constraints,
            RewardModelConfig(epochs=2, seed=seed),
            GeneratorConfig(rl_steps=2, seed=seed),
        )
        out.append(path)
    return out[0], out[1]


@pytest.fixture(params=["local", "gs"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    emulator: GcsEmulator = request.getfixturevalue("gcs")
    return emulator.url("store")


def _pointer_bytes(store: str) -> bytes | None:
    path = storage.join(store, POINTER)
    return storage.read_bytes(path) if storage.exists(path) else None


def test_promote_writes_complete_version_then_pointer(bundles, store):
    a, _ = bundles
    assert current(store) is None and list_versions(store) == []
    result = promote(a, store)
    assert result.deployed and result.previous is None and result.reason == "promoted"
    target = version_dir(store, result.version)
    assert current(store) == target == result.version_dir
    manifest = json.loads(storage.read_bytes(storage.join(a, MANIFEST)))
    copied = set(storage.listdir(target))
    assert copied == {*manifest["files"], MANIFEST}  # bundle's ingest/ side folder not copied
    assert storage.read_bytes(storage.join(target, MANIFEST)) == storage.read_bytes(
        storage.join(a, MANIFEST)
    )
    pointer = read_pointer(store)
    assert pointer["previous"] == [] and pointer["path"] == f"versions/{result.version}"
    # What serving will do: load the production bundle through the pointer.
    assert Predictor.load(current(store)).recommend("ad_0000", top_k=1)


def test_version_id_is_creation_time_and_manifest_sha(bundles, tmp_path):
    a, _ = bundles
    result = promote(a, str(tmp_path / "s"))
    stamp, sha = result.version.rsplit("-", 1)
    assert sha == bundle_digest(a)[:8]
    assert len(stamp) == 16 and stamp.endswith("Z") and "T" in stamp


def test_second_promote_keeps_previous_and_rollback_walks_back(bundles, store):
    a, b = bundles
    v1 = promote(a, store).version
    r2 = promote(b, store)
    assert r2.deployed and r2.previous == v1
    assert read_pointer(store)["previous"] == [v1]
    listed = list_versions(store)
    assert [v["version"] for v in listed] == sorted([v1, r2.version])
    assert {v["version"]: v["current"] for v in listed} == {v1: False, r2.version: True}

    back = rollback(store)
    assert back.deployed and back.version == v1 and back.previous == r2.version
    assert current_version(store) == v1
    assert read_pointer(store)["rolled_back_from"] == r2.version
    with pytest.raises(ValueError, match="has no previous version to roll back to"):
        rollback(store)
    # Versions are never deleted: roll forward again by name.
    fwd = rollback(store, to_version=r2.version)
    assert fwd.deployed and current_version(store) == r2.version
    assert read_pointer(store)["previous"] == [v1]


def test_promote_is_idempotent(bundles, tmp_path):
    a, _ = bundles
    store = str(tmp_path / "s")
    first = promote(a, store)
    before = _pointer_bytes(store)
    again = promote(a, store)
    assert again.deployed and again.version == first.version
    assert again.reason == "already the current version"
    assert _pointer_bytes(store) == before


@pytest.mark.parametrize(
    ("gate", "reason"),
    [
        (
            {"passed": False, "reason": "candidate lost"},
            "evaluation gate not passed: candidate lost",
        ),
        ({"passed": True, "candidate_digest": "0" * 64}, "computed for another bundle"),
        ({"passed": True, "production_version": "someone-else"}, "production changed since"),
    ],
)
def test_gate_refusal_changes_nothing(bundles, store, gate, reason):
    a, b = bundles
    v1 = promote(a, store).version
    before = _pointer_bytes(store)
    result = promote(b, store, gate=gate)
    assert not result.deployed and reason in result.reason
    assert result.version is None and result.previous == v1
    assert _pointer_bytes(store) == before
    assert [v["version"] for v in list_versions(store)] == [v1]  # no copy either


def test_passing_gate_for_this_bundle_promotes_and_is_recorded(bundles, tmp_path):
    a, b = bundles
    store = str(tmp_path / "s")
    v1 = promote(a, store).version
    gate = {
        "passed": True,
        "reason": "candidate value 0.2 >= production 0.1 x (1 + 0) = 0.1",
        "margin": 0.0,
        "candidate_digest": bundle_digest(b),
        "production_version": v1,
        "candidate_value": 0.2,
        "production_value": 0.1,
    }
    gate_path = str(tmp_path / "gate.json")
    storage.write_json(gate_path, gate)
    result = run_deploy(b, store, gate_path)
    assert result.deployed and result.previous == v1
    assert read_pointer(store)["gate"]["candidate_value"] == 0.2


@pytest.mark.parametrize(
    ("gate", "message"),
    [
        ({"reason": "x"}, "gate: 'passed' must be true or false"),
        ({"passed": "yes"}, "gate: 'passed' must be true or false"),
    ],
)
def test_malformed_gate_is_an_error(bundles, tmp_path, gate, message):
    with pytest.raises(ValueError, match=message):
        promote(bundles[0], str(tmp_path / "s"), gate=gate)


def test_damaged_or_incomplete_bundle_never_reaches_the_store(bundles, tmp_path):
    store = str(tmp_path / "s")
    damaged = tmp_path / "damaged"
    storage.upload_dir(bundles[0], str(damaged))
    (damaged / "generator.pt").write_bytes(b"not the trained weights")
    with pytest.raises(ValueError, match="generator.pt does not match its sha256"):
        promote(str(damaged), store)
    os.remove(damaged / MANIFEST)
    with pytest.raises(BundleError, match="not a complete bundle"):
        promote(str(damaged), store)
    assert not os.path.exists(store)


def test_on_promote_runs_before_the_pointer_moves(bundles, tmp_path):
    a, b = bundles
    store = str(tmp_path / "s")
    v1 = promote(a, store).version
    calls: list[tuple[str, str, str | None]] = []

    def register(path: str, version: str) -> None:
        calls.append((path, version, current_version(store)))

    result = promote(b, store, on_promote=register)
    assert calls == [(result.version_dir, result.version, v1)]
    back = rollback(store, on_promote=register)
    assert calls[-1] == (back.version_dir, v1, result.version)
    rollback(store, to_version=result.version)

    def broken(path: str, version: str) -> None:
        raise RuntimeError("model server unreachable")

    before = _pointer_bytes(store)
    with pytest.raises(RuntimeError, match="unreachable"):
        promote(a, store, version="manual-1", on_promote=broken)
    assert _pointer_bytes(store) == before


@pytest.mark.parametrize(
    ("version", "message"),
    [
        ("../escape", "must be 1-128 letters, digits"),
        ("", "must be 1-128 letters, digits"),
        (".hidden", "must be 1-128 letters, digits"),
    ],
)
def test_bad_version_ids(bundles, tmp_path, version, message):
    with pytest.raises(ValueError, match=message):
        promote(bundles[0], str(tmp_path / "s"), version=version)


def test_rollback_errors(bundles, tmp_path):
    store = str(tmp_path / "s")
    with pytest.raises(ValueError, match="no production model to roll back"):
        rollback(store)
    promote(bundles[0], store)
    with pytest.raises(ValueError, match="version 'nope' does not exist"):
        rollback(store, to_version="nope")


def test_bundle_on_gcs_into_gcs_store(bundles, gcs: GcsEmulator):
    root = gcs.url("")
    remote_bundle = storage.join(root, "bundle")
    storage.upload_dir(bundles[1], remote_bundle)
    store = storage.join(root, "store")
    result = promote(remote_bundle, store)
    assert result.deployed and current(store) == storage.join(store, "versions", result.version)
    assert Predictor.load(current(store)).recommend("ad_0001", top_k=1)
