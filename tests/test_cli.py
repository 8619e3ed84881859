"""The command line as a user runs it: a real subprocess, exit codes, stderr, no tracebacks."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys

import pytest
import torch

from genco.cli import main
from genco.models.checkpoint import FORMAT

VERBS = [
    "simulate",
    "validate",
    "attribute",
    "train",
    "recommend",
    "demo",
    "pipeline",
    "evaluate",
    "deploy",
    "rollback",
    "versions",
    "serve",
    "archive",
    "loop",
]


def genco(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "genco.cli", *args], capture_output=True, text=True, cwd=cwd
    )


@pytest.mark.parametrize("verb", [None, *VERBS])
def test_help_on_every_verb(verb):
    r = genco(*([verb] if verb else []), "--help")
    assert r.returncode == 0
    assert "usage: genco" in r.stdout
    if verb is None:
        for v in VERBS:
            assert v in r.stdout


def test_simulate_then_validate(tmp_path):
    r = genco(
        "simulate",
        "--world",
        "contextual",
        "--seed",
        "1",
        "--n-impressions",
        "3000",
        "--out",
        str(tmp_path / "w"),
    )
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert stats["n_impressions"] == 3000 and stats["context_columns"] == ["ctx_0", "ctx_1"]
    r = genco(
        "validate",
        "--catalog",
        str(tmp_path / "w" / "catalog.csv"),
        "--impressions",
        str(tmp_path / "w" / "impressions.csv"),
        "--out",
        str(tmp_path / "v"),
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rows_valid"] == 3000


def test_user_errors_are_one_line_on_stderr(tmp_path):
    missing = str(tmp_path / "catalog.csv")
    r = genco("validate", "--catalog", missing, "--impressions", "x.csv", "--out", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr == f"genco validate: error: {missing}: file not found\n"
    r = genco("simulate", "--world", "default", "--n-impressions", "0", "--out", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr == "genco simulate: error: n_impressions must be >= 1, got 0\n"
    r = genco("simulate", "--world", "nope", "--out", str(tmp_path))
    assert r.returncode == 2 and "invalid choice: 'nope'" in r.stderr
    assert "Traceback" not in r.stderr


def test_failed_validation_exits_non_zero_with_the_counts(tmp_path):
    genco("simulate", "--n-impressions", "200", "--out", str(tmp_path / "w"))
    log = (tmp_path / "w" / "impressions.csv").read_text().splitlines()
    bad = [log[0]] + [line.replace(",0,", ",maybe,", 1) for line in log[1:]]
    (tmp_path / "bad.csv").write_text("\n".join(bad) + "\n")
    r = genco(
        "validate",
        "--catalog",
        str(tmp_path / "w" / "catalog.csv"),
        "--constraints",
        str(tmp_path / "w" / "constraints.csv"),
        "--impressions",
        str(tmp_path / "bad.csv"),
        "--out",
        str(tmp_path / "v"),
        "--quiet",
    )
    assert r.returncode == 2
    assert "failed validation, over max_bad_fraction 5.0%" in r.stderr
    assert (tmp_path / "v" / "quarantine.csv").exists()


def test_bad_config_flag_is_one_line(tmp_path, capsys):
    argv = ["train", "--catalog", "c.csv", "--impressions", "i.csv", "--out", str(tmp_path)]
    assert main([*argv, "--epochs", "0"]) == 2
    assert capsys.readouterr().err == "genco train: error: epochs must be > 0, got 0\n"


def test_a_bug_is_not_reported_as_a_user_error(tmp_path):
    """Only GencoError and FileNotFoundError are user mistakes: a KeyError from a metadata
    file that lacks a key keeps its traceback instead of passing as a one-line message."""
    buf = io.BytesIO()
    torch.save({}, buf)
    data = buf.getvalue()
    (tmp_path / "reward_model.pt").write_bytes(data)
    meta = {"format": FORMAT, "sha256": hashlib.sha256(data).hexdigest()}
    meta_files = ("reward_model.pt", "reward_model.json")
    (tmp_path / "reward_model.json").write_text(json.dumps(meta))
    files = {n: hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in meta_files}
    (tmp_path / "manifest.json").write_text(json.dumps({"files": files}))  # passes verification
    with pytest.raises(KeyError, match="vocab"):
        main(["recommend", "--model", str(tmp_path), "--out", str(tmp_path / "r.csv")])
