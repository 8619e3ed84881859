"""Ingest against hostile and unlucky files: row problems never stop the run.

A malformed row, a byte that is not UTF-8 or an absurd timestamp is quarantined with its row
number, never the whole file; every user mistake is one line naming the file, exit 2; the
quarantine is safe to open in a spreadsheet. Real files, a real ``genco validate`` process.
"""

from __future__ import annotations

import csv
import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genco.data.contract import load_catalog, load_constraints
from genco.data.ingest import IngestConfig, ingest, spreadsheet_safe
from genco.errors import ContractError
from tests.test_contract import CATALOG_CSV, HEADER, write

COLS = "ad_id,title,image,click,propensity,timestamp,ctx_0"
T0 = 1_767_225_600  # 2026-01-01 UTC
NOW = T0 + 30 * 86_400  # the clock handed to ingest: 2026-01-31 UTC
ROOT = Path(__file__).resolve().parents[1]


def good(i: int) -> str:
    """Data row i (1-based): valid and distinct (timestamps differ)."""
    return f"0,1,a,{i % 2},0.25,{T0 + i},0.5"


def log(n: int, replace: dict[int, str] | None = None) -> list[str]:
    """Header + n good rows, rows in replace (1-based) swapped for the given text."""
    rows = [replace.get(i, good(i)) if replace else good(i) for i in range(1, n + 1)]
    return [COLS, *rows]


