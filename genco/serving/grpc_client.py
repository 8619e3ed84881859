"""A small client for TorchServe's gRPC inference API, answered by the same genco handler as
REST: the request is REST's JSON (or a KServe envelope), sent as the ``data`` entry of
``PredictionsRequest.input``; the answer is the same JSON as over REST.

    with GrpcClient("127.0.0.1:7070", token) as client:
        client.predict({"ad_id": "ad_0000", "top_k": 3})

TorchServe's gRPC API drops the handler's HTTP status: a request the handler refused (a 4xx)
comes back as an OK call carrying the JSON error body, which ``predict`` raises as the
``RequestError`` it was. A wrong or missing TorchServe key is a ``grpc.RpcError``
(PERMISSION_DENIED); where the handler checks the token (``genco.serving.auth``: TorchServe
passes no gRPC metadata to it, so the token also travels as the ``authorization`` input), a
wrong or missing token is the ``RequestError`` of a 401.
"""

from __future__ import annotations

import json
from typing import Any

import grpc

from genco.errors import RequestError
from genco.serving.auth import GRPC_FIELD, client_token
from genco.serving.management import MODEL_NAME
from genco.serving.torchserve_grpc import inference_pb2, inference_pb2_grpc


class GrpcClient:
    """One channel to TorchServe's gRPC inference port. token: TorchServe's inference key
    or the handler's bearer token, else the first of ``token_file``, else ``$GENCO_TOKEN``
    (``genco.serving.auth.client_token``); sent as ``authorization: Bearer`` metadata, for
    TorchServe, and as the ``authorization`` input, for the handler."""

    def __init__(
        self,
        target: str,
        token: str | None = None,
        model: str = MODEL_NAME,
        timeout_s: float = 30.0,
        token_file: str | None = None,
    ) -> None:
        token = client_token(token, token_file)
        self.channel = grpc.insecure_channel(target)
        self.stub = inference_pb2_grpc.InferenceAPIsServiceStub(self.channel)
        self.model = model
        self.timeout_s = timeout_s
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.inputs = {GRPC_FIELD: f"Bearer {token}".encode()} if token else {}

    def predict_bytes(self, body: bytes, version: str | None = None) -> bytes:
        """The raw answer to one JSON body; a refused request raises ``grpc.RpcError``."""
        request = inference_pb2.PredictionsRequest(
            model_name=self.model, model_version=version or "", input={"data": body, **self.inputs}
        )
        response = self.stub.Predictions(request, timeout=self.timeout_s, metadata=self.metadata)
        return bytes(response.prediction)

    def predict(self, request: dict[str, Any], version: str | None = None) -> dict[str, Any]:
        """The handler's JSON answer to one request; a refused one raises its ``RequestError``."""
        out: dict[str, Any] = json.loads(self.predict_bytes(json.dumps(request).encode(), version))
        error = out.get("error")
        if isinstance(error, dict):
            message = str(error.get("message", ""))
            field = str(error.get("field") or "body")
            raise RequestError(field, message.removeprefix(f"{field}: "), int(error["status"]))
        return out

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
