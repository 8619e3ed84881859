"""genco.data.storage against the local filesystem and a real in-process GCS emulator
(the same behaviour on a real S3 server: tests/test_storage_s3.py)."""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.spec import AbstractBufferedFile

from genco.data import fs, storage, trees
from genco.errors import NotFoundError

if TYPE_CHECKING:
    from tests.conftest import GcsEmulator


class Boom(RuntimeError):
    """Raised on purpose inside atomic writes; distinct so no real error is swallowed."""


@pytest.fixture(params=["local", "gs"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh empty directory on each backend (the emulator starts only for "gs")."""
    if request.param == "local":
        return str(tmp_path / "root")
    emulator: GcsEmulator = request.getfixturevalue("gcs")
    return emulator.url("root")


# ----------------------------------------------------------------------- paths


def test_is_gcs() -> None:
    assert storage.is_gcs("gs://b/x")
    assert not storage.is_gcs("/tmp/gs://x")
    assert not storage.is_gcs("relative/path")
    assert not storage.is_gcs("s3://b/x")


def test_is_remote() -> None:
    assert storage.is_remote("gs://b/x")
    assert storage.is_remote("s3://b/x")
    assert storage.is_s3("s3://b/x")
    assert not storage.is_remote("/tmp/s3://x")
    assert not storage.is_remote("relative/s3/path")


def test_join_gs_uses_forward_slashes_and_never_escapes_to_root() -> None:
    assert storage.join("gs://b/run/", "a", "b.csv") == "gs://b/run/a/b.csv"
    assert storage.join("gs://b", "/abs/", "x") == "gs://b/abs/x"
    assert storage.join("gs://b/run", "", "x") == "gs://b/run/x"


def test_join_local_matches_os_path() -> None:
    assert storage.join("/tmp/run", "a", "b.csv") == os.path.join("/tmp/run", "a", "b.csv")


@pytest.mark.parametrize(
    ("path", "fmt"),
    [("a.csv", "csv"), ("a.CSV.GZ", "csv"), ("a.parquet", "parquet"), ("gs://b/a.pq", "parquet")],
)
def test_table_format(path: str, fmt: str) -> None:
    assert storage.table_format(path) == fmt


def test_table_format_rejects_unknown_extension() -> None:
    with pytest.raises(ValueError, match=r"gs://b/x\.json: unsupported extension; use \.csv"):
        storage.table_format("gs://b/x.json")
    with pytest.raises(ValueError, match="unsupported extension"):
        storage.read_table("/nonexistent/x.tsv")


# ------------------------------------------------------------------- client


def test_gcs_client_is_cached_and_anonymous_on_emulator(gcs: GcsEmulator) -> None:
    client = storage.gcs_client()
    assert client is storage.gcs_client()
    assert client is gcs.client
    assert client.project == "genco-local"


def test_gcs_client_honours_google_cloud_project(
    gcs: GcsEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "other-project")
    assert storage.gcs_client().project == "other-project"


def test_local_paths_never_build_a_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A unique emulator host gives a cache key no other test uses: if any local
    # operation built the default client, it would appear under this key.
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:1")
    p = str(tmp_path / "x.json")
    storage.write_json(p, {"a": 1})
    assert storage.read_json(p) == {"a": 1}
    assert storage.exists(p)
    storage.write_table(pd.DataFrame({"a": [1]}), str(tmp_path / "t.csv"))
    with storage.atomic_local_path(str(tmp_path / "y.bin")) as tmp:
        Path(tmp).write_bytes(b"y")
    assert not any("http://127.0.0.1:1" in key for key in fs._filesystems)
    assert not any("http://127.0.0.1:1" in key for key in fs._gcs_clients)


def test_filesystem_follows_the_emulator_and_is_cached(gcs: GcsEmulator) -> None:
    fs = storage.filesystem("gs://b/x")
    assert fs is storage.filesystem("gs://other/y")
    assert fs.project == "genco-local"
    assert str(fs._location) == gcs.host


def test_a_passed_gcs_client_is_used_for_its_endpoint(gcs: GcsEmulator) -> None:
    path = gcs.url("via-client.txt")
    storage.write_text(path, "x", client=gcs.client)
    assert storage.read_text(path, client=gcs.client) == "x"
    assert storage.filesystem(path, gcs.client)._location == gcs.host


def test_a_gcs_client_cannot_reach_s3(gcs: GcsEmulator) -> None:
    with pytest.raises(ValueError, match=r"^s3://b/x: a google\.cloud\.storage\.Client cannot"):
        storage.read_bytes("s3://b/x", client=gcs.client)


@pytest.mark.parametrize("path", ["s3a://b/x", "http://host/x.csv", "file:///tmp/x"])
def test_unknown_url_scheme_is_refused_not_taken_for_a_local_path(path: str) -> None:
    with pytest.raises(ValueError, match=rf"^{re.escape(path)}: unsupported URL scheme"):
        storage.write_bytes(path, b"x")
    with pytest.raises(ValueError, match="unsupported URL scheme"):
        storage.exists(path)


# --------------------------------------------------------------- round trips


def test_bytes_text_json_round_trip(root: str) -> None:
    storage.makedirs(root)
    storage.write_bytes(storage.join(root, "b.bin"), b"\x00\x01binary")
    assert storage.read_bytes(storage.join(root, "b.bin")) == b"\x00\x01binary"

    storage.write_text(storage.join(root, "t.txt"), "広告 creative\n")
    assert storage.read_text(storage.join(root, "t.txt")) == "広告 creative\n"

    obj = {"z": 1, "a": [1, 2, {"k": None}], "見出し": "テスト"}
    path = storage.join(root, "sub", "o.json")
    storage.write_json(path, obj)
    assert storage.read_json(path) == obj
    text = storage.read_text(path)
    assert text.endswith("}\n")
    assert text.index('"z"') < text.index('"a"'), "key order must be preserved"
    assert '  "z": 1' in text
    assert "テスト" in text


def test_write_replaces_existing(root: str) -> None:
    path = storage.join(root, "f.txt")
    storage.write_text(path, "old")
    storage.write_text(path, "new")
    assert storage.read_text(path) == "new"


def test_local_write_creates_parent_dirs_and_no_temp_left(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "c.txt"
    storage.write_text(str(path), "x")
    assert path.read_text() == "x"
    assert os.listdir(path.parent) == ["c.txt"]


def test_local_atomic_write_keeps_normal_file_mode(tmp_path: Path) -> None:
    path = tmp_path / "m.txt"
    storage.write_text(str(path), "x")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_exists(root: str) -> None:
    path = storage.join(root, "d", "f.txt")
    assert not storage.exists(path)
    assert not storage.exists(storage.join(root, "d"))
    storage.write_text(path, "x")
    assert storage.exists(path)
    assert storage.exists(storage.join(root, "d")), "a non-empty directory exists on both"
    assert not storage.exists(storage.join(root, "d", "f.tx"))


def test_exists_bucket_root(gcs: GcsEmulator) -> None:
    assert storage.exists(f"gs://{gcs.bucket}")
    assert not storage.exists("gs://genco-no-such-bucket")
    assert not storage.exists("gs://genco-no-such-bucket/x")


def test_listdir_direct_children_sorted(root: str) -> None:
    for name in ["b.txt", "a.txt", "sub/x.txt", "sub/deeper/y.txt", "zdir/z.txt"]:
        storage.write_text(storage.join(root, *name.split("/")), name)
    assert storage.listdir(root) == ["a.txt", "b.txt", "sub", "zdir"]
    assert storage.listdir(storage.join(root, "sub")) == ["deeper", "x.txt"]
    assert storage.listdir(root + "/") == ["a.txt", "b.txt", "sub", "zdir"]


def test_listdir_skips_folder_placeholder_objects(gcs: GcsEmulator) -> None:
    # The console and gsutil make zero-byte "dir/" objects; they are not children.
    url = gcs.url("folder")
    gcs.client.bucket(gcs.bucket).blob(url[len(f"gs://{gcs.bucket}/") :] + "/").upload_from_string(
        b""
    )
    assert storage.listdir(url) == []
    storage.write_text(storage.join(url, "x.txt"), "x")
    assert storage.listdir(url) == ["x.txt"]


def test_listdir_missing_dir_raises(root: str) -> None:
    missing = storage.join(root, "nope")
    with pytest.raises(NotFoundError, match=rf"^{re.escape(missing)}: no such directory"):
        storage.listdir(missing)


def test_listdir_of_a_file_is_not_a_directory(root: str) -> None:
    path = storage.join(root, "f.txt")
    storage.write_text(path, "x")
    with pytest.raises(NotADirectoryError, match=rf"^{re.escape(path)}: not a directory"):
        storage.listdir(path)


def test_remove(root: str) -> None:
    path = storage.join(root, "f.txt")
    storage.write_text(path, "x")
    storage.remove(path)
    assert not storage.exists(path)
    with pytest.raises(FileNotFoundError, match=r"f\.txt"):
        storage.remove(path)


def test_makedirs_gs_is_noop(gcs: GcsEmulator) -> None:
    url = gcs.url("dir")
    storage.makedirs(url)
    assert not storage.exists(url)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "op",
    [
        storage.read_bytes,
        storage.read_text,
        storage.read_json,
        storage.remove,
        lambda p: storage.read_table(p + ".csv"),
        lambda p: storage.read_table(p + ".parquet"),
    ],
    ids=["read_bytes", "read_text", "read_json", "remove", "read_csv", "read_parquet"],
)
def test_missing_file_error_names_full_path(root: str, op: Callable[[str], object]) -> None:
    path = storage.join(root, "missing")
    with pytest.raises(FileNotFoundError) as info:
        op(path)
    assert path in str(info.value)


def test_open_read_missing_names_full_path(root: str) -> None:
    path = storage.join(root, "missing.bin")
    with pytest.raises(FileNotFoundError) as info, storage.open_read(path):
        pass
    assert path in str(info.value)


def test_missing_bucket_is_named(gcs: GcsEmulator) -> None:
    path = "gs://genco-no-such-bucket/a/b.txt"
    with pytest.raises(FileNotFoundError, match=r"gs://genco-no-such-bucket/a/b\.txt: bucket"):
        storage.read_bytes(path)
    with pytest.raises(FileNotFoundError, match="bucket 'genco-no-such-bucket' does not exist"):
        storage.write_bytes(path, b"x")
    with pytest.raises(FileNotFoundError, match="genco-no-such-bucket"):
        storage.listdir("gs://genco-no-such-bucket/a")


@pytest.mark.parametrize(
    "path", ["gs://genco-test", "gs://genco-test/", "gs://genco-test/dir/", "gs://", "gs:///x"]
)
def test_gs_path_without_object_name_is_rejected(gcs: GcsEmulator, path: str) -> None:
    expected = rf"^{re.escape(path)}: gs URL has no"
    with pytest.raises(ValueError, match=expected):
        storage.write_bytes(path, b"x")
    with pytest.raises(ValueError, match=expected):
        storage.read_bytes(path)


# ------------------------------------------------------------------ tables


def _ids_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": ["007", "010", "123"],
            "text": ["NA", "null", ""],
            "clicks": [1, 0, 5],
            "ctr": [0.5, 0.0, 0.25],
        }
    )


@pytest.mark.parametrize("ext", [".csv", ".csv.gz", ".parquet"])
def test_table_round_trip_keeps_string_ids(root: str, ext: str) -> None:
    path = storage.join(root, "tables", "t" + ext)
    df = _ids_frame()
    storage.write_table(df, path)
    back = storage.read_table(path, dtype={"id": "str"})
    assert back["id"].tolist() == ["007", "010", "123"]
    assert back["clicks"].tolist() == [1, 0, 5]
    assert back["ctr"].tolist() == [0.5, 0.0, 0.25]
    # Only the empty field is missing; "NA"/"null" are real creative text.
    assert back["text"].iloc[:2].tolist() == ["NA", "null"]
    if ext == ".parquet":
        assert back["text"].iloc[2] == ""
    else:
        assert pd.isna(back["text"].iloc[2])


def test_csv_without_dtype_infers_numbers(root: str) -> None:
    path = storage.join(root, "t.csv")
    storage.write_table(_ids_frame(), path)
    assert storage.read_table(path)["id"].tolist() == [7, 10, 123]


def test_csv_gz_is_gzip_and_csv_is_plain(root: str) -> None:
    storage.write_table(_ids_frame(), storage.join(root, "t.csv.gz"))
    storage.write_table(_ids_frame(), storage.join(root, "t.csv"))
    raw_gz = storage.read_bytes(storage.join(root, "t.csv.gz"))
    assert gzip.decompress(raw_gz).startswith(b"id,text,clicks,ctr\n007,")
    assert storage.read_bytes(storage.join(root, "t.csv")).startswith(b"id,text,clicks,ctr\n")


def test_write_table_rejects_unknown_extension(root: str) -> None:
    path = storage.join(root, "t.xlsx")
    with pytest.raises(ValueError, match=r"t\.xlsx: unsupported extension"):
        storage.write_table(_ids_frame(), path)
    assert not storage.exists(path)


# ------------------------------------------------------------- directories


def _make_tree(base: Path) -> dict[str, bytes]:
    files = {
        "model.pt": b"\x00weights" * 100,
        "config.json": b'{"a": 1}\n',
        "sub/vocab.txt": "広告\n".encode(),
        "sub/deep/x.bin": os.urandom(1000),
    }
    for rel, data in files.items():
        p = base.joinpath(*rel.split("/"))
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


def _read_tree(base: Path) -> dict[str, bytes]:
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in base.rglob("*") if p.is_file()}


def test_upload_download_dir_round_trip(root: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = _make_tree(src)
    dest = storage.join(root, "artefacts")
    trees.upload_dir(str(src), dest)
    assert storage.listdir(dest) == ["config.json", "model.pt", "sub"]
    assert storage.read_bytes(storage.join(dest, "sub", "deep", "x.bin")) == files["sub/deep/x.bin"]

    out = tmp_path / "out"
    trees.download_dir(dest, str(out))
    assert _read_tree(out) == files


def test_upload_dir_missing_source(root: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no-src"):
        trees.upload_dir(str(tmp_path / "no-src"), storage.join(root, "d"))


def test_download_dir_missing_source(root: str, tmp_path: Path) -> None:
    src = storage.join(root, "nothing-here")
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        trees.download_dir(src, str(tmp_path / "out"))


def test_upload_dir_into_itself_is_rejected(tmp_path: Path) -> None:
    _make_tree(tmp_path / "src")
    with pytest.raises(ValueError, match="inside the source"):
        trees.upload_dir(str(tmp_path / "src"), str(tmp_path / "src" / "copy"))


@pytest.mark.parametrize("rel", ["a/../../escape.txt", "../x", "a//b", "./x", "a/"])
def test_download_dir_rejects_unsafe_object_names(rel: str, tmp_path: Path) -> None:
    # Tested on the helper: the emulator normalises "."/"//" away and refuses ".."
    # (HTTP 500), so such objects cannot be created there, while real GCS allows them.
    with pytest.raises(ValueError, match="unsafe object name"):
        trees._safe_local_path(str(tmp_path), rel, "gs://b/" + rel)
    assert trees._safe_local_path(str(tmp_path), "a/b.txt", "gs://b/a/b.txt") == str(
        tmp_path / "a" / "b.txt"
    )


# ----------------------------------------------------------------- streaming


def test_open_read_streams_in_chunks(root: str) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    path = storage.join(root, "big.bin")
    storage.write_bytes(path, data)
    got = bytearray()
    with storage.open_read(path) as f:
        while chunk := f.read(256 * 1024):
            assert len(chunk) <= 256 * 1024
            got += chunk
    assert bytes(got) == data


def test_open_read_gs_is_a_chunked_reader(gcs: GcsEmulator) -> None:
    # fsspec's buffered file issues ranged GETs of blocksize bytes: no whole-object download.
    path = gcs.url("r.bin")
    storage.write_bytes(path, b"abc")
    with storage.open_read(path) as f:
        assert isinstance(f, AbstractBufferedFile)
        assert f.read() == b"abc"


# ----------------------------------------------------------------- atomicity


def test_atomic_local_path_parquet_writer_to_gs(gcs: GcsEmulator) -> None:
    path = gcs.url("out/part.parquet")
    schema = pa.schema([("id", pa.string()), ("clicks", pa.int64())])
    with storage.atomic_local_path(path, suffix=".parquet") as tmp:
        assert tmp.endswith(".parquet")
        assert not storage.is_gcs(tmp)
        with pq.ParquetWriter(tmp, schema) as writer:
            for i in range(3):
                writer.write_table(pa.table({"id": [f"{i:03d}"], "clicks": [i]}, schema=schema))
        assert not storage.exists(path), "object must not be visible before the block exits"
    assert not os.path.exists(tmp)
    df = storage.read_table(path)
    assert df["id"].tolist() == ["000", "001", "002"]
    assert df["clicks"].tolist() == [0, 1, 2]


def test_atomic_local_path_local_rename(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "f.parquet"
    with storage.atomic_local_path(str(path), suffix=".parquet") as tmp:
        assert os.path.dirname(tmp) == str(path.parent), "temp must be on the same filesystem"
        pq.write_table(pa.table({"x": [1]}), tmp)
        assert not path.exists()
    assert pq.read_table(path).column("x").to_pylist() == [1]
    assert os.listdir(path.parent) == ["f.parquet"]


def test_failed_write_leaves_no_destination_and_no_temp(root: str) -> None:
    path = storage.join(root, "sub", "f.parquet")
    captured: list[str] = []
    with pytest.raises(Boom), storage.atomic_local_path(path, suffix=".parquet") as tmp:
        captured.append(tmp)
        pq.write_table(pa.table({"x": [1, 2]}), tmp)
        raise Boom
    assert not os.path.exists(captured[0])
    assert not storage.exists(path)
    if not storage.is_gcs(root):
        assert os.listdir(os.path.dirname(path)) == [], "no hidden temp file left behind"


def test_failed_write_keeps_existing_destination(root: str) -> None:
    path = storage.join(root, "keep.txt")
    storage.write_text(path, "original")
    with pytest.raises(Boom), storage.atomic_local_path(path) as tmp:
        Path(tmp).write_text("half writ")
        raise Boom
    assert storage.read_text(path) == "original"
    if not storage.is_gcs(root):
        assert os.listdir(root) == ["keep.txt"]


def test_failed_write_table_keeps_existing_destination(root: str) -> None:
    path = storage.join(root, "t.parquet")
    storage.write_table(_ids_frame(), path)
    unserialisable = pd.DataFrame({"x": [object()]})
    with pytest.raises((pa.ArrowException, ValueError, TypeError)):
        storage.write_table(unserialisable, path)
    assert storage.read_table(path)["id"].tolist() == ["007", "010", "123"]
    if not storage.is_gcs(root):
        assert os.listdir(root) == ["t.parquet"]


def test_large_gs_write_via_temp_file_round_trips(gcs: GcsEmulator) -> None:
    # Above 8 MiB the client switches from a multipart to a resumable upload;
    # both are finalised-only-at-the-end on GCS and both work on the emulator.
    data = os.urandom(9 * 1024 * 1024)
    path = gcs.url("big/blob.bin")
    with storage.atomic_local_path(path) as tmp:
        Path(tmp).write_bytes(data)
    assert storage.read_bytes(path) == data