def write_bytes(tmp_path: Path, name: str, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return str(p)


@pytest.fixture
def contract(tmp_path):
    cat = load_catalog(write(tmp_path, "catalog.csv", CATALOG_CSV))
    cons = load_constraints(write(tmp_path, "constraints.csv", HEADER + "*,title,0,image,b\n"), cat)
    return cat, cons


def run_ingest(tmp_path, contract, path, **config):
    cat, cons = contract
    cfg = IngestConfig(**{"max_bad_fraction": 1.0, **config})
    return ingest(path, cat, cons, str(tmp_path / "out"), cfg, clock=lambda: float(NOW))


def quarantine(tmp_path) -> list[dict[str, str]]:
    with open(tmp_path / "out" / "quarantine.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# (name, file bytes, [(row, reason_code, reason)]): 200 data rows, 199 of them good.
MALFORMED = [
    (
        "truncated_last_line",
        "\n".join(log(199)).encode() + b"\n0,1,a,1,0.2",
        [(200, "malformed_row", "row has 5 fields, expected 7: 0,1,a,1,0.2")],
    ),
    (
        "extra_field",
        ("\n".join(log(200, {57: good(57) + ",x"})) + "\n").encode(),
        [(57, "malformed_row", f"row has 8 fields, expected 7: {good(57)},x")],
    ),
    (
        "latin1_byte",
        ("\n".join(log(200, {57: "0,caf\xe9,a,1,0.25,1,0.5"})) + "\n").encode("latin-1"),
        [(57, "bad_encoding", "title 'caf\\xe9' is not valid UTF-8")],
    ),
    (
        "latin1_byte_in_a_malformed_row",
        ("\n".join(log(200, {57: "0,caf\xe9,a"})) + "\n").encode("latin-1"),
        [(57, "malformed_row", "row has 3 fields, expected 7: 0,caf\\xe9,a")],
    ),
    (
        "unterminated_quote_at_the_end",
        "\n".join(log(199)).encode() + b'\n0,"1',
        [(200, "malformed_row", 'row has 2 fields, expected 7: 0,"1')],
    ),
    (
        "crlf_and_a_short_row",
        ("\r\n".join(log(200, {3: "0,1"})) + "\r\n").encode(),
        [(3, "malformed_row", "row has 2 fields, expected 7: 0,1")],
    ),
]


@pytest.mark.parametrize("name", ["impressions.csv", "impressions.csv.gz"])
@pytest.mark.parametrize(("case", "data", "expected"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_row_is_quarantined_never_the_whole_file(
    tmp_path, contract, case, data, expected, name
):
    path = write_bytes(tmp_path, name, data)
    s = run_ingest(tmp_path, contract, path)
    assert (s.rows_in, s.rows_valid, s.rows_quarantined) == (200, 199, 1)
    q = quarantine(tmp_path)
    assert [(int(r["row"]), r["reason_code"], r["reason"]) for r in q] == expected
    valid = pd.read_parquet(tmp_path / "out" / "impressions.parquet")
    # Every good row kept, in order, with its own values.
    bad_row = expected[0][0]
    kept = [i for i in range(1, 201) if i != bad_row]
    assert valid["timestamp"].tolist() == [float(T0 + i) for i in kept]


def test_row_numbers_stay_data_row_numbers_across_blocks_and_chunks(tmp_path, contract):
    """Malformed rows spread over several 4 MiB read blocks (Arrow reports them ahead of the
    rows around them) and a row with a bad click after each: every quarantined row keeps its
    1-based data row number."""
    n = 400_000
    malformed = {1, 2, 139_000, 139_001, 250_000, 399_999}
    bad_click = {r + 2 for r in malformed if r + 2 <= n} | {n}
    replace = {r: "0,1,a" for r in malformed}
    replace |= {r: f"0,1,a,7,0.25,{T0 + r},0.5" for r in bad_click}
    path = write_bytes(tmp_path, "big.csv", ("\n".join(log(n, replace)) + "\n").encode())
    s = run_ingest(tmp_path, contract, path, chunk_rows=65_536)
    assert s.rows_in == n
    assert s.quarantined_by_reason == {
        "malformed_row": len(malformed),
        "bad_click": len(bad_click),
    }
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv", dtype=str, keep_default_na=False)
    got = {
        code: sorted(q.loc[q.reason_code == code, "row"].astype(int)) for code in set(q.reason_code)
    }
    assert got == {"malformed_row": sorted(malformed), "bad_click": sorted(bad_click)}
    valid = pd.read_parquet(tmp_path / "out" / "impressions.parquet", columns=["timestamp"])
    kept = np.setdiff1d(np.arange(1, n + 1), sorted(malformed | bad_click))
    np.testing.assert_array_equal(valid["timestamp"].to_numpy(), T0 + kept)


LATEST = "2026-02-01T00:00:00Z"  # NOW + 1 day


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("1e30", f"timestamp '1e30' is outside 2000-01-01 .. now + 1 day ({LATEST})"),
        ("0", f"timestamp '0' is outside 2000-01-01 .. now + 1 day ({LATEST})"),
        ("946684799", f"timestamp '946684799' is outside 2000-01-01 .. now + 1 day ({LATEST})"),
        (
            str(NOW + 86_401),
            f"timestamp '{NOW + 86_401}' is outside 2000-01-01 .. now + 1 day ({LATEST})",
        ),
        (
            "2099-01-01T00:00:00Z",
            f"timestamp '2099-01-01T00:00:00Z' is outside 2000-01-01 .. now + 1 day ({LATEST})",
        ),
        ("-1e308", f"timestamp '-1e308' is outside 2000-01-01 .. now + 1 day ({LATEST})"),
    ],
)
def test_timestamps_outside_a_sane_range_are_quarantined(tmp_path, contract, value, reason):
    edge = {1: "0,1,a,1,0.25,946684800,0.5", 2: f"0,1,a,1,0.25,{NOW + 86_400},0.5"}
    rows = log(5, {**edge, 3: f"0,1,a,1,0.25,{value},0.5"})
    s = run_ingest(tmp_path, contract, write(tmp_path, "i.csv", "\n".join(rows) + "\n"))
    assert (s.rows_valid, s.quarantined_by_reason) == (4, {"bad_timestamp": 1})
    assert [(r["row"], r["reason"]) for r in quarantine(tmp_path)] == [("3", reason)]


def test_one_absurd_timestamp_no_longer_empties_the_window(tmp_path):
    """Issue 14: a timestamp of 1e30 was accepted; --window-days 30 then kept 1 of 30,000."""
    from genco.pipeline.steps import ingest_step

    n = 30_000
    ts = [str(T0 + i * 60) for i in range(n)]  # about 21 days of impressions
    ts[123] = "1e30"
    frame = pd.DataFrame({"ad_id": "0", "title": "1", "image": "a", "click": "0", "timestamp": ts})
    path = str(tmp_path / "i.csv")
    frame.to_csv(path, index=False)
    cat_path = write(tmp_path, "catalog.csv", CATALOG_CSV)
    out = ingest_step(cat_path, path, str(tmp_path / "data"), window_days=30)
    assert out["quarantined_by_reason"] == {"bad_timestamp": 1}
    assert out["rows_in_window"] == n - 1


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
@pytest.mark.parametrize("tz", [None, "UTC", "America/New_York"])
def test_parquet_timestamp_columns_are_accepted_as_epoch_seconds(tmp_path, contract, unit, tz):
    secs = np.array([T0 + 1, T0 + 2, T0 + 3], dtype=np.int64)
    frac = {"s": 0, "ms": 123_000_000, "us": 123_456_000, "ns": 123_456_789}[unit]
    ns = secs * 1_000_000_000 + frac
    per = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1}[unit]
    ts = pa.array(ns // per, pa.int64()).cast(pa.timestamp(unit, tz))
    table = pa.table(
        {
            "ad_id": ["0", "0", "0"],
            "title": ["1", "1", "0"],
            "image": ["a", "b", "a"],
            "click": pa.array([1, 0, 1], pa.int8()),
            "timestamp": ts,
        }
    )
    path = str(tmp_path / "i.parquet")
    pq.write_table(table, path)
    s = run_ingest(tmp_path, contract, path)
    assert (s.rows_valid, s.rows_quarantined) == (3, 0)
    valid = pd.read_parquet(tmp_path / "out" / "impressions.parquet")
    np.testing.assert_allclose(valid["timestamp"], secs + frac / 1e9, rtol=0, atol=1e-6)


def test_parquet_timestamps_outside_the_range_are_quarantined(tmp_path, contract):
    ts = pa.array([T0, 0, NOW + 10 * 86_400], pa.int64()).cast(pa.timestamp("s", "UTC"))
    table = pa.table(
        {
            "ad_id": ["0"] * 3,
            "title": ["1"] * 3,
            "image": ["a"] * 3,
            "click": [1, 1, 1],
            "timestamp": ts,
        }
    )
    path = str(tmp_path / "i.parquet")
    pq.write_table(table, path)
    s = run_ingest(tmp_path, contract, path)
    assert (s.rows_valid, s.quarantined_by_reason) == (1, {"bad_timestamp": 2})
    assert [r["row"] for r in quarantine(tmp_path)] == ["2", "3"]


# --------------------------------------------------------------- user mistakes: one line

GOOD_LOG = ("\n".join(log(3)) + "\n").encode()
PARQUET_BYTES = b"PAR1" + b"\0" * 16

# (file name, content, exact message after "PATH: ")
BAD_FILES = [
    (
        "i.csv",
        gzip.compress(GOOD_LOG),
        "looks gzip-compressed (it starts with the gzip magic bytes); "
        "name it .csv.gz or decompress it",
    ),
    ("i.csv", PARQUET_BYTES, "looks like a Parquet file; name it .parquet"),
    ("i.csv.gz", GOOD_LOG, "named .gz but not gzip-compressed; rename it .csv"),
    ("i.parquet", GOOD_LOG, "not a Parquet file (it does not start with 'PAR1')"),
    (
        "i.csv",
        "ad_id,titl\xe9,image,click\n0,1,a,1\n".encode("latin-1"),
        "header is not valid UTF-8 (invalid continuation byte)",
    ),
]


@pytest.mark.parametrize(
    ("name", "data", "message"),
    BAD_FILES,
    ids=["gzip_in_csv", "parquet_in_csv", "plain_in_csv_gz", "csv_in_parquet", "latin1_header"],
)
def test_whole_file_mistakes_name_the_file_and_the_cause(tmp_path, contract, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ContractError) as err:
        run_ingest(tmp_path, contract, str(path))
    assert str(err.value) == f"{path}: {message}"


def genco_validate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "genco.cli", "validate", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def _nested_parquet(tmp_path: Path, name: str, column: pa.Array) -> str:
    table = pa.table(
        {"ad_id": ["0"], "title": ["1"], "image": ["a"], "click": [1], "ctx_0": column}
    )
    path = str(tmp_path / name)
    pq.write_table(table, path)
    return path


def _mistakes(tmp_path: Path) -> dict[str, tuple[list[str], str, str]]:
    """name -> (arguments, the file the message must name, what it must say)."""
    ok = write(tmp_path, "ok.csv", "\n".join(log(3)) + "\n")
    out = str(tmp_path / "out")
    listed = _nested_parquet(tmp_path, "list.parquet", pa.array([[1.0, 2.0]]))
    struct = _nested_parquet(tmp_path, "struct.parquet", pa.array([{"x": 1.0}]))
    dataset = tmp_path / "impressions.parquet"  # a Spark-style dataset directory
    dataset.mkdir()
    plain_dir = tmp_path / "logs"
    plain_dir.mkdir()
    gz = tmp_path / "gz.csv"
    gz.write_bytes(gzip.compress(("\n".join(log(3)) + "\n").encode()))
    a_file = write(tmp_path, "out.txt", "x")
    return {
        "list_column": (["--impressions", listed, "--out", out], listed, "nested type list"),
        "struct_column": (["--impressions", struct, "--out", out], struct, "nested type struct"),
        "dataset_directory": (
            ["--impressions", str(dataset), "--out", out],
            str(dataset),
            "dataset has no Parquet files",
        ),
        "directory": (
            ["--impressions", str(plain_dir), "--out", out],
            str(plain_dir),
            "dataset has no Parquet files",
        ),
        "existing_file_as_out": (
            ["--impressions", ok, "--out", a_file],
            a_file,
            "is not a directory",
        ),
        "file_as_parent_of_out": (
            ["--impressions", ok, "--out", a_file + "/sub"],
            a_file,
            "is not a directory",
        ),
        "gzip_in_csv": (["--impressions", str(gz), "--out", out], str(gz), "looks gzip-compressed"),
    }


MISTAKES = [
    "list_column",
    "struct_column",
    "dataset_directory",
    "directory",
    "existing_file_as_out",
    "file_as_parent_of_out",
    "gzip_in_csv",
]


@pytest.mark.parametrize("mistake", MISTAKES)
def test_every_user_mistake_is_one_line_naming_the_file_exit_2(tmp_path, mistake):
    cat = write(tmp_path, "catalog.csv", CATALOG_CSV)
    args, named, says = _mistakes(tmp_path)[mistake]
    r = genco_validate("--catalog", cat, *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("genco validate: error: ")
    assert named in lines[0] and says in lines[0], lines[0]
    assert "Traceback" not in r.stdout


# ------------------------------------------------------------ spreadsheet-safe quarantine

FORMULA_CATALOG = """ad_id,component,element_id
0,title,=2+3
0,title,-1
0,title,plain
0,image,@a
0,image,b
"""


def test_quarantine_is_safe_to_open_in_a_spreadsheet_and_valid_rows_keep_exact_values(tmp_path):
    cat = load_catalog(write(tmp_path, "catalog.csv", FORMULA_CATALOG))
    cons = load_constraints(None, cat)
    rows = [
        "ad_id,title,image,click,ctx_0",
        "0,=2+3,@a,1,-0.5",  # valid: kept exactly
        "0,-1,b,1,+1",  # valid
        "=cmd|' /C calc'!A0,plain,b,1,0",  # unknown ad
        "0,=2+3,@a,2,-0.5",  # bad click
        '0,plain,b,1,"\tx"',  # bad context starting with a tab
        '0,plain,b,1,"\rx"',  # bad context starting with a carriage return
        "0,plain,b,1,-",  # a lone minus
        "0,=HYPERLINK(1),b,1,1,@extra",  # malformed: the raw text goes in too
    ]
    path = write(tmp_path, "i.csv", "\n".join(rows) + "\n")
    s = ingest(path, cat, cons, str(tmp_path / "out"), IngestConfig(max_bad_fraction=1.0))
    assert (s.rows_valid, s.rows_quarantined) == (2, 6)
    valid = pd.read_parquet(tmp_path / "out" / "impressions.parquet")
    assert valid[["title", "image"]].values.tolist() == [["=2+3", "@a"], ["-1", "b"]]
    assert valid["ctx_0"].tolist() == [-0.5, 1.0]
    q = quarantine(tmp_path)
    cells = [[r[c] for c in ("ad_id", "title", "image", "ctx_0")] for r in q]
    assert cells == [
        ["'=cmd|' /C calc'!A0", "plain", "b", "0"],
        ["0", "'=2+3", "'@a", "'-0.5"],
        ["0", "plain", "b", "'\tx"],
        ["0", "plain", "b", "'\rx"],
        ["0", "plain", "b", "'-"],
        ["0", "'=HYPERLINK(1)", "b", "1"],
    ]
    assert [r["reason_code"] for r in q] == [
        "unknown_ad",
        "bad_click",
        "bad_context",
        "bad_context",
        "bad_context",
        "malformed_row",
    ]
    # No cell of the quarantine starts a formula.
    for r in q:
        for v in r.values():
            assert not v.startswith(("=", "+", "-", "@", "\t", "\r")), r


@pytest.mark.parametrize(
    ("value", "safe"),
    [
        ("=1+1", "'=1+1"),
        ("+1", "'+1"),
        ("-1", "'-1"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("a=1", "a=1"),
        ("", ""),
        ("'=1", "'=1"),
    ],
)
def test_spreadsheet_safe(value, safe):
    assert spreadsheet_safe(value) == safe
