"""TorchServe handler for genco: adapts TorchServe's batch to ``genco.serving.requests``.

Request parsing, validation, prediction and error bodies live in ``genco.serving.requests`` so the
CLI, the tests and this handler share them. Bad requests are answered per request with
TorchServe's own per-request status (``context.set_response_status``): a batch-level
``PredictionException`` would fail every batch-mate of one bad request, and TorchServe turns
an exception's 413 into a 507.
"""

from __future__ import annotations

from typing import Any

from ts.context import Context
from ts.torch_handler.base_handler import BaseHandler

from genco.serving import requests as rest


class GencoHandler(BaseHandler):
    def initialize(self, context: Context) -> None:
        # The archive's extra files are a complete bundle, unpacked into model_dir.
        self.predictor = rest.load_predictor(context.system_properties["model_dir"])
        self.initialized = True

    def handle(self, data: list[Any], context: Context) -> list[dict[str, Any] | bytes]:
        self.context = context
        n_http = len(context.request_processor)  # < len(data) behind KServe's envelope
        # TorchServe's /explanations endpoint marks its requests with this header.
        explain = [
            context.get_request_header(min(i, n_http - 1), "explain") == "True"
            for i in range(len(data))
        ]
        results = rest.handle_batch(
            self.predictor, [rest.request_body(row) for row in data], explain
        )
        # Behind an envelope, the envelope serializes what we return; otherwise we do.
        encode = not rest.enveloped(data)
        bodies: list[dict[str, Any] | bytes] = []
        for i, (status, body) in enumerate(rest.respond(results)):
            idx = min(i, n_http - 1)
            if status != 200:
                context.set_response_status(status, rest.reason_phrase(status), idx)
            context.set_response_content_type(idx, "application/json")
            bodies.append(rest.encode_json(body) if encode else body)
        return bodies
