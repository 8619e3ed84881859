"""The closed loop end to end on a small world: uniform round, real pipeline, gate, serving
with exploration from the store's production bundle, peers on the same requests."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from genco.errors import ConfigError
from genco.pipeline.loop import LoopConfig, run_loop
from genco.store import current_version
from genco.worlds.traffic import load_traffic
from tests.test_cli import genco


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    out = tmp_path_factory.mktemp("loop")
    cfg = LoopConfig(
        world="default",
        rounds=2,
        impressions_per_round=4000,
        rl_steps=10,
        reward_epochs=3,
        eval_rows=500,
    )
    return out, run_loop(str(out), cfg)


def test_two_rounds_end_to_end(loop):
    out, summary = loop
    rounds = pd.read_csv(out / "rounds.csv")
    assert list(rounds["round"]) == [0, 1]
    first, second = summary["rounds"]
    # round 0: uniform logging; its log trains the first model, deployed unopposed
    assert first["model_version"] == "uniform" and first["explore"] == 1.0
    assert first["gate_passed"] and first["deployed"]
    assert first["gate_reason"] == "no production model: first deployment"
    # round 1 is served by exactly that production bundle, with its exploration
    assert second["model_version"] == current_version(str(out / "model_store"))
    assert second["explore"] == 0.1 and second["floor_holds"] and first["floor_holds"]
    for r in (first, second):
        assert 0 < r["served_true_ctr"] <= r["oracle_true_ctr"]
        assert r["rows_valid"] == 4000
    assert second["greedy_true_ctr"] <= second["oracle_true_ctr"] + 1e-12
    # the trained policy beats uniform on the same requests
    assert second["served_true_ctr"] > second["uniform_true_ctr"]
    for arm in ("genco", "element_ts", "element_ts_online", "vw_squarecb", "uniform"):
        assert 0 < first[f"{arm}_cum_regret"] < second[f"{arm}_cum_regret"]
    assert summary["final"]["floor_held_every_round"] is True
    assert (out / "loop.png").stat().st_size > 10_000
    assert json.loads((out / "rounds.json").read_text())["final"] == summary["final"]


def test_served_log_of_round_one_is_productions_with_exact_propensities(loop):
    out, summary = loop
    served = pd.read_parquet(out / "round_01" / "served.parquet")
    assert set(served["model_version"]) == {summary["rounds"][1]["model_version"]}
    assert served["impression_id"].is_unique and (served["mode"] == "sample").all()
    p = served["propensity"].to_numpy()
    assert np.all((p >= 0.1 / 125 - 1e-12) & (p <= 1.0))
    clicks = pd.read_parquet(out / "round_01" / "clicks.parquet")
    assert set(clicks["impression_id"]) <= set(served["impression_id"])
    # the next training log holds both rounds, each row with its own policy's propensity
    log = pd.read_parquet(out / "round_00" / "train_log.parquet")
    t = load_traffic("default", 0)
    n_legal = np.array([len(t.legal[t.catalog.ad_code(a)]) for a in log["ad_id"]])
    assert len(log) == 4000 and np.array_equal(log["propensity"], 1.0 / n_legal)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="explore must be in"):
        LoopConfig(explore=0.0)
    with pytest.raises(ConfigError, match="unknown peer 'bandit'"):
        LoopConfig(peers="uniform,bandit")


def test_cli_unknown_world_is_one_line(tmp_path):
    r = genco("loop", "--world", "nope", "--rounds", "1", "--out", str(tmp_path / "l"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("choose one of: " + ", ".join(
        [*__import__("genco.worlds.config", fromlist=["WORLDS"]).WORLDS, "aes"]))  # fmt: skip
