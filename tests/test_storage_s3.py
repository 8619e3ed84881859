"""genco.data.storage on ``s3://`` against a real S3 server (moto's, over HTTP on 127.0.0.1),
reached the way a Kubeflow install's MinIO is: ``S3_ENDPOINT_URL`` and static keys."""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genco.data import storage, trees
from genco.errors import NotFoundError

# The backend-independent storage tests, collected here again so they run against this
# module's ``root``: a fresh prefix on the S3 server.
from tests.test_storage import (  # noqa: F401
    _ids_frame,
    test_bytes_text_json_round_trip,
    test_open_read_streams_in_chunks,
    test_table_round_trip_keeps_string_ids,
    test_upload_download_dir_round_trip,
)

BUCKET = "genco-s3-test"


class Boom(RuntimeError):
    """Raised on purpose inside atomic writes; distinct so no real error is swallowed."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A running moto S3 server with an empty bucket, and the environment pointing at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("S3_ENDPOINT_URL", endpoint)
            mp.setenv("AWS_ACCESS_KEY_ID", "genco-test")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "genco-test-secret")
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            # Nothing from a developer's ~/.aws may leak in.
            mp.setenv("AWS_CONFIG_FILE", os.devnull)
            mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
            storage.filesystem(f"s3://{BUCKET}").mkdir(BUCKET)
            yield endpoint
    finally:
        server.stop()


@pytest.fixture
def root(s3_endpoint: str) -> str:
    """A fresh, empty prefix in the test bucket."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


# ----------------------------------------------------------------------- settings


def test_the_endpoint_override_is_used(s3_endpoint: str, root: str) -> None:
    fs = storage.filesystem(root)
    assert fs is storage.filesystem(f"s3://{BUCKET}/other")
    assert fs.endpoint_url == s3_endpoint
    # The bytes really are on the moto server: read them back with an independent client.
    storage.write_bytes(storage.join(root, "probe.bin"), b"on the server")
    import boto3

    key = storage.join(root, "probe.bin")[len(f"s3://{BUCKET}/") :]
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"on the server"


def test_an_s3_path_is_never_a_local_relative_path(
    root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    storage.write_json(storage.join(root, "x.json"), {"a": 1})
    storage.makedirs(storage.join(root, "dir"))
    with storage.atomic_local_path(storage.join(root, "y.bin")) as tmp:
        Path(tmp).write_bytes(b"y")
    assert os.listdir(tmp_path) == [], "nothing may appear under ./s3:"
    assert storage.join(root, "a", "/b/") == f"{root}/a/b"


# --------------------------------------------------------------------- round trips


# ----------------------------------------------------------------------- atomicity


def test_overwrite_replaces_whole_object(root: str) -> None:
    path = storage.join(root, "f.txt")
    storage.write_text(path, "old content, longer than the new one")
    storage.write_text(path, "new")
    assert storage.read_text(path) == "new"


def test_object_is_invisible_until_the_atomic_write_completes(root: str) -> None:
    path = storage.join(root, "out", "part.parquet")
    schema = pa.schema([("id", pa.string())])
    with storage.atomic_local_path(path, suffix=".parquet") as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            writer.write_table(pa.table({"id": ["001"]}, schema=schema))
        assert not storage.exists(path), "object must not be visible before the block exits"
    assert not os.path.exists(tmp)
    assert storage.read_table(path)["id"].tolist() == ["001"]


def test_failed_write_keeps_existing_object(root: str) -> None:
    path = storage.join(root, "keep.parquet")
    storage.write_table(_ids_frame(), path)
    with pytest.raises(Boom), storage.atomic_local_path(path) as tmp:
        Path(tmp).write_text("half writ")
        raise Boom
    assert storage.read_table(path)["id"].tolist() == ["007", "010", "123"]
    assert storage.listdir(root) == ["keep.parquet"]


def test_large_write_goes_multipart_and_round_trips(root: str) -> None:
    # Above s3fs' 50 MiB block size put_file uses a multipart upload, which S3 publishes
    # only on CompleteMultipartUpload: the same single atomic step as a PUT.
    fs = storage.filesystem(root)
    data = os.urandom(fs.default_block_size + 1024)
    path = storage.join(root, "big", "blob.bin")
    with storage.atomic_local_path(path) as tmp:
        Path(tmp).write_bytes(data)
    assert storage.read_bytes(path) == data


# ------------------------------------------------------------ listing and existence


def test_listing_and_exists(root: str) -> None:
    assert not storage.exists(root)
    for name in ["b.txt", "a.txt", "sub/x.txt", "sub/deeper/y.txt"]:
        storage.write_text(storage.join(root, *name.split("/")), name)
    assert storage.listdir(root) == ["a.txt", "b.txt", "sub"]
    assert storage.listdir(root + "/") == ["a.txt", "b.txt", "sub"]
    assert storage.listdir(storage.join(root, "sub")) == ["deeper", "x.txt"]
    assert storage.exists(storage.join(root, "a.txt"))
    assert storage.exists(storage.join(root, "sub")), "a prefix with objects is a directory"
    assert not storage.exists(storage.join(root, "a.tx"))
    assert storage.exists(f"s3://{BUCKET}")
    assert not storage.exists("s3://genco-no-such-bucket/x")


def test_remove(root: str) -> None:
    path = storage.join(root, "f.txt")
    storage.write_text(path, "x")
    storage.remove(path)
    assert not storage.exists(path)
    # S3 itself deletes a missing key without complaint; a typo must not pass silently.
    with pytest.raises(NotFoundError, match=rf"^{re.escape(path)}: no such object$"):
        storage.remove(path)


# ------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "op",
    [
        storage.read_bytes,
        storage.read_json,
        lambda p: storage.read_table(p + ".csv"),
        lambda p: storage.read_table(p + ".parquet"),
        lambda p: storage.open_read(p).__enter__(),
    ],
    ids=["read_bytes", "read_json", "read_csv", "read_parquet", "open_read"],
)
def test_missing_object_error_names_the_path(root: str, op) -> None:
    path = storage.join(root, "missing")
    with pytest.raises(NotFoundError, match=rf"^{re.escape(path)}(\.csv|\.parquet)?: no such"):
        op(path)


def test_missing_directory_is_an_error_not_an_empty_list(root: str, tmp_path: Path) -> None:
    missing = storage.join(root, "nope")
    with pytest.raises(NotFoundError, match=rf"^{re.escape(missing)}: no such directory"):
        storage.listdir(missing)
    with pytest.raises(NotFoundError, match=rf"^{re.escape(missing)}: no such directory"):
        trees.download_dir(missing, str(tmp_path / "out"))


def test_missing_bucket_is_named(s3_endpoint: str) -> None:
    path = "s3://genco-no-such-bucket/a/b.txt"
    message = rf"^{re.escape(path)}: bucket 'genco-no-such-bucket' does not exist$"
    with pytest.raises(NotFoundError, match=message):
        storage.read_bytes(path)
    with pytest.raises(NotFoundError, match=message):
        storage.write_bytes(path, b"x")
    with pytest.raises(NotFoundError, match="bucket 'genco-no-such-bucket' does not exist"):
        storage.listdir("s3://genco-no-such-bucket/a")


@pytest.mark.parametrize("path", ["s3://", "s3:///x", f"s3://{BUCKET}", f"s3://{BUCKET}/d/"])
def test_s3_path_without_object_name_is_rejected(s3_endpoint: str, path: str) -> None:
    with pytest.raises(ValueError, match=rf"^{re.escape(path)}: s3 URL has no"):
        storage.write_bytes(path, b"x")
