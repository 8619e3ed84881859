"""The closed loop end to end on a small world: uniform round, real pipeline, gate, serving
with exploration from the store's production bundle, peers on the same requests, and a
candidate the offline gate refused served as a canary, then promoted or rolled back. One
3-round run serves every test (round 2 is the canary's)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from genco.errors import ConfigError
from genco.inference.predictor import Predictor
from genco.pipeline.loop import LoopConfig, run_loop
from genco.store import current_version
from genco.worlds.traffic import load_traffic
from tests.test_cli import genco

CFG = LoopConfig(
    world="default",
    rounds=3,
    impressions_per_round=4000,
    rl_steps=10,
    reward_epochs=3,
    eval_rows=500,
    canary=0.2,
    warmup=0,  # round 0 all uniform (tests/test_loop_warmup.py: the warm-up)
    explore=0.1,  # 400 exploration rows a round on this small world (the default is 0.02)
)


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    out = tmp_path_factory.mktemp("loop")
    return out, run_loop(str(out), CFG)


def test_rounds_end_to_end(loop):
    out, summary = loop
    rounds = pd.read_csv(out / "rounds.csv")
    assert list(rounds["round"]) == [0, 1, 2]
    first, second = summary["rounds"][:2]
    # round 0: uniform logging; its log trains the first model, deployed unopposed
    assert first["model_version"] == "uniform" and first["explore"] == 1.0
    assert first["gate_passed"] and first["deployed"]
    assert first["gate_reason"] == "no production model: first deployment"
    # round 1 is served by exactly that production bundle, with its exploration
    assert (
        second["model_version"]
        == sorted(p.name for p in (out / "model_store" / "versions").iterdir())[0]
    )
    assert second["explore"] == 0.1 and second["floor_holds"] and first["floor_holds"]
    for r in (first, second):
        assert 0 < r["served_true_ctr"] <= r["oracle_true_ctr"]
        assert r["rows_valid"] == 4000
    assert second["greedy_true_ctr"] <= second["oracle_true_ctr"] + 1e-12
    # the trained policy beats uniform on the same requests
    assert second["served_true_ctr"] > second["uniform_true_ctr"]
    for arm in ("genco", "element_ts", "element_ts_online", "vw_squarecb", "uniform", "combo_ts"):
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


def test_a_refused_candidate_is_served_as_a_canary_then_promoted_or_rolled_back(loop):
    (out, summary), cfg = loop, CFG
    first, second, third = summary["rounds"]
    assert first["deployed"] and not second["deployed"]  # round 1's candidate: refused offline
    production = second["model_version"]
    canary = third["canary_version"]
    assert canary not in (production, "uniform") and third["model_version"] == production
    # round 2: a random ~20% of requests served by the canary, each row with its arm's version
    served = pd.read_parquet(out / "round_02" / "served.parquet")
    assert set(served["model_version"]) == {production, canary}
    # a clearly worse canary stops mid-round, a clearly better one is promoted there
    stop, early = third["canary_stopped_at"], third["canary_promoted_at"]
    assert stop is None or early is None
    ab = served.iloc[: early or len(served)]
    share = (ab["model_version"] == canary).mean()
    assert share == pytest.approx(third["canary_share"])
    assert 0.15 < share < 0.25 if stop is None else 0 < share < 0.25
    if stop is not None:
        assert set(served["model_version"].iloc[stop:]) == {production}
    if early is not None:
        assert third["canary_promoted"] and set(served["model_version"].iloc[early:]) == {canary}
    # each row's propensity is its own arm's: (1 - explore) 1[its greedy] + explore q(shown)
    bundles = {
        p.version: p
        for p in map(Predictor.load, map(str, (out / "pipeline_root").glob("*/*/bundle")))
    }
    cat = load_traffic("default", 0).catalog
    for version in (production, canary):
        pred, rows = bundles[version], served[served["model_version"] == version]
        for _, r in rows.head(200).iterrows():
            ad = cat.ad_code(r["ad_id"])
            shown = np.array([cat.element_code(k, r[c]) for k, c in enumerate(cat.components)])
            policy, _ = pred.tables(ad)
            slots = [
                int(np.flatnonzero(policy.masks.codes[k] == c)[0]) for k, c in enumerate(shown)
            ]
            q = np.exp(policy.log_uniform(np.array([slots])))[0]
            greedy = np.array_equal(shown, pred.greedy(ad, None))
            assert r["propensity"] == pytest.approx((1 - cfg.explore) * greedy + cfg.explore * q)
    # the online gate decided on the two arms' own clicks, counted where their greedy picks
    # differ (the triggered A/B), and the store follows it
    assert third["canary_reason"].startswith("online A/B: ")
    ads = np.array([cat.ad_code(a) for a in served["ad_id"]])
    differ = np.array(
        [not np.array_equal(bundles[production].greedy(a, None), bundles[canary].greedy(a, None))
         for a in ads]
    )  # fmt: skip
    assert third["canary_triggered_share"] == pytest.approx(differ.mean())
    words = "serve differently" if differ.any() else "serve alike on all but 0 canary"
    assert words in third["canary_reason"]
    now = current_version(str(out / "model_store"))
    assert now == (canary if third["canary_promoted"] else production)
    assert summary["final"]["canaries"] == 1
    assert summary["final"]["canary_promotions"] == int(third["canary_promoted"])
