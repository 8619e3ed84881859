"""`genco deploy --serving` / `genco rollback --serving`: the version that becomes production
is also published in the KServe layout."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.test_handler import tiny_bundle

needs_java = pytest.mark.skipif(
    shutil.which("java") is None, reason="TorchServe needs Java 17 (.ci/run installs it)"
)


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


# ------------------------------------------- against a real TorchServe (genco serve's own)


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for a directory): the store as it is."""
    return {
        str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
        for p in sorted(root.rglob("*"))
    }


def _deploy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "genco.cli", "deploy", *args], capture_output=True, text=True
    )


@needs_java
@pytest.mark.parametrize("model_api", [False, True], ids=["model-api-off", "model-api-on"])
def test_deploy_registers_on_genco_serve_or_leaves_the_store_as_it_was(
    model_api: bool, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`genco serve --store S [--enable-model-api]`, then `genco deploy --store S
    --management-url`: registered, made the default and rolled back with the model API on;
    refused (405) with it off, leaving the store byte for byte as it was."""
    from genco.cli.serve import _model_store
    from genco.serving import torchserve

    bundle = tiny_bundle(tmp_path_factory)
    store = tmp_path / "store"
    genco("deploy", "--model", bundle, "--store", str(store), "--version", "v1", "--serving")
    server = torchserve.serve(
        bundle,
        version="v1",
        enable_model_api=model_api,
        model_store=_model_store(str(store)),
        startup_timeout_s=240,
    )
    with server:
        assert server.model_store == str(store / "kserve" / "model-store")
        flags = ["--management-url", server.management_url, "--key-file", str(server.key_file)]
        before = _tree(store)
        r = _deploy("--model", bundle, "--store", str(store), "--version", "v2", *flags)
        if not model_api:
            assert r.returncode == 2
            assert len(r.stderr.strip().splitlines()) == 1 and "405" in r.stderr, r.stderr
            assert _tree(store) == before  # no orphan version, no orphan archive
            assert server.management().versions() == ["v1"]
            return
        assert r.returncode == 0, r.stderr
        mgmt = server.management()
        assert (mgmt.default_version(), sorted(mgmt.versions())) == ("v2", ["v1", "v2"])
        resp = requests.post(
            server.predictions_url(),
            json=server.sample_request,
            headers=server.headers(),
            timeout=60,
        )
        assert resp.json()["model_version"] == "v2"
        assert json.loads((store / "CURRENT.json").read_text())["version"] == "v2"
        back = subprocess.run(
            [sys.executable, "-m", "genco.cli", "rollback", "--store", str(store), *flags],
            capture_output=True,
            text=True,
        )
        assert back.returncode == 0, back.stderr
        assert mgmt.default_version() == "v1"
        config = (store / "kserve" / "config" / "config.properties").read_text()
        assert "genco-v1.mar" in config

        # A registration the server refuses (a wrong management key) changes nothing either.
        bad_key = tmp_path / "bad_key.json"
        keys = json.loads(Path(str(server.key_file)).read_text())
        keys["management"]["key"] = "wrong"
        bad_key.write_text(json.dumps(keys))
        before = _tree(store)
        r = _deploy(
            "--model",
            bundle,
            "--store",
            str(store),
            "--version",
            "v3",
            "--management-url",
            server.management_url,
            "--key-file",
            str(bad_key),
        )
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert _tree(store) == before
        assert "v3" not in mgmt.versions()


def test_serve_flags_reach_torchserve(tmp_path: Path) -> None:
    """--enable-model-api and --store apply to --model only; a remote store is refused."""
    from genco.cli import main
    from genco.cli.serve import _model_store
    from genco.errors import ConfigError

    assert _model_store(str(tmp_path)) == str(tmp_path / "kserve" / "model-store")
    with pytest.raises(ConfigError, match="a local model store"):
        _model_store("gs://bucket/store")
    assert main(["serve", "--layout", str(tmp_path), "--enable-model-api"]) == 2


def test_a_failed_on_promote_leaves_the_store_as_it_was(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """In process, for an empty store and one with a version: the copied version and the
    directories made for it are removed again; a version already there is kept."""
    from genco.store import promote

    bundle = tiny_bundle(tmp_path_factory)
    store = tmp_path / "store"

    def refuse(version_dir: str, version: str) -> None:
        raise RuntimeError(f"{version} refused")

    store.mkdir()
    for existing in ([], ["v1"]):
        for v in existing:
            promote(bundle, str(store), v)
        before = _tree(store)
        with pytest.raises(RuntimeError, match="v2 refused"):
            promote(bundle, str(store), "v2", on_promote=refuse)
        assert _tree(store) == before
    other = tmp_path / "other"  # a store that did not exist is not left behind
    with pytest.raises(RuntimeError, match="v1 refused"):
        promote(bundle, str(other), "v1", on_promote=refuse)
    assert not other.exists()
