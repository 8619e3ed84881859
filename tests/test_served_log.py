"""The serving side of the log: what a response carries, the exact propensity of what is
shown, and the served log + clicks file joined back into training impressions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from genco.data.contract import load_catalog, load_constraints
from genco.data.served import join_served_log
from genco.errors import ContractError
from genco.inference.predictor import Predictor
from genco.serving import requests as rest
from tests.test_cli import genco
from tests.test_handler import tiny_bundle


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    return Predictor.load(tiny_bundle(tmp_path_factory))


AD0 = "ad_0000"


def test_beam_is_deterministic_with_propensity_one(predictor):
    a = predictor.serve(AD0, top_k=3)
    b = predictor.serve(AD0, top_k=3)
    assert a.deterministic and a.propensity == 1.0 and a.explore == 0.0
    assert a.elements == a.recommendations[0].elements == b.elements
    assert a.model_version == predictor.version
    assert a.impression_id != b.impression_id and len(a.impression_id) == 32
    assert predictor.serve(AD0, impression_id="imp-7").impression_id == "imp-7"


def test_sample_shows_a_draw_with_its_exact_propensity(predictor):
    for seed in range(20):
        s = predictor.serve(AD0, top_k=4, mode="sample", seed=seed, explore=0.2)
        shown = [r for r in s.recommendations if r.elements == s.elements]
        assert len(shown) == 1 and shown[0].propensity == s.propensity
        assert not s.deterministic and s.explore == 0.2
        # the exploration floor: every legal combination keeps explore / n_combinations
        assert s.propensity >= 0.2 / 125 - 1e-12


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_draw_frequencies_match_propensities(predictor, temperature):
    """n independent draws: each combination's share converges to its stated propensity
    (temperature 0: the greedy pick mixed with the exploration draw)."""
    ad = predictor.catalog.ad_code(AD0)
    rng = np.random.default_rng(0)
    codes, prop = predictor.draw(ad, None, 40_000, rng, explore=0.3, temperature=temperature)
    if temperature == 0:
        best = predictor.greedy(ad, None)
        assert np.all(prop[np.all(codes == best, axis=1)] > 0.7)
    keys, counts = np.unique(codes, axis=0, return_counts=True)
    first = {tuple(c): p for c, p in zip(codes, prop, strict=True)}
    for key, n in zip(keys, counts, strict=True):
        p = first[tuple(key)]
        assert abs(n / 40_000 - p) < 4 * np.sqrt(p * (1 - p) / 40_000) + 1e-4
    # the propensities of the distinct combinations drawn sum to at most 1 (to about 1 here)
    assert 0.95 < sum(first[tuple(k)] for k in keys) <= 1 + 1e-9


def test_rest_response_carries_the_log_fields(predictor):
    out = rest.answer(predictor, {"ad_id": AD0, "mode": "sample", "seed": 1, "top_k": 2})
    assert set(out) >= {"impression_id", "model_version", "shown", "recommendations"}
    assert out["shown"]["deterministic"] is False and 0 < out["shown"]["propensity"] <= 1
    beam = rest.answer(predictor, {"ad_id": AD0})
    assert beam["shown"] == {
        "elements": beam["recommendations"][0]["elements"],
        "propensity": 1.0,
        "deterministic": True,
        "explore": 0.0,
    }


def test_thompson_mode_answers_a_draw_with_its_propensity(predictor):
    """mode thompson over REST: a posterior draw, logged like a sample, with the exact
    propensity of the policy (its candidates' shares mixed with the exploration draw)."""
    out = rest.answer(predictor, {"ad_id": AD0, "mode": "thompson", "seed": 3, "explore": 0.2})
    shown = out["shown"]
    assert out["mode"] == "thompson" and shown["deterministic"] is False
    assert shown["explore"] == 0.2 and shown["propensity"] >= 0.2 / 125 - 1e-12
    ad = predictor.catalog.ad_code(AD0)
    cand, share = predictor.thompson(ad, None)
    codes = predictor.tables(ad)[0].masks.to_codes(cand)
    shares = {tuple(c): float(p) for c, p in zip(codes.tolist(), share, strict=True)}
    assert len(shares) > 1  # the elements' widths spread the policy
    best = predictor.decode(ad, None, top_k=1).codes[0]
    assert shares[tuple(best.tolist())] == max(shares.values())  # its mode wins most
    for seed in range(5):
        top = predictor.serve(AD0, top_k=1, mode="thompson", seed=seed, explore=0.0)
        key = tuple(
            predictor.catalog.element_code(k, top.elements[c])
            for k, c in enumerate(predictor.catalog.components)
        )
        assert top.propensity == pytest.approx(shares[key])


def _served_log(predictor: Predictor, n: int) -> pd.DataFrame:
    rows = []
    for i in range(n):
        ad = predictor.catalog.ads[i % 4]
        s = predictor.serve(ad, mode="sample", seed=i, top_k=1, impression_id=f"imp{i}")
        rows.append({**s.log_fields(), "timestamp": 1_767_225_600 + i})
    return pd.DataFrame(rows)


def test_join_keeps_every_rejected_row_with_its_reason(predictor, tmp_path):
    served = _served_log(predictor, 40)
    served.loc[5, "impression_id"] = "imp4"  # a duplicate served id
    served.loc[6, "impression_id"] = ""
    served.to_csv(tmp_path / "served.csv", index=False)
    clicks = pd.DataFrame(
        {
            "impression_id": ["imp1", "imp2", "imp2", "nope", "imp3", "imp9"],
            "click": ["1", "1", "1", "1", "2", "0"],
        }
    )
    clicks.to_csv(tmp_path / "clicks.csv", index=False)
    cat = load_catalog(str(tmp_path / "../serving_bundle/bundle/catalog.csv"))
    cons = load_constraints(str(tmp_path / "../serving_bundle/bundle/constraints.csv"), cat)
    out = join_served_log(
        str(tmp_path / "served.csv"), str(tmp_path / "clicks.csv"), cat, cons, str(tmp_path / "o")
    )
    j = out["join"]
    assert j["served_rows"] == 40 and j["joined_rows"] == 38 and j["clicked"] == 2
    assert j["rejected_by_reason"] == {
        "missing_impression_id": 1,
        "duplicate_impression": 1,
        "unknown_impression": 1,
        "duplicate_click": 1,
        "bad_click": 1,
    }
    assert j["by_model_version"] == {predictor.version: 38}
    rejected = pd.read_csv(tmp_path / "o" / "join_rejected.csv", keep_default_na=False)
    assert set(zip(rejected["file"], rejected["row"], rejected["reason_code"], strict=True)) == {
        ("served", 6, "duplicate_impression"),
        ("served", 7, "missing_impression_id"),
        ("clicks", 3, "duplicate_click"),
        ("clicks", 4, "unknown_impression"),
        ("clicks", 5, "bad_click"),
    }
    assert out["rows_valid"] == 38
    valid = pd.read_parquet(tmp_path / "o" / "impressions.parquet")
    ids = pd.read_parquet(tmp_path / "o" / "served_ids.parquet")
    clicked = set(ids["impression_id"][valid["click"].to_numpy() == 1])
    assert clicked == {"imp1", "imp2"}
    assert np.allclose(valid["propensity"], served.drop(index=[5, 6])["propensity"])


def test_served_log_with_a_foreign_column_fails_the_file(predictor, tmp_path):
    served = _served_log(predictor, 3).assign(note="x")
    served.to_csv(tmp_path / "s.csv", index=False)
    pd.DataFrame({"impression_id": ["imp0"], "click": [1]}).to_csv(tmp_path / "c.csv")
    cat = load_catalog(str(tmp_path / "../serving_bundle/bundle/catalog.csv"))
    with pytest.raises(ContractError, match="unknown column 'note'"):
        join_served_log(
            str(tmp_path / "s.csv"),
            str(tmp_path / "c.csv"),
            cat,
            load_constraints(None, cat),
            str(tmp_path / "o"),
        )


def test_cli_validate_accepts_the_served_log(predictor, tmp_path):
    _served_log(predictor, 10).to_csv(tmp_path / "s.csv", index=False)
    pd.DataFrame({"impression_id": ["imp2"], "click": [1]}).to_csv(tmp_path / "c.csv", index=False)
    bundle = tmp_path / "../serving_bundle/bundle"
    base = ["validate", "--catalog", str(bundle / "catalog.csv"), "--constraints",
            str(bundle / "constraints.csv"), "--out", str(tmp_path / "o"), "--quiet"]  # fmt: skip
    ok = genco(*base, "--served-log", str(tmp_path / "s.csv"), "--clicks", str(tmp_path / "c.csv"))
    assert ok.returncode == 0, ok.stderr
    assert '"clicked": 1' in ok.stdout and '"rows_valid": 10' in ok.stdout
    bad = genco(*base, "--served-log", str(tmp_path / "s.csv"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().endswith("--served-log needs --clicks (impression_id, click)")
