"""Impression validation: a table of bad rows with exact messages, and quarantine accounting."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from genco.data import storage
from genco.data.contract import load_catalog, load_constraints
from genco.data.ingest import IngestConfig, TooManyBadRows, ingest
from genco.errors import ContractError
from tests.test_contract import CATALOG_CSV, HEADER, write

COLS = "ad_id,title,image,click,propensity,timestamp,ctx_0"
GOOD = "0,1,a,1,0.25,1767225600,0.5"

# (row, reason_code, reason): each row alone in a log of good rows.
BAD_ROWS = [
    ("9,1,a,1,0.25,1767225600,0.5", "unknown_ad", "ad_id '9' is not in the catalog"),
    (
        "0,zz,a,1,0.25,1767225600,0.5",
        "unknown_element",
        "title 'zz' is not an element of any component",
    ),
    (
        "0,a,a,1,0.25,1767225600,0.5",
        "wrong_component",
        "title 'a' is an element of component 'image', not 'title'",
    ),
    ("7,0,b,1,0.25,1767225600,0.5", "not_a_candidate", "title '0' is not a candidate of ad '7'"),
    ("0,1,a,2,0.25,1767225600,0.5", "bad_click", "click '2' is not 0 or 1"),
    ("0,1,a,yes,0.25,1767225600,0.5", "bad_click", "click 'yes' is not 0 or 1"),
    ("0,1,a,,0.25,1767225600,0.5", "missing_value", "column 'click' is empty"),
    ("0,,a,1,0.25,1767225600,0.5", "missing_value", "column 'title' is empty"),
    ("0,1,a,1,0,1767225600,0.5", "bad_propensity", "propensity '0' is not in (0, 1]"),
    ("0,1,a,1,1.5,1767225600,0.5", "bad_propensity", "propensity '1.5' is not in (0, 1]"),
    ("0,1,a,1,p,1767225600,0.5", "bad_propensity", "propensity 'p' is not in (0, 1]"),
    ("0,1,a,1,0.25,1767225600,abc", "bad_context", "ctx_0 'abc' is not numeric"),
    ("0,1,a,1,0.25,1767225600,", "bad_context", "ctx_0 '' is not numeric"),
    (
        "0,1,a,1,0.25,yesterday,0.5",
        "bad_timestamp",
        "timestamp 'yesterday' is neither epoch seconds nor ISO-8601",
    ),
    (
        "0,0,b,1,0.25,1767225600,0.5",
        "illegal_combination",
        "illegal combination: title '0' with image 'b' is forbidden",
    ),
    (GOOD, "duplicate", "identical to an earlier row"),
]


@pytest.fixture
def contract(tmp_path):
    cat = load_catalog(write(tmp_path, "catalog.csv", CATALOG_CSV))
    cons = load_constraints(write(tmp_path, "constraints.csv", HEADER + "*,title,0,image,b\n"), cat)
    return cat, cons


@pytest.mark.parametrize(("row", "code", "reason"), BAD_ROWS)
def test_bad_row_is_quarantined_with_exact_reason(tmp_path, contract, row, code, reason):
    cat, cons = contract
    text = "\n".join([COLS, GOOD, "0,0,a,0,0.25,2026-01-01T00:00:01Z,1", row]) + "\n"
    path = write(tmp_path, "impressions.csv", text)
    s = ingest(path, cat, cons, str(tmp_path / "out"), IngestConfig(max_bad_fraction=1.0))
    assert (s.rows_in, s.rows_valid, s.rows_quarantined) == (3, 2, 1)
    assert s.quarantined_by_reason == {code: 1}
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv", dtype=str, keep_default_na=False)
    assert q[["row", "reason_code", "reason"]].values.tolist() == [["3", code, reason]]
    # The quarantine keeps the original values as written.
    assert ",".join(q.iloc[0][COLS.split(",")]) == row
    valid = pd.read_parquet(tmp_path / "out" / "impressions.parquet")
    assert valid["ad_id"].tolist() == ["0", "0"]
    assert valid["click"].tolist() == [1, 0]
    # ISO-8601 timestamps are stored as epoch seconds.
    assert valid["timestamp"].tolist() == [1767225600.0, 1767225601.0]


BAD_FILES = [
    ("ad_id,title,image\n0,1,a\n", "missing required column 'click'"),
    ("ad_id,title,click\n0,1,1\n", "missing required component column 'image'"),
    (
        "ad_id,title,image,click,colour\n0,1,a,1,red\n",
        "unexpected column 'colour': not a catalog component (title, image) nor a contract column "
        "(ad_id, click, propensity, timestamp, revenue, ctx_*)",
    ),
    ("ad_id,title,image,click\n", "file has no rows"),
    ("", "file is empty (no header)"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_whole_file_problems_fail_at_once_naming_file_and_column(tmp_path, contract, text, message):
    cat, cons = contract
    path = write(tmp_path, "impressions.csv", text)
    with pytest.raises(ContractError) as err:
        ingest(path, cat, cons, str(tmp_path / "out"))
    assert str(err.value) == f"{path}: {message}"


def test_missing_file_names_the_path(tmp_path, contract):
    cat, cons = contract
    with pytest.raises(ContractError, match=r"nope\.parquet: file not found"):
        ingest(str(tmp_path / "nope.parquet"), cat, cons, str(tmp_path / "out"))


def test_identical_rows_without_timestamp_are_repeat_impressions(tmp_path, contract):
    cat, cons = contract
    path = write(tmp_path, "i.csv", "ad_id,title,image,click\n0,1,a,0\n0,1,a,0\n")
    s = ingest(path, cat, cons, str(tmp_path / "out"))
    assert (s.rows_valid, s.rows_quarantined) == (2, 0)
    forced = ingest(
        path,
        cat,
        cons,
        str(tmp_path / "o2"),
        IngestConfig(check_duplicates=True, max_bad_fraction=1.0),
    )
    assert forced.quarantined_by_reason == {"duplicate": 1}


def corrupt(log: pd.DataFrame, rng: np.random.Generator) -> tuple[pd.DataFrame, dict, dict]:
    """Inject known faults into a clean simulated log; return it, counts and rows by reason."""
    log = log.astype({"click": str, "propensity": str, "timestamp": str})
    faults = {
        "unknown_ad": ("ad_id", "ad_9999"),
        "bad_click": ("click", "7"),
        "bad_propensity": ("propensity", "-0.1"),
        "unknown_element": ("title", "nope"),
        "missing_value": ("image", ""),
    }
    rows = rng.choice(len(log), size=5 * 40, replace=False).reshape(5, 40)
    expected, where = {}, {}
    for (reason, (col, value)), idx in zip(faults.items(), rows):
        log.loc[idx, col] = value
        expected[reason] = len(idx)
        where[reason] = sorted(int(i) + 1 for i in idx)
    dup_src = np.setdiff1d(np.arange(len(log)), rows.ravel())[:10]
    log = pd.concat([log, log.iloc[dup_src]], ignore_index=True)
    expected["duplicate"] = 10
    where["duplicate"] = list(range(len(log) - 9, len(log) + 1))
    return log, expected, where


@pytest.mark.parametrize("chunk_rows", [997, 262_144])
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_quarantine_accounts_for_every_row(tmp_path, default_world, chunk_rows, fmt):
    log = pd.read_csv(default_world.impressions, dtype=str, keep_default_na=False).iloc[:5000]
    bad_log, expected, where = corrupt(log, np.random.default_rng(3))
    path = str(tmp_path / f"impressions.{fmt}")
    storage.write_table(bad_log, path)
    cat = load_catalog(default_world.catalog)
    cons = load_constraints(default_world.constraints, cat)
    out = str(tmp_path / "out")
    s = ingest(path, cat, cons, out, IngestConfig(chunk_rows=chunk_rows))
    assert s.rows_in == len(bad_log) == s.rows_valid + s.rows_quarantined
    assert s.quarantined_by_reason == expected
    q = pd.read_csv(s.quarantine_path, dtype=str, keep_default_na=False)
    assert len(q) == s.rows_quarantined
    for reason, rows in where.items():
        assert sorted(q.loc[q.reason_code == reason, "row"].astype(int)) == rows
    valid = pd.read_parquet(s.valid_path)
    assert len(valid) == s.rows_valid
    assert set(valid.columns) == {"ad_id", *cat.components, "click", "propensity", "timestamp"}
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["rows_in"] == s.rows_in


def test_too_many_bad_rows_fails_after_writing_the_quarantine(tmp_path, default_world):
    log = pd.read_csv(default_world.impressions, dtype=str, keep_default_na=False).iloc[:1000]
    log.loc[:99, "click"] = "x"
    path = str(tmp_path / "impressions.csv")
    log.to_csv(path, index=False)
    cat = load_catalog(default_world.catalog)
    cons = load_constraints(default_world.constraints, cat)
    with pytest.raises(TooManyBadRows) as err:
        ingest(path, cat, cons, str(tmp_path / "out"), IngestConfig(max_bad_fraction=0.05))
    assert "100 of 1000 rows (10.0%) failed validation, over max_bad_fraction 5.0%" in str(
        err.value
    )
    assert '"bad_click": 100' in str(err.value)
    assert len(pd.read_csv(tmp_path / "out" / "quarantine.csv")) == 100


def test_ingest_reads_and_writes_gcs(gcs, default_world):
    cat = load_catalog(default_world.catalog)
    cons = load_constraints(default_world.constraints, cat)
    src = gcs.url("impressions.csv")
    with open(default_world.impressions, "rb") as f:
        storage.write_bytes(src, f.read())
    out = gcs.url("ingest")
    s = ingest(src, cat, cons, out)
    assert s.rows_valid == s.rows_in > 0
    assert storage.exists(storage.join(out, "impressions.parquet"))
    assert storage.read_json(storage.join(out, "summary.json"))["rows_valid"] == s.rows_valid


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_bad_fraction": 1.5}, "max_bad_fraction must be in [0, 1], got 1.5"),
        ({"chunk_rows": 0}, "chunk_rows must be >= 1, got 0"),
    ],
)
def test_ingest_config_validates_itself(kwargs, message):
    with pytest.raises(ValueError) as err:
        IngestConfig(**kwargs)
    assert str(err.value) == message
