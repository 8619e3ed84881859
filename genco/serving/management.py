"""TorchServe's management API: register a version, make it the default, roll back.

``ManagementClient`` speaks the API for the "genco" model; ``deploy_to_torchserve`` registers
a version and makes it the default (keeping the previous one for ``rollback_default``) after
an optional real prediction against it (``probe_version``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests

from genco.errors import ConfigError, StoreError
from genco.models.checkpoint import check_version

MODEL_NAME = "genco"


class ManagementError(RuntimeError):
    """A TorchServe management or inference call that did not succeed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"TorchServe answered {status}: {message}")
        self.status = status


def _error_message(resp: requests.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip()[:500]
    if isinstance(body, dict):
        inner = body.get("error", body)
        return str(inner.get("message", body) if isinstance(inner, dict) else inner)
    return str(body)


def read_token(key_file: str, api: str = "management") -> str:
    """A key from TorchServe's ``key_file.json`` (``management``, ``inference`` or ``API``)."""
    with open(key_file, encoding="utf-8") as f:
        keys = json.load(f)
    if api not in keys or "key" not in keys[api]:
        raise ConfigError(f"{key_file}: no '{api}' key (has: {', '.join(keys)})")
    return str(keys[api]["key"])


class ManagementClient:
    """TorchServe's management API for the "genco" model. Pass a session to reuse one."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        session: requests.Session | None = None,
        model_name: str = MODEL_NAME,
        timeout_s: float = 180.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.session = session or requests.Session()
        self.model_name = model_name
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, **params: object) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        resp = self.session.request(
            method, self.url + path, params=params, headers=headers, timeout=self.timeout_s
        )
        if resp.status_code >= 400:
            raise ManagementError(resp.status_code, _error_message(resp))
        return resp.json() if resp.content else None

    def register(
        self,
        mar_url: str,
        initial_workers: int = 1,
        synchronous: bool = True,
        **options: int,
    ) -> Any:
        """Load an archive; ``mar_url`` is a file name in the server's model store or an
        http(s) URL it can fetch. options: batch_size, max_batch_delay, response_timeout."""
        return self._call(
            "POST",
            "/models",
            url=mar_url,
            initial_workers=initial_workers,
            synchronous=str(synchronous).lower(),
            **options,
        )

    def set_default(self, version: str) -> None:
        self._call("PUT", f"/models/{self.model_name}/{version}/set-default")

    def versions(self) -> list[str]:
        """Registered versions; empty when the model is not registered at all."""
        try:
            described = self._call("GET", f"/models/{self.model_name}/all")
        except ManagementError as exc:
            if exc.status == 404:
                return []
            raise
        return [str(d["modelVersion"]) for d in described]

    def default_version(self) -> str | None:
        try:
            described = self._call("GET", f"/models/{self.model_name}")
        except ManagementError as exc:
            if exc.status == 404:
                return None
            raise
        return str(described[0]["modelVersion"])

    def unregister(self, version: str) -> None:
        self._call("DELETE", f"/models/{self.model_name}/{version}")


@dataclass(frozen=True)
class Deployment:
    version: str
    previous: str | None
    retired: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "previous": self.previous, "retired": list(self.retired)}


def probe_version(
    inference_url: str,
    version: str,
    request: dict[str, Any],
    token: str | None = None,
    session: requests.Session | None = None,
    timeout_s: float = 30.0,
) -> dict[str, Any]:
    """One real prediction against a specific version (``/predictions/genco/<version>``)."""
    session = session or requests.Session()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"{inference_url.rstrip('/')}/predictions/{MODEL_NAME}/{version}"
    resp = session.post(url, json=request, headers=headers, timeout=timeout_s)
    if resp.status_code != 200:
        raise ManagementError(resp.status_code, _error_message(resp))
    body: dict[str, Any] = resp.json()
    return body


def deploy_to_torchserve(
    client: ManagementClient,
    mar_url: str,
    version: str,
    *,
    initial_workers: int = 1,
    check: Callable[[str], object] | None = None,
) -> Deployment:
    """Register ``version`` and make it the default, keeping the previous one for rollback.

    check(version): e.g. ``probe_version``; runs against the new version before any client
    is routed to it. If registering, the check or the switch fails, the new version is
    unregistered and the default stays where it was. After the switch every version but the
    new and the previous one is unregistered: each holds worker processes.
    """
    check_version(version)
    previous = client.default_version()
    if previous == version:
        return Deployment(version, previous)
    registered = version in client.versions()
    if not registered:
        client.register(mar_url, initial_workers=initial_workers)
    try:
        if check is not None:
            check(version)
        client.set_default(version)
    except Exception:
        if not registered:
            with contextlib.suppress(ManagementError, requests.RequestException):
                client.unregister(version)
        raise
    retired = tuple(v for v in client.versions() if v not in (version, previous))
    for v in retired:
        client.unregister(v)
    return Deployment(version, previous, retired)


def rollback_default(
    client: ManagementClient, deployment: Deployment, unregister: bool = False
) -> str:
    """Make ``deployment.previous`` the default again; optionally drop the rolled-back one."""
    if deployment.previous is None:
        raise StoreError(f"version '{deployment.version}' had no previous version to return to")
    client.set_default(deployment.previous)
    if unregister:
        client.unregister(deployment.version)
    return deployment.previous
