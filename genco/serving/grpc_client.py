"""A small client for TorchServe's gRPC inference API, answered by the same genco handler as
REST: the request is REST's JSON (or a KServe envelope), sent as the ``data`` entry of
``PredictionsRequest.input``; the answer is the same JSON as over REST.

    with GrpcClient("127.0.0.1:7070", token) as client:
        client.predict({"ad_id": "ad_0000", "top_k": 3})

TorchServe's gRPC API drops the handler's HTTP status: a request the handler refused (a 4xx)
comes back as an OK call carrying the JSON error body, which ``predict`` raises as the
``RequestError`` it was. A wrong or missing token is a ``grpc.RpcError`` (PERMISSION_DENIED).
"""

from __future__ import annotations

import json
from typing import Any

import grpc

from genco.errors import RequestError
from genco.serving.management import MODEL_NAME
from genco.serving.torchserve_grpc import inference_pb2, inference_pb2_grpc


class GrpcClient:
    """One channel to TorchServe's gRPC inference port; token: the inference key (token
    auth on), sent as ``authorization: Bearer`` metadata."""

    def __init__(
        self,
        target: str,
        token: str | None = None,
        model: str = MODEL_NAME,
        timeout_s: float = 30.0,
    ) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = inference_pb2_grpc.InferenceAPIsServiceStub(self.channel)
        self.model = model
        self.timeout_s = timeout_s
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def predict_bytes(self, body: bytes, version: str | None = None) -> bytes:
        """The raw answer to one JSON body; a refused request raises ``grpc.RpcError``."""
        request = inference_pb2.PredictionsRequest(
            model_name=self.model, model_version=version or "", input={"data": body}
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
