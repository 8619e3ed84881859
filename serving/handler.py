"""TorchServe handler for genco: adapts TorchServe's batch to ``genco.serving``.

Each batch row is a REST request, a KServe v1 envelope or an open-inference (v2) request, from
HTTP or gRPC; ``genco.serving.kserve`` tells them apart by their body and answers every request
in them on its own (parsing, validation, prediction and error bodies live in
``genco.serving.requests``, shared with the CLI and the tests). Bad requests are answered per
row with TorchServe's own per-request status (``context.set_response_status``): a
batch-level ``PredictionException`` would fail every batch-mate of one bad request, and
TorchServe turns an exception's 413 into a 507. ``genco.serving`` never raises for one
request: a bug costs that request a 500, never its batch-mates. TorchServe's own
``service_envelope`` must stay unset: it would unwrap only the first row of a batch.
With ``GENCO_INFERENCE_TOKEN_FILE`` set (the cluster layout, TorchServe's own token auth
off), each row must carry a bearer token from that file (``genco.serving.auth``): a row
without one is its own 401.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ts.context import Context
from ts.torch_handler.base_handler import BaseHandler

import genco
from genco.serving import auth
from genco.serving import requests as rest
from genco.serving.metrics import HandlerMetrics, quiet_worker_log

logger = logging.getLogger(__name__)


def _content_type(headers: dict[str, Any]) -> str | None:
    """The request's Content-Type header (header names keep the client's spelling)."""
    for name, value in headers.items():
        if isinstance(value, str) and name.lower() == "content-type":
            return value
    return None


class GencoHandler(BaseHandler):
    def initialize(self, context: Context) -> None:
        if os.environ.get("TS_SERVICE_ENVELOPE"):
            raise RuntimeError(
                "TS_SERVICE_ENVELOPE is set: genco answers KServe v1 and v2 itself; unset it"
            )
        # Raw bytes, not the worker's own json.loads (unbounded recursion, a traceback per
        # malformed body): genco.serving parses them with its limits. Read per request.
        os.environ["TS_DECODE_INPUT_REQUEST"] = "false"
        # The archive's extra files are a complete bundle, unpacked into model_dir.
        self.tokens = auth.TokenFile.from_env()  # a bad token file stops the load here
        self.predictor = rest.load_predictor(context.system_properties["model_dir"])
        self.model_name = context.model_name
        self.metrics = (
            HandlerMetrics(context.metrics, self.model_name, background=True)
            if context.metrics
            else None
        )
        quiet_worker_log()
        self.initialized = True
        logger.info("genco %s from %s", self.predictor.version, os.path.dirname(genco.__file__))

    def handle(self, data: list[Any], context: Context) -> list[bytes]:
        self.context = context
        n = len(data)
        # TorchServe's /explanations and KServe's :explain mark their requests with this header.
        explain = [context.get_request_header(i, "explain") == "True" for i in range(n)]
        headers = [context.get_all_request_header(i) for i in range(n)]
        hits, misses = self.predictor.cache_counts()
        content_types = [_content_type(h) for h in headers]
        replies = auth.answer_rows(
            self.tokens, self.predictor, data, headers, content_types, explain, self.model_name
        )
        if self.metrics is not None:
            after = self.predictor.cache_counts()
            try:
                self.metrics.record(replies, after[0] - hits, after[1] - misses)
            except Exception:  # metrics must never cost a batch its answers
                logger.exception("genco metrics not recorded")
        for i, reply in enumerate(replies):
            if reply.status != 200:
                context.set_response_status(reply.status, rest.reason_phrase(reply.status), i)
            if reply.status == 401:
                context.set_response_header(i, "WWW-Authenticate", 'Bearer realm="genco"')
            context.set_response_content_type(i, "application/json")
        return [reply.body for reply in replies]
