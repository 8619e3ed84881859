"""Bearer tokens from a file the operator owns (a mounted Kubernetes Secret), checked by the
genco handler: the cluster's inference auth.

TorchServe 0.12 cannot be given a key: at every start it writes fresh random ones into
``key_file.json`` in its working directory (``TokenAuthorization.init``), so no client outside
the pod can know them. In the cluster layout TorchServe's own token auth is therefore off
(``torchserve --disable-token-auth``) and the handler checks ``Authorization: Bearer <token>``
against the file named by ``GENCO_INFERENCE_TOKEN_FILE`` instead:

* each non-blank line of the file is an accepted token (at least ``MIN_TOKEN_CHARS``), so a
  rotation can overlap: add the new token, move the clients, remove the old one;
* the file is read again whenever it changes (its inode, size or mtime: Kubernetes swaps a
  Secret volume's ``..data`` link), so a rotated Secret takes effect without a restart;
* a missing or wrong token is that request's 401 (REST, KServe v1 and v2 alike), never its
  batch-mates'; a file that became unreadable or empty is a 503 (the server's fault, not the
  client's); a bad file at start stops the worker from loading (fail closed).

TorchServe passes every HTTP header to the worker, but none of a gRPC call's metadata: a gRPC
client sends the token as an ``authorization`` entry of ``PredictionsRequest.input`` (the
``GrpcClient`` does). Clients read their token with ``client_token``.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
from collections.abc import Mapping, Sequence

from genco.errors import ConfigError, RequestError
from genco.inference.predictor import Predictor
from genco.serving import kserve
from genco.serving.kserve import Outcome, Reply
from genco.serving.limits import encode_json

TOKEN_FILE_ENV = "GENCO_INFERENCE_TOKEN_FILE"  # the server's: where the Secret is mounted
CLIENT_TOKEN_ENV = "GENCO_TOKEN"  # a client's token, when no file or flag gives one
MIN_TOKEN_CHARS = 16
GRPC_FIELD = "authorization"  # the PredictionsRequest.input entry gRPC clients send it in
logger = logging.getLogger(__name__)


def read_tokens(path: str) -> tuple[str, ...]:
    """The accepted tokens in ``path``: its non-blank lines. A ConfigError names the file
    and line when there is none or one is too short to be a secret."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"token file {path}: cannot be read ({exc})") from None
    tokens = []
    for n, line in enumerate(lines, 1):
        token = line.strip()
        if not token:
            continue
        if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
            raise ConfigError(
                f"token file {path} line {n}: a token is one word of at least "
                f"{MIN_TOKEN_CHARS} characters (got {len(token)}); e.g. openssl rand -hex 32"
            )
        tokens.append(token)
    if not tokens:
        raise ConfigError(f"token file {path}: holds no token")
    return tuple(tokens)


def client_token(token: str | None = None, token_file: str | None = None) -> str | None:
    """A client's bearer token: ``token``, else the first of ``token_file``, else
    ``$GENCO_TOKEN``; None when none is given (a server without token auth)."""
    if token:
        return token
    if token_file:
        return read_tokens(token_file)[0]
    return os.environ.get(CLIENT_TOKEN_ENV) or None


class TokenFile:
    """The accepted tokens of one file, read again when the file changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._tokens = read_tokens(path)  # a bad file at start raises: fail closed

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)  # follows the Secret's ..data link to the current file
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def tokens(self) -> tuple[str, ...]:
        """The current tokens; a ConfigError when the file is gone, empty or malformed."""
        stamp = self._stat()
        with self._lock:
            if stamp is None or stamp != self._stamp:
                tokens = read_tokens(self.path)
                self._stamp, self._tokens = stamp, tokens
                logger.info("genco inference tokens read again from %s", self.path)
            return self._tokens

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> TokenFile | None:
        """The server's token file when ``GENCO_INFERENCE_TOKEN_FILE`` names one."""
        path = environ.get(TOKEN_FILE_ENV)
        return cls(path) if path else None


def accepts(tokens: Sequence[str], credential: str | bytes | None) -> bool:
    """Whether ``credential`` (an Authorization value) carries one of ``tokens``."""
    presented = bearer(credential)
    if presented is None:
        return False
    # compare_digest against every token, so the time taken says nothing of which matched
    matches = [hmac.compare_digest(presented.encode(), t.encode()) for t in tokens]
    return any(matches)


def bearer(credential: str | bytes | bytearray | None) -> str | None:
    """The token of ``Bearer <token>`` (scheme case-insensitive), else None."""
    if isinstance(credential, bytes | bytearray):
        credential = bytes(credential).decode("utf-8", "replace")
    if not isinstance(credential, str):
        return None
    scheme, _, token = credential.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def credential(headers: Mapping[str, object], row: object) -> str | bytes | None:
    """What a batch row presents: its ``Authorization`` header (names keep the client's
    spelling), else, for gRPC, which passes no metadata, its ``authorization`` input (which
    the worker also lists among the headers, as ``{"content-type": ...}``: not a header)."""
    for name, value in headers.items():
        if isinstance(name, str) and name.lower() == "authorization" and isinstance(value, str):
            return value
    if isinstance(row, dict):
        value = row.get(GRPC_FIELD)
        return value if isinstance(value, str | bytes | bytearray) else None
    return None


def without_credential(row: object) -> object:
    """The row without its gRPC ``authorization`` input, so the body is all that is left."""
    if isinstance(row, dict) and GRPC_FIELD in row:
        return {k: v for k, v in row.items() if k != GRPC_FIELD}
    return row


def screen(
    tokens: TokenFile | None, credentials: Sequence[str | bytes | None]
) -> list[Reply | None]:
    """Per batch row: None when it may be answered, else its refusal (401: no or a wrong
    token; 503: the token file cannot be read now). Never raises."""
    if tokens is None:
        return [None] * len(credentials)
    try:
        accepted = tokens.tokens()  # one stat per batch
    except ConfigError as exc:
        logger.error("genco inference auth: %s", exc)
        refusal = RequestError("authorization", "the server's token file cannot be read", 503)
        return [_refusal(refusal)] * len(credentials)
    out: list[Reply | None] = []
    for given in credentials:
        if accepts(accepted, given):
            out.append(None)
            continue
        why = "missing" if given is None else "not accepted"
        out.append(_refusal(RequestError("authorization", f"bearer token {why}", 401)))
    return out


def _refusal(exc: RequestError) -> Reply:
    return Reply(exc.status, encode_json(exc.to_dict()), [Outcome("rest", "invalid", exc.status)])


def answer_rows(
    tokens: TokenFile | None,
    predictor: Predictor,
    rows: Sequence[object],
    headers: Sequence[Mapping[str, object]],
    content_types: Sequence[str | None],
    explain: Sequence[bool],
    model_name: str = "genco",
) -> list[Reply]:
    """``kserve.answer_rows`` for the rows ``screen`` lets through (all of them when
    ``tokens`` is None), the refusals for the others, in order."""
    refusals = screen(tokens, [credential(h, row) for h, row in zip(headers, rows, strict=True)])
    let_in = [i for i, refusal in enumerate(refusals) if refusal is None]
    answers = kserve.answer_rows(
        predictor,
        [without_credential(rows[i]) for i in let_in],
        [content_types[i] for i in let_in],
        [explain[i] for i in let_in],
        model_name,
    )
    replies = dict(zip(let_in, answers, strict=True))
    return [replies[i] if refusal is None else refusal for i, refusal in enumerate(refusals)]
