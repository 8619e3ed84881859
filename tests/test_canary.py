"""The store's canary: start a refused candidate beside production, decide it on the online
A/B (promote or roll back), its KServe manifest, and the ``genco canary`` verbs end to end."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import yaml

from genco.cli.main import main
from genco.data import storage
from genco.errors import ConfigError, ContractError, StoreError
from genco.evaluation import canary
from genco.evaluation.online import canary_gate
from genco.inference.predictor import Predictor
from genco.serving.archive import KSERVE_CANARY_DIR
from genco.serving.config import mar_name
from genco.serving.manifest import inference_service
from genco.store import bundle_digest, current_version, promote, version_dir
from tests.test_deploy import bundles  # noqa: F401  (the module-scoped fixture)


def _refused(bundle: str, store: str) -> dict:
    """A refused offline gate record for ``bundle`` against the store's production, in the
    shape genco evaluate writes it."""
    return {
        "passed": False,
        "reason": "not enough evidence: effective sample size 12 < 30",
        "rule": "bernstein",
        "candidate_digest": bundle_digest(bundle),
        "production_version": current_version(store),
    }


def _arms(canary_v: str, prod_v: str, n_canary: int, ctr_canary: float, ctr_prod: float):
    rng = np.random.default_rng(0)
    versions = np.array([canary_v] * n_canary + [prod_v] * (4 * n_canary))
    clicks = np.concatenate(
        [rng.random(n_canary) < ctr_canary, rng.random(4 * n_canary) < ctr_prod]
    ).astype(int)
    return versions, clicks


@pytest.fixture
def running(bundles, tmp_path):  # noqa: F811
    a, b = bundles
    store = str(tmp_path / "store")
    prod = promote(a, store).version
    started = canary.start(b, store, 0.2, _refused(b, store))
    assert started.action == "started" and started.production_version == prod
    return store, prod, started.version, b


def test_start_adds_the_version_and_leaves_production(running, bundles):  # noqa: F811
    store, prod, version, b = running
    assert current_version(store) == prod  # production did not move
    record = canary.read_canary(store)
    assert record["version"] == version and record["share"] == 0.2
    assert record["production_version"] == prod
    assert storage.exists(os.path.join(store, "versions", version, "manifest.json"))
    # the same candidate again: already running; another one: refused, not queued
    assert canary.start(b, store, 0.2, _refused(b, store)).action == "running"
    a = bundles[0]
    with pytest.raises(StoreError, match="gate: the gate was computed for another bundle"):
        canary.start(a, store, 0.2, _refused(b, store))


def test_a_clearly_better_canary_is_promoted(running):
    store, prod, version, _ = running
    versions, clicks = _arms(version, prod, 5000, 0.10, 0.05)
    result = canary.decide(store, versions, clicks)
    assert result.action == "promoted", result.reason
    assert current_version(store) == version
    assert canary.read_canary(store) is None
    closed = storage.read_json(os.path.join(store, "canaries", f"{version}.json"))
    assert closed["decision"] == "promoted" and closed["online_gate"]["passed"] is True


def test_a_worse_canary_is_rolled_back_and_a_young_one_keeps_running(running):
    store, prod, version, _ = running
    young = canary.decide(store, *_arms(version, prod, 300, 0.02, 0.05))
    assert young.action == "continue" and canary.read_canary(store) is not None
    result = canary.decide(store, *_arms(version, prod, 5000, 0.045, 0.05))
    assert result.action == "rolled_back" and "roll back" in result.reason
    assert current_version(store) == prod and canary.read_canary(store) is None
    with pytest.raises(StoreError, match="no canary is running"):
        canary.decide(store, *_arms(version, prod, 5000, 0.1, 0.05))


def test_rows_from_before_the_canary_started_are_not_counted(running):
    store, prod, version, _ = running
    started = canary._epoch(canary.read_canary(store)["started_at"])
    versions, clicks = _arms(version, prod, 5000, 0.10, 0.05)  # canary clearly better
    # yesterday production served 40,000 impressions at a 30% CTR (another day's traffic)
    old_v = np.array([prod] * 40_000)
    old_c = (np.random.default_rng(1).random(40_000) < 0.30).astype(int)
    all_v, all_c = np.concatenate([old_v, versions]), np.concatenate([old_c, clicks])
    when = np.concatenate([np.full(40_000, started - 86_400.0), np.full(len(versions), started)])
    # counted, the old rows would make production look far better than the canary ...
    blind = canary_gate(all_v, all_c, version, prod, "0" * 64)
    assert blind["passed"] is False and blind["online"]["value"] < 0
    # ... within the canary's own hours the two arms compare as served: promoted
    result = canary.decide(store, all_v, all_c, timestamp=when)
    assert result.action == "promoted", result.reason
    assert result.gate["online"]["production_n"] == 20_000


def test_start_refuses_a_passed_or_stale_gate_and_a_bad_share(bundles, tmp_path):  # noqa: F811
    a, b = bundles
    store = str(tmp_path / "store")
    with pytest.raises(StoreError, match="no production model"):
        canary.start(b, store, 0.2, {"passed": False})
    promote(a, store)
    with pytest.raises(StoreError, match="the offline gate passed"):
        canary.start(b, store, 0.2, {**_refused(b, store), "passed": True})
    with pytest.raises(StoreError, match="production changed since the evaluation"):
        canary.start(b, store, 0.2, {**_refused(b, store), "production_version": "v0"})
    with pytest.raises(ConfigError, match="canary share must be in"):
        canary.start(b, store, 1.0, _refused(b, store))
    assert canary.read_canary(store) is None


def test_manifest_splits_traffic_only_while_a_canary_runs():
    prod = inference_service("gs://bkt/genco/store")
    model = prod["spec"]["predictor"]["model"]
    assert model["storageUri"] == "gs://bkt/genco/store/kserve"
    assert "canaryTrafficPercent" not in prod["spec"]["predictor"]
    split = inference_service("gs://bkt/genco/store", 0.2)
    assert split["spec"]["predictor"]["canaryTrafficPercent"] == 20
    assert split["spec"]["predictor"]["model"]["storageUri"] == "gs://bkt/genco/store/" + (
        KSERVE_CANARY_DIR
    )
    assert inference_service("gs://b/s", 0.001)["spec"]["predictor"]["canaryTrafficPercent"] == 1
    with pytest.raises(ConfigError, match="canary share"):
        inference_service("gs://b/s", 0.0)


def _joined_log(tmp_path, canary_arm, prod_arm, seed, mode="sample", thompson_row=None):
    """A served log of both arms (bundle, version, impressions, CTR each) and its clicks,
    joined by ``genco validate`` against the production bundle's catalog: (its directory,
    the served rows). ``thompson_row``: that served row is logged with mode thompson."""
    rng = np.random.default_rng(seed)
    (b, cv, nc, cc), (a, pv, npr, cp) = canary_arm, prod_arm
    c_rows, c_clicks = _served(b, cv, nc, 0, cc, rng, mode=mode)
    p_rows, p_clicks = _served(a, pv, npr, nc, cp, rng, mode=mode)
    served = pd.DataFrame(c_rows + p_rows)
    if thompson_row is not None:
        served.loc[thompson_row, "mode"] = "thompson"
    served.to_csv(tmp_path / "served.csv", index=False)
    pd.DataFrame(c_clicks + p_clicks).to_csv(tmp_path / "clicks.csv", index=False)
    joined = str(tmp_path / "joined")
    argv = ["validate", "--served-log", str(tmp_path / "served.csv")]
    argv += ["--clicks", str(tmp_path / "clicks.csv"), "--catalog", os.path.join(a, "catalog.csv")]
    assert main([*argv, "--out", joined]) == 0
    return joined, c_rows + p_rows


def _served(
    bundle: str, version_arm: str, n: int, start: int, ctr: float, rng, mode: str = "sample"
) -> tuple:
    pred = Predictor.load(bundle)
    rows, clicks = [], []
    for i in range(start, start + n):
        ad = pred.catalog.ads[i % len(pred.catalog.ads)]
        s = pred.serve(ad, mode=mode, seed=i, top_k=1, impression_id=f"imp{i}")
        rows.append({**s.log_fields(), "model_version": version_arm})
        if rng.random() < ctr:
            clicks.append({"impression_id": f"imp{i}", "click": 1})
    return rows, clicks


def test_cli_canary_lifecycle_with_a_joined_served_log(bundles, tmp_path, capsys):  # noqa: F811
    a, b = bundles
    store = str(tmp_path / "store")
    assert main(["deploy", "--model", a, "--store", store, "--serving"]) == 0
    prod = current_version(store)
    gate = tmp_path / "gate.json"
    storage.write_json(str(gate), _refused(b, store))
    capsys.readouterr()
    assert main(["canary", "decide", "--store", store, "--data", str(tmp_path)]) == 2
    assert "no canary is running" in capsys.readouterr().err
    assert main(["canary", "start", "--model", b, "--store", store, "--gate-file", str(gate)]) == 0
    version = canary.read_canary(store)["version"]
    # the store publishes for serving, so the canary got its own layout
    config = storage.read_text(os.path.join(store, KSERVE_CANARY_DIR, "config/config.properties"))
    assert mar_name(version) in config
    capsys.readouterr()
    assert main(["canary", "manifest", "--store", store, "--storage-uri", "gs://b/s"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert doc["spec"]["predictor"]["canaryTrafficPercent"] == 20

    joined, _ = _joined_log(tmp_path, (b, version, 1200, 0.25), (a, prod, 2400, 0.05), 1)
    capsys.readouterr()
    assert main(["canary", "decide", "--store", store, "--data", joined]) == 0
    out = yaml.safe_load(capsys.readouterr().out)  # JSON is YAML
    assert out["action"] == "promoted", out["reason"]
    assert current_version(store) == version
    # production's layout follows the promotion; the manifest serves one revision again
    config = storage.read_text(os.path.join(store, "kserve", "config/config.properties"))
    assert mar_name(version) in config
    assert main(["canary", "manifest", "--store", store]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert "canaryTrafficPercent" not in doc["spec"]["predictor"]


def test_triggered_decide_counts_the_requests_where_the_greedy_picks_differ(running, tmp_path):
    store, prod, version, b = running
    a = version_dir(store, prod)
    arms = (b, version, 600, 0.25), (a, prod, 2400, 0.05)
    joined, rows = _joined_log(tmp_path, *arms, 2, mode="beam")
    trig = canary.triggered_rows(store, version, joined)
    pa_, pb = Predictor.load(a), Predictor.load(b)
    ads = [pa_.catalog.ad_code(r["ad_id"]) for r in rows]
    expect = [not np.array_equal(pa_.greedy(x, None), pb.greedy(x, None)) for x in ads]
    assert trig.tolist() == expect and 0 < trig.sum() < len(trig)  # both kinds of request
    with pytest.raises(ConfigError, match="canary_ab must be 'all' or 'triggered', got 'some'"):
        canary.run_decide(store, joined, canary_ab="some")
    result = canary.run_decide(store, joined, min_impressions=500, canary_ab="triggered")
    assert "where the two serve differently" in result.reason
    assert result.gate["online"]["triggered_share"] == pytest.approx(trig.mean())
    assert result.gate["rule"] == "online_ab_triggered"
    assert result.gate["online"]["canary_triggered_n"] == trig[:600].sum()
    # posterior draws differ on every request: a thompson log is refused, naming its row
    joined, _ = _joined_log(tmp_path, *arms, 2, mode="beam", thompson_row=4)
    with pytest.raises(ContractError, match="served-log row 5 has mode 'thompson'"):
        canary.triggered_rows(store, version, joined)
