"""The AES world must be the published table, exactly, in contract form.

Figures are recomputed from the CSV with plain pandas so the tests do not trust the loader.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from genco.data.contract import load_catalog, load_constraints
from genco.data.ingest import ingest
from genco.data.space import legal_combinations
from genco.worlds.aes import (
    AES_AD,
    COMPONENTS,
    DEFAULT_AES_PATH,
    ENV_AES_CSV,
    AesWorld,
    default_aes_path,
    load_aes_world,
    load_truth,
    log_uniform,
    write_aes_world,
)
from genco.worlds.simulate import log_impressions, make_world, world_config

if not os.path.exists(DEFAULT_AES_PATH):
    pytest.skip(
        f"AES table not found at {DEFAULT_AES_PATH} (shared data not checked out next to the "
        f"repo; set {ENV_AES_CSV} to its path)",
        allow_module_level=True,
    )

N_LEGAL = 200


@pytest.fixture(scope="module")
def raw() -> pd.DataFrame:
    df = pd.read_csv(DEFAULT_AES_PATH, dtype=str)
    df = df.apply(lambda s: s.str.strip())
    df["ctr"] = df["ctr"].astype(float)
    return df


@pytest.fixture(scope="module")
def world() -> AesWorld:
    return load_aes_world()


def _codes(world: AesWorld, rows: pd.DataFrame) -> np.ndarray:
    cat = world.catalog
    return np.array(
        [
            [cat.element_code(k, r[c]) for k, c in enumerate(cat.components)]
            for _, r in rows.iterrows()
        ],
        dtype=np.int64,
    )


def test_default_path_is_outside_the_repo_and_overridable(monkeypatch):
    repo = Path(__file__).resolve().parents[1]
    assert Path(default_aes_path()) == repo.parent / "shared" / "data" / "aes_online_ctr.csv"
    monkeypatch.setenv(ENV_AES_CSV, "/elsewhere/aes.csv")
    assert default_aes_path() == "/elsewhere/aes.csv"


def test_exactly_the_table_combinations_are_legal(world, raw):
    assert world.catalog.ads == (AES_AD,)
    assert world.catalog.components == COMPONENTS
    assert world.catalog.feature_names == ()
    assert world.n_legal == N_LEGAL == len(raw)
    legal = legal_combinations(world.catalog, world.constraints, 0)
    assert len(legal) == N_LEGAL
    as_set = {tuple(r) for r in legal.tolist()}
    assert as_set == {tuple(r) for r in _codes(world, raw).tolist()}
    assert as_set == {tuple(r) for r in world.truth.legal_combinations(0).tolist()}


def test_constraints_forbid_exactly_the_unseen_background_text_color_pairs(world, raw):
    seen = set(zip(raw["background"], raw["text_color"]))
    unseen = {
        (b, t)
        for b in raw["background"].unique()
        for t in raw["text_color"].unique()
        if (b, t) not in seen
    }
    got = world.constraints.to_frame(world.catalog)
    assert set(got["ad_id"]) == {"*"}
    assert set(zip(got["component_a"], got["component_b"])) == {("background", "text_color")}
    assert set(zip(got["element_a"], got["element_b"])) == unseen
    assert len(got) == len(unseen) == 8


def test_truth_returns_the_table_ctr_for_every_row(world, raw):
    combos = _codes(world, raw)
    ads = np.zeros(len(raw), dtype=np.int64)
    np.testing.assert_allclose(world.truth.ctr(ads, combos), raw["ctr"].to_numpy(), rtol=0, atol=0)
    p = raw["ctr"].to_numpy()
    np.testing.assert_allclose(world.truth.logit(ads, combos), np.log(p / (1 - p)))
    assert world.truth.n_context == 0


def test_illegal_combination_raises_naming_it(world):
    cat = world.catalog
    ids = {"background": "0", "picture_size": "2", "text_color": "5", "text_font": "1"}
    combo = np.array([[cat.element_code(k, ids[c]) for k, c in enumerate(cat.components)]])
    expected = "background=0, picture_size=2, text_color=5, text_font=1"
    with pytest.raises(ValueError, match=re.escape(expected)):
        world.truth.ctr(np.zeros(1, dtype=np.int64), combo)
    with pytest.raises(ValueError, match="ad code 1"):
        world.truth.ctr(np.ones(1, dtype=np.int64), world.truth.legal_combinations()[:1])


def test_best_is_the_table_maximum(world, raw):
    combo, ctr = world.truth.best(0)
    top = raw.loc[raw["ctr"].idxmax()]
    assert ctr == pytest.approx(0.0271, abs=1e-4)
    assert ctr == top["ctr"]
    assert world.truth.ids(combo) == [top[c] for c in COMPONENTS]


def test_uniform_log_is_legal_with_exact_propensity_and_table_click_rate(world, raw):
    log = log_uniform(world, 200_000, seed=0)
    sim = make_world(world_config("default"), 0)
    sim_log = log_impressions(sim, 10, seed=0)
    assert list(log.columns) == ["ad_id", *COMPONENTS, "click", "propensity", "timestamp"]
    assert list(log.dtypes.iloc[-3:]) == list(sim_log.dtypes.iloc[-3:])
    assert (log["propensity"] == 1 / N_LEGAL).all()
    assert (log["ad_id"] == AES_AD).all()
    assert log["timestamp"].is_monotonic_increasing
    legal = set(map(tuple, raw[list(COMPONENTS)].to_numpy().tolist()))
    shown = set(map(tuple, log[list(COMPONENTS)].drop_duplicates().to_numpy().tolist()))
    assert shown <= legal
    assert log["click"].mean() == pytest.approx(raw["ctr"].mean(), abs=0.001)
    assert raw["ctr"].mean() == pytest.approx(0.0186, abs=1e-4)


def test_written_world_loads_and_ingests_cleanly(tmp_path, world):
    files = write_aes_world(str(tmp_path / "aes"), n_impressions=5000, impressions_format="csv")
    catalog = load_catalog(files["catalog"])
    constraints = load_constraints(files["constraints"], catalog)
    assert catalog.components == COMPONENTS
    assert len(constraints) == len(world.constraints)
    assert len(legal_combinations(catalog, constraints, 0)) == N_LEGAL
    summary = ingest(files["impressions"], catalog, constraints, str(tmp_path / "ingested"))
    assert summary.rows_in == 5000
    assert summary.rows_quarantined == 0
    assert pd.read_csv(files["contexts"], dtype=str)["ad_id"].tolist() == [AES_AD]
    truth = load_truth(files["truth"], catalog)
    legal = truth.legal_combinations()
    np.testing.assert_array_equal(
        truth.ctr(np.zeros(len(legal), np.int64), legal),
        world.truth.ctr(np.zeros(len(legal), np.int64), legal),
    )
    stats = json.loads(Path(files["world"]).read_text())
    assert stats["n_legal"] == N_LEGAL
    assert stats["forbidden_pairs"] == 8


def test_table_with_two_templates_is_refused(tmp_path, raw):
    df = raw.copy()
    df.loc[0, "template"] = "1"
    path = tmp_path / "two_templates.csv"
    df.to_csv(path, index=False)
    with pytest.raises(ValueError, match="template"):
        load_aes_world(str(path))


def test_table_with_an_unexplained_hole_is_refused(tmp_path, raw):
    # Dropping one row leaves every pair still seen, so no pair rule can forbid it.
    path = tmp_path / "hole.csv"
    raw.drop(index=5).to_csv(path, index=False)
    with pytest.raises(ValueError, match="allow 200 combinations but the table has 199"):
        load_aes_world(str(path))
