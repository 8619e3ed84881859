"""Retries for transient failures only: the network, a server's 5xx or 429, a timeout.

A contract error (a misspelt path, a bad column, a refused gate, a 4xx) fails the same way
every time, so it is raised at once. Kubeflow's task retry policy cannot tell the two apart
(it reruns any failed container after its backoff), so the pipeline sets none and each step
retries here, inside its own process. Types from other libraries are looked up by module
name, as in the CLI's error table: a type whose module was never loaded cannot have been
raised, and nothing is imported to build the list.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

from genco.errors import GencoError

T = TypeVar("T")

# (module, class): failures to reach a server, whatever the answer would have been.
_NETWORK = (
    ("builtins", "ConnectionError"),  # refused, reset, aborted (OSError subclasses)
    ("builtins", "TimeoutError"),
    ("requests.exceptions", "ConnectionError"),
    ("requests.exceptions", "Timeout"),
    ("urllib3.exceptions", "ProtocolError"),
    ("urllib3.exceptions", "MaxRetryError"),
    ("urllib3.exceptions", "NewConnectionError"),
    ("aiohttp.client_exceptions", "ClientConnectionError"),
    ("aiohttp.client_exceptions", "ServerTimeoutError"),
    ("botocore.exceptions", "EndpointConnectionError"),
    ("botocore.exceptions", "ConnectionClosedError"),
    ("botocore.exceptions", "ReadTimeoutError"),
)


def _loaded(names: tuple[tuple[str, str], ...]) -> tuple[type[BaseException], ...]:
    out = []
    for module_name, class_name in names:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            out.append(cls)
    return tuple(out)


def http_status(exc: BaseException) -> int | None:
    """The HTTP status an exception carries, under the names the libraries we use give it
    (``status``: TorchServe management, aiohttp, kfp_server_api; ``code``: gcsfs;
    ``response.status_code``: requests)."""
    for value in (
        getattr(exc, "status", None),
        getattr(exc, "code", None),
        getattr(getattr(exc, "response", None), "status_code", None),
    ):
        if isinstance(value, int) and 100 <= value <= 599:
            return value
    return None


def is_transient(exc: BaseException) -> bool:
    """True for a failure that may pass on its own: the network, a timeout, a 5xx or 429.

    genco's own errors are contract errors, never transient, except one that carries a
    server's 5xx (e.g. TorchServe failing while a deploy registers a version).
    """
    status = http_status(exc)
    if status is not None:
        return status >= 500 or status == 429
    if isinstance(exc, GencoError):
        return False
    return isinstance(exc, _loaded(_NETWORK))


def call_with_retries(
    fn: Callable[..., T],
    *args: Any,
    attempts: int = 3,
    delay_s: float = 5.0,
    what: str = "",
    sleep: Callable[[float], None] = time.sleep,
    log: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> T:
    """``fn(*args, **kwargs)``, retried up to ``attempts`` times in all when it fails with a
    transient error (waiting ``delay_s``, then twice as long, ...). Any other error, and the
    last transient one, propagate unchanged."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            wait = delay_s * 2 ** (attempt - 1)
            name = what or getattr(fn, "__name__", "call")
            log(
                f"{name}: transient failure ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())[:200]}); attempt {attempt + 1}/{attempts} "
                f"in {wait:.0f} s"
            )
            sleep(wait)
    raise AssertionError("unreachable")  # the loop returns or raises
