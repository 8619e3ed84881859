"""TorchServe handler for genco: adapts TorchServe's batch to ``genco.serving.requests``.

Request parsing, validation, prediction and error bodies live in ``genco.serving.requests`` so the
CLI, the tests and this handler share them. Bad requests are answered per request with
TorchServe's own per-request status (``context.set_response_status``): a batch-level
``PredictionException`` would fail every batch-mate of one bad request, and TorchServe turns
an exception's 413 into a 507. ``genco.serving`` never raises for one request: a bug costs
that request a 500, never its batch-mates.
"""

from __future__ import annotations

import os
from typing import Any

from ts.context import Context
from ts.torch_handler.base_handler import BaseHandler

from genco.serving import limits
from genco.serving import requests as rest


def _content_type(context: Context, idx: int) -> str | None:
    """The request's Content-Type header (header names keep the client's spelling)."""
    for name, value in context.get_all_request_header(idx).items():
        if isinstance(value, str) and name.lower() == "content-type":
            return value
    return None


class GencoHandler(BaseHandler):
    def initialize(self, context: Context) -> None:
        # Raw bytes, not the worker's own json.loads (unbounded recursion, a traceback per
        # malformed body): genco.serving parses them with its limits. Read per request.
        os.environ["TS_DECODE_INPUT_REQUEST"] = "false"
        # The archive's extra files are a complete bundle, unpacked into model_dir.
        self.predictor = rest.load_predictor(context.system_properties["model_dir"])
        self.initialized = True

    def handle(self, data: list[Any], context: Context) -> list[dict[str, Any] | bytes]:
        self.context = context
        n_http = len(context.request_processor)  # < len(data) behind KServe's envelope
        idx = [min(i, n_http - 1) for i in range(len(data))]
        # TorchServe's /explanations endpoint marks its requests with this header.
        explain = [context.get_request_header(j, "explain") == "True" for j in idx]
        content_types = [_content_type(context, j) for j in idx]
        results = rest.handle_rows(self.predictor, data, content_types, explain)
        # Behind an envelope, the envelope serializes what we return; otherwise we do.
        answers: list[tuple[int, Any]] = (
            list(rest.respond(results)) if limits.enveloped(data) else list(rest.encoded(results))
        )
        bodies: list[dict[str, Any] | bytes] = []
        for j, (status, body) in zip(idx, answers):
            if status != 200:
                context.set_response_status(status, rest.reason_phrase(status), j)
            context.set_response_content_type(j, "application/json")
            bodies.append(body)
        return bodies
