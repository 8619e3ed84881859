"""The cluster's inference auth (``genco.serving.auth``): bearer tokens from a mounted
Kubernetes Secret, checked by the handler, read again when the Secret rotates. In process,
with a real TorchServe ``Context``; the real server is ``tests/test_kserve_layout.py``'s pod."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from genco.errors import ConfigError
from genco.serving import auth
from tests.test_handler import (  # noqa: F401  (session fixtures)
    AD0,
    _context,
    bundle_dir,
    mar,
    model_dir,
    one_torch_thread,
)

OLD, NEW = "a" * 32, "b" * 32


def secret_volume(root: Path, content: str) -> Path:
    """A directory as the kubelet mounts a Secret: ``token -> ..data/token``, ``..data`` a
    link to a timestamped directory; ``rotate_secret`` swaps ``..data`` atomically."""
    root.mkdir(parents=True, exist_ok=True)
    rotate_secret(root, content)
    (root / "token").symlink_to("..data/token")
    return root / "token"


def rotate_secret(root: Path, content: str) -> None:
    generation = root / f"..2026_{len(list(root.glob('..2026_*')))}"
    generation.mkdir()
    (generation / "token").write_text(content)
    tmp = root / "..data_tmp"
    tmp.symlink_to(generation.name)
    os.replace(tmp, root / "..data")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "holds no token"),
        ("\n  \n", "holds no token"),
        ("short\n", "line 1: a token is one word of at least 16 characters (got 5)"),
        (f"{OLD}\n\nnot one word at all\n", "line 3: a token is one word of at least 16"),
    ],
)
def test_bad_token_files_are_refused_naming_the_line(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(ConfigError, match=re.escape(message)) as refused:
        auth.read_tokens(str(path))
    assert str(path) in str(refused.value)
    with pytest.raises(ConfigError, match="cannot be read"):
        auth.read_tokens(str(tmp_path / "missing"))


def test_bearer_credentials() -> None:
    assert auth.bearer(f"Bearer {OLD}") == OLD
    assert auth.bearer(f"bearer   {OLD} ") == OLD
    assert auth.bearer(f"Bearer {OLD}".encode()) == OLD  # a gRPC input arrives as bytes
    for bad in (None, "", OLD, f"Basic {OLD}", "Bearer ", 3):
        assert auth.bearer(bad) is None  # type: ignore[arg-type]


def test_rotation_overlap_and_a_vanished_secret(tmp_path: Path) -> None:
    path = secret_volume(tmp_path / "secret", OLD + "\n")
    tokens = auth.TokenFile(str(path))
    screen = lambda *given: [  # noqa: E731
        None if r is None else r.status for r in auth.screen(tokens, list(given))
    ]
    assert screen(f"Bearer {OLD}", f"Bearer {NEW}", None) == [None, 401, 401]
    rotate_secret(path.parent, f"{OLD}\n{NEW}\n")  # overlap: both accepted
    assert screen(f"Bearer {OLD}", f"Bearer {NEW}") == [None, None]
    rotate_secret(path.parent, NEW)  # the old token retired, no restart
    assert screen(f"Bearer {OLD}", f"Bearer {NEW}") == [401, None]
    (path.parent / "..data").unlink()  # the Secret gone: the server's fault, fail closed
    [refusal] = auth.screen(tokens, [f"Bearer {NEW}"])
    assert refusal is not None and refusal.status == 503
    assert json.loads(refusal.body)["error"]["field"] == "authorization"
    assert auth.screen(None, [None, "x"]) == [None, None]  # no token file: no check


def test_client_token_from_flag_file_or_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "token"
    path.write_text(f"\n{NEW}\n{OLD}\n")
    monkeypatch.delenv(auth.CLIENT_TOKEN_ENV, raising=False)
    assert auth.client_token() is None
    monkeypatch.setenv(auth.CLIENT_TOKEN_ENV, OLD)
    assert auth.client_token() == OLD
    assert auth.client_token(token_file=str(path)) == NEW  # the first token of the file
    assert auth.client_token("given", str(path)) == "given"


@pytest.fixture()
def guarded(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:  # noqa: F811
    """The archived handler initialised as in the manifest's pod: a token file in the env."""
    path = secret_volume(tmp_path / "secret", OLD)
    monkeypatch.setenv(auth.TOKEN_FILE_ENV, str(path))
    spec = importlib.util.spec_from_file_location("genco_auth_handler", model_dir / "handler.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    handler = module.GencoHandler()
    with one_torch_thread():
        handler.initialize(_context(model_dir, [{}]))
    return handler


def test_handler_answers_401_per_row_for_every_protocol(guarded: Any, model_dir: Path) -> None:  # noqa: F811
    request = json.dumps({"ad_id": AD0, "top_k": 2}).encode()
    v1 = json.dumps({"instances": [{"ad_id": AD0}]}).encode()
    rows = [{"body": request}, {"body": request}, {"body": v1}, {"body": v1}]
    rows += [{"data": request, "authorization": f"Bearer {OLD}".encode()}, {"data": request}]
    ok, wrong = {"Authorization": f"Bearer {OLD}"}, {"authorization": f"Bearer {NEW}"}
    # The last two are gRPC rows: the worker lists each input among the headers too.
    grpc_headers = {"data": {"content-type": ""}, "authorization": {"content-type": ""}}
    headers: list[dict[str, Any]] = [ok, wrong, ok, {}, grpc_headers, {"data": {}}]
    ctx = _context(model_dir, headers)
    bodies = [json.loads(b) for b in guarded.handle(rows, ctx)]
    statuses = [ctx.get_response_status(i)[0] for i in range(len(rows))]
    assert statuses == [200, 401, 200, 401, 200, 401]
    assert bodies[0]["recommendations"] and bodies[2]["predictions"][0]["recommendations"]
    assert bodies[4]["model_version"] == bodies[0]["model_version"]
    assert bodies[1]["error"] == {
        "status": 401,
        "field": "authorization",
        "message": "authorization: bearer token not accepted",
    }
    assert bodies[3]["error"]["message"] == "authorization: bearer token missing"
    assert ctx.get_response_headers(1)["WWW-Authenticate"] == 'Bearer realm="genco"'


def test_handler_without_a_readable_token_file_does_not_load(
    model_dir: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(auth.TOKEN_FILE_ENV, str(tmp_path / "missing"))
    spec = importlib.util.spec_from_file_location("genco_auth_handler2", model_dir / "handler.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(ConfigError, match="cannot be read"):
        module.GencoHandler().initialize(_context(model_dir, [{}]))
