"""Secure serving configs and their limits, on real files and a real TorchServe: keys that
expire when configured and are renewed, models only from our store, no public listener but
the one asked for, layouts validated and archives checked before anything runs them."""

from __future__ import annotations

import shutil
import time
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

from genco.serving import archive, torchserve
from genco.serving.config import (
    JVM_ARGS,
    KSERVE_MODEL_STORE,
    TOKEN_EXPIRY_MIN,
    allowed_urls,
    check_layout_config,
    checked_members,
    kserve_properties,
    local_properties,
    mar_name,
    parse_properties,
    properties_text,
)
from genco.serving.management import ManagementError
from tests.test_handler import tiny_bundle

ROOT = Path(__file__).resolve().parents[1]
HTTP_S = 60.0
needs_java = pytest.mark.skipif(
    shutil.which("java") is None, reason="TorchServe needs Java 17 (.ci/run installs it)"
)
SHORT_EXPIRY_MIN = 0.1  # six seconds


def _props(text: str) -> dict[str, str]:
    return parse_properties(text)


def _local(tmp_path: Path, **kw: object) -> dict[str, str]:
    store = str(tmp_path / "model-store")
    return _props(local_properties(store, "v1", [1, 2, 3, 4, 5], **kw))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ configs


def test_every_shipped_config_is_authenticated_and_limited_to_its_store(tmp_path: Path) -> None:
    image = _props((ROOT / "Dockerfiles" / "serving-config.properties").read_text())
    configs = {
        "local": (_local(tmp_path), str(tmp_path / "model-store")),
        "kserve": (_props(kserve_properties("v1")), KSERVE_MODEL_STORE),
        "image": (image, image["model_store"]),
    }
    for name, (props, store) in configs.items():
        assert props["disable_token_authorization"] == "false", name
        assert props["allowed_urls"] == allowed_urls(store), name
        assert float(props["token_expiration_min"]) == TOKEN_EXPIRY_MIN, name
        assert props["decode_input_request"] == "false", name
        public = {k for k, v in props.items() if k.endswith("address") and "0.0.0.0" in v}
        # Only a container's or pod's inference and metrics listeners are public, on purpose
        # (clients, and Prometheus's scrape).
        expected = {"inference_address", "metrics_address"}
        assert public == (set() if name == "local" else expected), name
        assert props["management_address"].startswith("http://127.0.0.1:"), name
        if name == "local":
            assert props["metrics_address"].startswith("http://127.0.0.1:"), name
        # Prometheus metrics on, ours registered without a metrics file (README "Metrics").
        assert props["metrics_mode"] == "prometheus", name
        assert props["enable_metrics_api"] == "true", name
        assert props["model_metrics_auto_detect"] == "true", name
        for key in ("grpc_inference_address", "grpc_management_address"):
            assert props[key] == "127.0.0.1", (name, key)


def test_allowed_urls_is_a_java_regex_of_the_store_only() -> None:
    assert allowed_urls("/a.b/store") == r"file://\Q/a.b/store\E/[^/]+\.mar"
    text = properties_text({"allowed_urls": allowed_urls("/s")})
    assert text == "allowed_urls=file://\\\\Q/s\\\\E/[^/]+\\\\.mar\n"  # Java unescapes it
    assert _props(text)["allowed_urls"] == allowed_urls("/s")
    with pytest.raises(ValueError, match="model store '/a,b' must not contain ','"):
        allowed_urls("/a,b")


def test_token_expiry_must_be_positive_and_bounded(tmp_path: Path) -> None:
    assert _local(tmp_path, token_expiry_min=30)["token_expiration_min"] == "30"
    for bad in (0, -1, TOKEN_EXPIRY_MIN + 1):
        with pytest.raises(ValueError, match=r"token_expiry_min must be in \(0, 5256000\]"):
            _local(tmp_path, token_expiry_min=bad)


