"""`genco deploy --serving` / `genco rollback --serving`: the version that becomes production
is also published in the KServe layout."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_handler import tiny_bundle


def genco(*args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "genco.cli", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_deploy_publishes_the_promoted_version_for_torchserve(
    tmp_path, tmp_path_factory: pytest.TempPathFactory
):
    bundle = tiny_bundle(tmp_path_factory)
    store = tmp_path / "store"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "genco.cli",
            "deploy",
            "--model",
            bundle,
            "--store",
            str(store),
            "--serving",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    version = json.loads(r.stdout)["version"]
    mar = store / "kserve" / "model-store" / f"genco-{version}.mar"
    assert mar.is_file() and mar.stat().st_size > 0
    config = (store / "kserve" / "config" / "config.properties").read_text()
    assert f"genco-{version}.mar" in config
    assert json.loads((store / "CURRENT.json").read_text())["version"] == version


def test_rollback_moves_the_published_layout_too(
    tmp_path, tmp_path_factory: pytest.TempPathFactory
):
    bundle = tiny_bundle(tmp_path_factory)
    store = tmp_path / "store"
    layout = store / "kserve"
    genco("deploy", "--model", bundle, "--store", str(store), "--version", "v1")
    assert not layout.exists()  # no serving asked for, none published
    genco("deploy", "--model", bundle, "--store", str(store), "--version", "v2", "--serving")
    config = layout / "config" / "config.properties"
    assert "genco-v2.mar" in config.read_text()
    assert not (layout / "model-store" / "genco-v1.mar").exists()

    # Once a store publishes for serving, a rollback keeps serving in step (no flag needed):
    # v1 was never archived, so it is built now.
    out = genco("rollback", "--store", str(store))
    assert (out["version"], out["reason"]) == ("v1", "rolled back from v2")
    assert json.loads((store / "CURRENT.json").read_text())["version"] == "v1"
    text = config.read_text()
    assert "genco-v1.mar" in text and "genco-v2.mar" not in text

    # Back to v2: its archive is reused, not rebuilt.
    v2_mar = layout / "model-store" / "genco-v2.mar"
    built = v2_mar.stat().st_mtime_ns
    genco("rollback", "--store", str(store), "--to", "v2")
    assert "genco-v2.mar" in config.read_text()
    assert v2_mar.stat().st_mtime_ns == built
