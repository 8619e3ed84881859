"""`genco deploy --serving`: promotion also publishes the version in the KServe layout."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_handler import tiny_bundle


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