def test_a_version_switch_keeps_the_layouts_token_setting(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    bundle = tiny_bundle(tmp_path_factory)
    root = tmp_path / "layout"
    archive.publish(bundle, str(root), "v1", token_auth=False)
    config = root / "config" / "config.properties"
    assert _props(config.read_text())["disable_token_authorization"] == "true"
    archive.publish(bundle, str(root), "v2")  # e.g. genco deploy, which passes no setting
    assert _props(config.read_text())["disable_token_authorization"] == "true"
    archive.publish(bundle, str(root), "v3", token_auth=True)
    assert _props(config.read_text())["disable_token_authorization"] == "false"


# ----------------------------------------------------------------------- layout checks

V1 = kserve_properties("v1")
BAD_LAYOUTS: list[tuple[str, str]] = [
    (
        V1.replace(JVM_ARGS, "-javaagent:/tmp/evil.jar"),
        "vmargs='-javaagent:/tmp/evil.jar' is not allowed (expected exactly genco's JVM_ARGS",
    ),
    (V1 + "load_models=all\n", "key 'load_models' is not one genco writes"),
    (V1 + "plugins_path=/tmp/p\n", "key 'plugins_path' is not one genco writes"),
    (
        V1.replace("install_py_dep_per_model=false", "install_py_dep_per_model=true"),
        "install_py_dep_per_model='true' is not allowed (expected false (no installs",
    ),
    (
        V1.replace("allowed_urls=", "allowed_urls=.*,"),
        "allowed_urls='.*,file://",
    ),
    (
        V1.replace("model_store=/mnt/models/model-store", "model_store=/etc"),
        "model_store='/etc' is not allowed",
    ),
    (
        V1.replace("http://127.0.0.1:8081", "http://0.0.0.0:8081 -Dx=1"),
        "management_address='http://0.0.0.0:8081 -Dx=1' is not allowed",
    ),
    (
        V1.replace('"marName":"genco-v1.mar"', '"marName":"../../x.mar"'),
        "model_snapshot version 'v1' must be the default and archived as genco-v1.mar",
    ),
    (
        V1.replace('"minWorkers":1', '"minWorkers":1000'),
        "model_snapshot minWorkers=1000 must be an integer in [0, 64]",
    ),
    (V1.replace('"v1":', '"../v1":'), "model_snapshot version '../v1' must be 1-128 letters"),
    ("\n".join(line for line in V1.splitlines() if "snapshot" not in line), "no model_snapshot"),
]


@pytest.mark.parametrize(("text", "message"), BAD_LAYOUTS)
def test_layout_configs_are_validated(text: str, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        check_layout_config(text, "STORE/config/config.properties")
    assert str(exc.value).startswith("STORE/config/config.properties: ")
    assert message in str(exc.value)


def test_layouts_genco_writes_pass() -> None:
    props, version = check_layout_config(kserve_properties("v7", token_auth=False))
    assert version == "v7" and props["disable_token_authorization"] == "true"


def _zip(path: Path, members: dict[str, bytes], link: str | None = None) -> zipfile.ZipFile:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
        if link is not None:
            info = zipfile.ZipInfo(link)
            info.external_attr = 0o120777 << 16
            z.writestr(info, "/etc/passwd")
    return zipfile.ZipFile(path)


@pytest.mark.parametrize(
    ("members", "link", "message"),
    [
        ({"../evil.py": b"x"}, None, "member '../evil.py' would unpack outside its directory"),
        ({"/etc/cron.d/x": b"x"}, None, "member '/etc/cron.d/x' would unpack outside"),
        ({"a\\..\\..\\x": b"x"}, None, "would unpack outside its directory"),
        ({"ok.txt": b"x"}, "link", "member 'link' is a symbolic link"),
        ({"big": b"\0" * 5000}, None, "members unpack to over 4096 bytes; refusing to unpack"),
    ],
)
def test_archives_are_checked_before_unpacking(
    tmp_path: Path, members: dict[str, bytes], link: str | None, message: str
) -> None:
    with _zip(tmp_path / "x.mar", members, link) as z, pytest.raises(ValueError) as exc:
        checked_members(z, "STORE/model-store/x.mar", max_bytes=4096)
    assert str(exc.value).startswith("STORE/model-store/x.mar: ") and message in str(exc.value)
    assert list(tmp_path.iterdir()) == [tmp_path / "x.mar"]  # nothing was unpacked


@needs_java
def test_serve_layout_refuses_a_tampered_store_before_running_it(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    bundle = tiny_bundle(tmp_path_factory)
    root = tmp_path / "layout"
    archive.publish(bundle, str(root), "v1")
    config = root / "config" / "config.properties"
    good = config.read_text()
    config.write_text(good.replace(JVM_ARGS, "-javaagent:/tmp/evil.jar"))
    with pytest.raises(ValueError, match="vmargs='-javaagent:/tmp/evil.jar' is not allowed"):
        torchserve.serve_layout(str(root), workdir=str(tmp_path / "w1"))
    assert not (tmp_path / "w1").exists()  # refused before any directory or process

    config.write_text(good)
    mar = root / "model-store" / mar_name("v1")
    with zipfile.ZipFile(mar, "a") as z:
        z.writestr("../../escaped.py", "print('pwned')")
    with pytest.raises(ValueError, match="member '../../escaped.py' would unpack outside"):
        torchserve.serve_layout(str(root), workdir=str(tmp_path / "w2"))
    assert not list(tmp_path.rglob("escaped.py"))


# ------------------------------------------------------------------ real server: tokens


@pytest.fixture(scope="module")
def short_lived(tmp_path_factory: pytest.TempPathFactory) -> Iterator[torchserve.ServeHandle]:
    """A server whose keys expire after six seconds, with the model API on."""
    handle = torchserve.serve(
        tiny_bundle(tmp_path_factory),
        version="v1",
        token_expiry_min=SHORT_EXPIRY_MIN,
        enable_model_api=True,
        startup_timeout_s=240,
    )
    try:
        yield handle
    finally:
        handle.stop()


@needs_java
def test_keys_expire_as_configured_and_renewal_brings_them_back(
    short_lived: torchserve.ServeHandle,
) -> None:
    h = short_lived
    url, body = h.predictions_url(), h.sample_request
    old = h.headers()
    expiry = h.token_expiry()
    assert expiry is not None
    wait = (expiry - datetime.now(UTC)).total_seconds() + 1.0
    # Six seconds after start, not TorchServe's default 60 minutes (on a loaded machine the
    # keys may already have expired by the time the worker is up: then no wait).
    assert wait < 10
    time.sleep(max(wait, 0.0))
    expired = requests.post(url, json=body, headers=old, timeout=HTTP_S)
    assert expired.status_code == 400 and "Token Authorization failed" in expired.text

    assert h.renew_expiring(within_s=60) == ["inference", "management"]
    assert h.renew_expiring(within_s=1) == []  # fresh keys are left alone
    assert h.headers() != old
    resp = requests.post(url, json=body, headers=h.headers(), timeout=HTTP_S)
    assert resp.status_code == 200, resp.text
    assert requests.post(url, json=body, headers=old, timeout=HTTP_S).status_code == 400


@needs_java
def test_models_register_only_from_the_servers_own_store(
    short_lived: torchserve.ServeHandle,
) -> None:
    h = short_lived
    h.renew_token("management")  # six-second keys: a fresh one for this test
    mgmt = h.management()
    for url in (
        "https://example.com/genco.mar",
        "http://127.0.0.1:1/genco-v9.mar",
        f"file://{h.workdir}/elsewhere/genco-v9.mar",
    ):
        with pytest.raises(ManagementError) as exc:
            mgmt.register(url)
        assert "does not match any allowed URL" in str(exc.value), url
    assert mgmt.versions() == ["v1"]


def test_image_keeps_genco_jvm_and_rotating_log_config() -> None:
    props = _props((ROOT / "Dockerfiles" / "serving-config.properties").read_text())
    assert props["vmargs"] == (
        JVM_ARGS + " -Dlog4j.configurationFile=file:///home/model-server/log4j2.xml"
    )
    log4j = (ROOT / "serving" / "log4j2.xml").read_text()
    assert log4j.count("<SizeBasedTriggeringPolicy") == log4j.count("<RollingFile ") == 2
    assert "<File " not in log4j


@needs_java
def test_genco_serve_renews_keys_before_they_expire(
    short_lived: torchserve.ServeHandle, capsys: pytest.CaptureFixture[str]
) -> None:
    """The loop of a running ``genco serve --token-expiry-min`` (one pass of it)."""
    from genco.cli.serve import _renew

    h = short_lived
    h.renew_token("inference")
    before = h.token("inference")
    _renew(h)  # six-second keys are always within the minute before expiry
    assert h.token("inference") != before
    assert f"renewed the inference key in {h.key_file}" in capsys.readouterr().err
    resp = requests.post(
        h.predictions_url(), json=h.sample_request, headers=h.headers(), timeout=HTTP_S
    )
    assert resp.status_code == 200, resp.text


def test_cli_token_expiry_applies_to_a_bundle_not_a_layout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from genco.cli import main

    args = ["serve", "--layout", str(tmp_path), "--token-expiry-min", "30"]
    assert main(args) == 2
    assert "--token-expiry-min applies to --model" in capsys.readouterr().err
