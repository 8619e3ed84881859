"""What the CLI modules share: JSON output, flags generated from the config dataclasses, and
the error policy (which failures are one line on stderr with exit status 2)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from genco.errors import ConfigError


def print_json(obj: object) -> None:
    """Results go to stdout as indented JSON (paths and other objects as strings)."""
    print(json.dumps(obj, indent=2, default=str))


def _flag(prefix: str, name: str) -> str:
    return "--" + (prefix + name).replace("_", "-")


def add_config_args(
    parser: argparse.ArgumentParser,
    config: type,
    only: Sequence[str],
    prefix: str = "",
    overrides: Mapping[str, Any] | None = None,
) -> None:
    """One flag per named field of a config dataclass (``--prefix-field-name``): its type,
    default and help text are the field's, so they are written once, in the dataclass.

    ``overrides``: a different default for this command on purpose (e.g. a faster local
    run), named by the caller. A bool field that defaults to False becomes a switch.
    """
    fields = {f.name: f for f in dataclasses.fields(config)}
    overrides = overrides or {}
    for name in only:
        f = fields[name]
        default = overrides.get(name, f.default)
        text = f.metadata.get("help", "").replace("%", "%%")
        if isinstance(f.default, bool):
            if default:
                raise TypeError(f"{config.__name__}.{name}: no switch for a True default")
            parser.add_argument(_flag(prefix, name), action="store_true", help=text)
        else:
            parser.add_argument(
                _flag(prefix, name),
                type=type(f.default),
                default=default,
                help=f"{text} (default {default})",
            )


def config_from_args(
    args: argparse.Namespace, config: type, only: Sequence[str], prefix: str = "", **fixed: Any
) -> Any:
    """The config with the named fields read from ``args`` (as ``add_config_args`` named
    them) and ``fixed`` ones given by the caller; every other field keeps its default."""
    values = {name: getattr(args, prefix + name) for name in only}
    try:
        return config(**values, **fixed)
    except ValueError as exc:  # __post_init__ names the field and value: a bad flag
        raise ConfigError(str(exc)) from exc


# ------------------------------------------------------------------------- error policy
#
# Every expected failure is one line on stderr that says what to do, exit status 2; anything
# else is a bug and keeps its traceback. Expected means genco's own typed errors, a path that
# does not exist, and the outside world refusing: credentials, the network, a server's HTTP
# answer. Those arrive as other libraries' types, listed here by module so that none of them
# is imported to build the list: a type whose module was never loaded cannot have been raised.


def _one_line(text: object, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _http_hint(status: int | None) -> str:
    if status in (401, 403):
        return "check the credentials (token, --key-file) and their permissions"
    if status == 404:
        return "check the URL and the names in it"
    if status == 405:
        return "the server does not allow this call (for TorchServe: is its management API on?)"
    if status is not None and status >= 500:
        return "the server failed; see its logs and retry"
    return "check the request"


def _gcs_credentials(exc: BaseException) -> str:
    return (
        "no Google Cloud credentials for gs://: run 'gcloud auth application-default login' "
        "or set GOOGLE_APPLICATION_CREDENTIALS (STORAGE_EMULATOR_HOST for an emulator)"
    )


def _gcs_refused(exc: BaseException) -> str:
    return (
        f"Google Cloud refused the credentials ({_one_line(exc)}): renew them with "
        "'gcloud auth application-default login'"
    )


def _s3_credentials(exc: BaseException) -> str:
    return (
        "no S3 credentials for s3://: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
        "AWS_PROFILE), and S3_ENDPOINT_URL for MinIO"
    )


def _s3_unreachable(exc: BaseException) -> str:
    return (
        f"{_one_line(exc)}: check S3_ENDPOINT_URL (or AWS_ENDPOINT_URL) and that the server is up"
    )


def _gcs_http(exc: BaseException) -> str:
    status = getattr(exc, "code", None)
    return f"Cloud Storage answered {status}: {_one_line(exc)}; {_http_hint(status)}"


def _aiohttp_status(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    url = getattr(getattr(exc, "request_info", None), "real_url", "")
    return f"HTTP {status} from {url}: {_one_line(exc)}; {_http_hint(status)}"


def _unreachable(exc: BaseException) -> str:
    hint = "check the URL or endpoint setting (STORAGE_EMULATOR_HOST, --host, --management-url)"
    return f"cannot connect: {_one_line(exc)}; {hint} and that the server is up"


def _torchserve(exc: BaseException) -> str:
    return f"{_one_line(exc)}; {_http_hint(getattr(exc, 'status', None))}"


def _kfp_api(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", "")
    return f"the Kubeflow Pipelines API answered {status} {reason}; {_http_hint(status)}"


def _requests_http(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    url = getattr(response, "url", "")
    body = _one_line(getattr(response, "text", ""), 200)
    detail = f": {body}" if body else ""
    return f"HTTP {status} from {url}{detail}; {_http_hint(status)}"


def _urllib3_unreachable(exc: BaseException) -> str:
    pool = getattr(exc, "pool", None)
    where = f"{pool.scheme}://{pool.host}:{pool.port}" if pool is not None else "the server"
    reason = getattr(exc, "reason", None) or exc
    return (
        f"cannot connect to {where} ({_one_line(reason, 200)}); check the URL (--host, "
        "--management-url) and that the server is up"
    )


def _as_is(exc: BaseException) -> str:
    return _one_line(exc, 1000)


def _os_error(exc: BaseException) -> str:
    # A bare OSError from the standard library reads "[Errno 2] No such file ...: 'x'".
    return _one_line(exc, 1000)


# (module, class, message): the first entry whose type matches wins, so subclasses come first.
_EXPECTED: tuple[tuple[str, str, Callable[[BaseException], str]], ...] = (
    ("genco.errors", "GencoError", _as_is),
    ("google.auth.exceptions", "DefaultCredentialsError", _gcs_credentials),
    ("google.auth.exceptions", "RefreshError", _gcs_refused),
    ("botocore.exceptions", "NoCredentialsError", _s3_credentials),
    ("botocore.exceptions", "EndpointConnectionError", _s3_unreachable),
    ("gcsfs.retry", "HttpError", _gcs_http),
    ("aiohttp.client_exceptions", "ClientResponseError", _aiohttp_status),
    ("aiohttp.client_exceptions", "ClientConnectionError", _unreachable),
    ("genco.serving.management", "ManagementError", _torchserve),
    ("kfp_server_api.exceptions", "ApiException", _kfp_api),
    ("requests.exceptions", "HTTPError", _requests_http),
    ("requests.exceptions", "ConnectionError", _unreachable),
    ("requests.exceptions", "Timeout", _unreachable),
    ("urllib3.exceptions", "MaxRetryError", _urllib3_unreachable),
    ("urllib3.exceptions", "NewConnectionError", _unreachable),
    ("builtins", "FileNotFoundError", _os_error),
    ("builtins", "NotADirectoryError", _os_error),
    ("builtins", "IsADirectoryError", _os_error),
    ("builtins", "PermissionError", _os_error),
    ("builtins", "ConnectionError", _unreachable),
    ("builtins", "TimeoutError", _unreachable),
)


def _loaded() -> Iterator[tuple[type[BaseException], Callable[[BaseException], str]]]:
    for module_name, class_name, message in _EXPECTED:
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if isinstance(cls, type) and issubclass(cls, BaseException):
            yield cls, message


def expected_errors() -> tuple[type[BaseException], ...]:
    """The exception types the CLI reports as one line (evaluated when one is raised)."""
    return tuple(cls for cls, _ in _loaded())


def error_message(exc: BaseException) -> str:
    """One line for an expected error: what failed, and what to do about it."""
    for cls, message in _loaded():
        if isinstance(exc, cls):
            return message(exc)
    raise TypeError(f"{type(exc).__name__} is not an expected error") from exc


def bug_in_step(exc: BaseException) -> str | None:
    """For a pipeline step that failed on a bug (its error is not an expected one): the
    step's traceback and where its whole log is. None for every other error."""
    from genco.errors import StepError

    if not isinstance(exc, StepError) or not exc.traceback:
        return None
    if exc.cause_type is not None and issubclass(exc.cause_type, expected_errors()):
        return None
    return f"{exc.traceback}\n(step '{exc.step}' failed on a bug; full log: {exc.log_path})"
