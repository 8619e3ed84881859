"""Python stubs for TorchServe 0.12's gRPC inference API (``inference.proto``, as shipped in
TorchServe's frontend jar), generated with grpcio-tools 1.76.0 (protobuf >= 6.31.1 and
grpcio >= 1.76 at run time). Regenerate from this folder with:

    python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. inference.proto

then make ``inference_pb2_grpc``'s import of ``inference_pb2`` absolute (this package).
``genco.serving.grpc_client`` is the client genco uses.
"""
