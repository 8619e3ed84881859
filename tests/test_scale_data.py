"""Issue 15, data half: the catalog world as a partitioned dataset, streaming ingest from it,
the public batch reader, per-ad constraint checks and ragged forbidden pairs."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from genco.data import dataset
from genco.data.contract import Catalog, Constraints, load_catalog, load_constraints
from genco.data.ingest import ingest
from genco.errors import ConfigError, ContractError
from genco.models.legal import LegalMasks
from genco.worlds.catalog import CatalogWorld, CatalogWorldConfig, simulate_catalog

SMALL = CatalogWorldConfig(
    n_ads=300,
    n_components=4,
    min_candidates=3,
    max_candidates=6,
    forbid_share=0.5,
    days=3,
    ad_block=100,
    write_rows=4_000,
)
N = 12_000


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("catalog_world")
    return simulate_catalog(SMALL, seed=3, out_dir=str(out), n_impressions=N)


@pytest.fixture(scope="module")
def loaded(world):
    catalog = load_catalog(world.catalog)
    return catalog, load_constraints(world.constraints, catalog)


def test_catalog_world_is_a_hive_partitioned_log_by_date(world, loaded):
    catalog, constraints = loaded
    days = sorted(os.listdir(world.impressions))
    assert days == ["date=2026-01-01", "date=2026-01-02", "date=2026-01-03"]
    parts = dataset.parts(world.impressions)
    assert {p.partition["date"] for p in parts} == {"2026-01-01", "2026-01-02", "2026-01-03"}
    assert dataset.count_rows(world.impressions) == N
    # Each ad has its own elements, min..max candidates per component.
    assert catalog.n_ads == SMALL.n_ads
    sizes = np.array([[len(c) for c in cands] for cands in catalog.candidates])
    assert sizes.min() == SMALL.min_candidates and sizes.max() == SMALL.max_candidates
    assert all(len(v) == sizes[:, k].sum() for k, v in enumerate(catalog.elements))
    # About forbid_share of the ads have one forbidden pair of their own elements.
    assert 0.4 < len(constraints) / SMALL.n_ads < 0.6
    assert (constraints.ad >= 0).all()


def test_catalog_world_log_follows_its_policy(world, loaded):
    catalog, constraints = loaded
    log = pq.read_table(world.impressions, partitioning="hive").to_pandas()
    ads = np.array([catalog.ad_code(a) for a in log["ad_id"]])
    combos = np.stack(
        [
            np.array([catalog.element_code(k, e) for e in log[c]])
            for k, c in enumerate(catalog.components)
        ],
        1,
    )
    assert (constraints.violations(ads, combos) < 0).all()  # never a forbidden pair
    # Propensity = 1 / legal combinations of the ad, counted here by brute force.
    for ad in np.unique(ads)[:20]:
        from genco.data.space import count_legal

        want = 1.0 / count_legal(catalog, constraints, int(ad))
        np.testing.assert_allclose(log["propensity"][ads == ad], want, rtol=1e-12)
    # The date partition is the timestamp's day.
    day = pd.to_datetime(log["timestamp"], unit="s").dt.strftime("%Y-%m-%d")
    assert (day == log["date"].astype(str)).all()
    assert 0.01 < log["click"].mean() < 0.1


def test_catalog_world_is_deterministic_and_regenerates_any_block():
    a, b = CatalogWorld(SMALL, 5), CatalogWorld(SMALL, 5)
    blk_a, blk_b = a.block(2), b.block(2)
    np.testing.assert_array_equal(blk_a.sizes, blk_b.sizes)
    np.testing.assert_array_equal(blk_a.main[1], blk_b.main[1])
    assert not np.array_equal(a.block(1).sizes, blk_a.sizes)


def test_catalog_world_refuses_bad_settings(tmp_path):
    with pytest.raises(ConfigError, match="min_candidates"):
        CatalogWorldConfig(min_candidates=20, max_candidates=10)
    with pytest.raises(ConfigError, match="n_components"):
        CatalogWorldConfig(n_components=9)
    simulate_catalog(SMALL, 0, str(tmp_path), n_impressions=10)
    with pytest.raises(ConfigError, match="exists"):
        simulate_catalog(SMALL, 0, str(tmp_path), n_impressions=10)


def test_iter_batches_streams_every_row_in_bounded_batches(world):
    seen = 0
    for batch in dataset.iter_batches(world.impressions, ["ad_id", "click"], batch_rows=700):
        assert batch.num_rows <= 700
        assert batch.schema.names == ["ad_id", "click"]  # no partition column
        seen += batch.num_rows
    assert seen == N
    first = next(dataset.iter_batches(world.impressions))
    assert "date" not in first.schema.names and "propensity" in first.schema.names
    with pytest.raises(ContractError, match="missing column 'nope'"):
        next(dataset.iter_batches(world.impressions, ["nope"]))


def test_ingest_streams_a_partitioned_dataset(world, loaded, tmp_path):
    catalog, constraints = loaded
    summary = ingest(world.impressions, catalog, constraints, str(tmp_path / "v"))
    assert summary.rows_in == summary.rows_valid == N
    # The reader streams one Parquet file too: the validated output, for training.
    assert sum(b.num_rows for b in dataset.iter_batches(summary.valid_path, ["click"])) == N
    with pytest.raises(ContractError, match="dataset not found"):
        next(dataset.iter_batches(str(tmp_path / "nothing")))
    valid = pq.ParquetFile(summary.valid_path)
    assert valid.metadata.num_rows == N
    assert valid.metadata.num_row_groups > 1  # written chunk by chunk


def _copy_dataset(world, tmp_path, edit) -> str:
    """The world's log copied with edit(date, frame) applied to the first file of each day."""
    root = tmp_path / "log"
    for part in dataset.parts(world.impressions):
        rel = os.path.relpath(part.path, world.impressions)
        os.makedirs(root / os.path.dirname(rel), exist_ok=True)
        frame = pq.read_table(part.path).to_pandas()
        if rel.endswith("part-0000-0000-0.parquet"):
            frame = edit(part.partition["date"], frame)
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), root / rel)
    return str(root)


def test_dataset_ingest_quarantines_bad_rows_with_their_row_number(world, loaded, tmp_path):
    catalog, constraints = loaded

    def edit(date, frame):
        if date == "2026-01-02":
            frame.loc[5, "ad_id"] = "ad_999999"
            frame.loc[7] = frame.loc[6]  # a copy: same partition, so a duplicate
        return frame

    path = _copy_dataset(world, tmp_path, edit)
    summary = ingest(path, catalog, constraints, str(tmp_path / "v"))
    assert summary.rows_in == N
    assert summary.quarantined_by_reason == {"unknown_ad": 1, "duplicate": 1}
    q = pd.read_csv(summary.quarantine_path, dtype=str)
    parts = dataset.parts(path)
    before = sum(
        p.fragment.count_rows() for p in parts if p.path < os.path.join(path, "date=2026-01-02")
    )
    assert q["row"].astype(int).tolist() == [before + 6, before + 8]
    assert q["reason"].tolist() == [
        "ad_id 'ad_999999' is not in the catalog",
        "identical to an earlier row",
    ]


def test_a_dataset_missing_a_column_in_one_file_names_the_file(world, loaded, tmp_path):
    catalog, constraints = loaded
    path = _copy_dataset(
        world, tmp_path, lambda d, f: f.drop(columns="propensity") if d == "2026-01-03" else f
    )
    with pytest.raises(ContractError, match="date=2026-01-03: columns change"):
        ingest(path, catalog, constraints, str(tmp_path / "v"))


def _naive_violations(c: Constraints, ads: np.ndarray, combos: np.ndarray) -> np.ndarray:
    out = np.full(len(ads), -1)
    for i in range(len(c)):
        hit = (combos[:, c.comp_a[i]] == c.elem_a[i]) & (combos[:, c.comp_b[i]] == c.elem_b[i])
        hit &= (ads == c.ad[i]) | (c.ad[i] < 0)
        out[(out < 0) & hit] = i
    return out


def test_violations_by_search_match_the_pair_by_pair_definition():
    rng = np.random.default_rng(0)
    n_pairs = 400
    ad = np.where(rng.random(n_pairs) < 0.05, -1, rng.integers(0, 30, n_pairs))  # few "*"
    ca = rng.integers(0, 2, n_pairs)
    cb = ca + 1 + rng.integers(0, 2 - ca)
    cons = Constraints(ad, ca, rng.integers(0, 4, n_pairs), cb, rng.integers(0, 4, n_pairs))
    ads = rng.integers(-1, 30, 5_000)
    combos = rng.integers(-1, 4, (5_000, 3))
    got = cons.violations(ads, combos)
    np.testing.assert_array_equal(got, _naive_violations(cons, ads, combos))
    assert (got >= 0).mean() > 0.1  # the test sees hits, repeated (ad, element_a) keys too


def test_forbidden_pairs_are_ragged_and_match_the_dense_definition(loaded):
    catalog, constraints = loaded
    masks = LegalMasks(catalog, constraints)
    dense_bytes = sum(catalog.n_ads * masks.M[j] * masks.M[k] for j, k in masks.forbid)
    forbid_bytes = sum(f.nbytes for f in masks.forbid.values())
    assert forbid_bytes < dense_bytes / 4
    rng = np.random.default_rng(1)
    ads = rng.integers(0, catalog.n_ads, 64)
    for (j, k), f in masks.forbid.items():
        dense = f.dense(ads, masks.M[j], masks.M[k])
        for row, ad in enumerate(ads):
            want = np.zeros((masks.M[j], masks.M[k]), bool)
            for i in np.flatnonzero((constraints.ad == ad) & (constraints.comp_a == j)):
                if constraints.comp_b[i] == k:
                    sj = np.flatnonzero(catalog.candidates[ad][j] == constraints.elem_a[i])[0]
                    sk = np.flatnonzero(catalog.candidates[ad][k] == constraints.elem_b[i])[0]
                    want[sj, sk] = True
            np.testing.assert_array_equal(dense[row], want)
        picks = rng.integers(0, masks.M[j], len(ads))
        after = f.after(ads, picks, masks.M[k])
        np.testing.assert_array_equal(after, dense[np.arange(len(ads)), picks])


def test_batch_masks_agree_with_each_ads_own_masks(loaded):
    catalog, constraints = loaded
    masks = LegalMasks(catalog, constraints)
    rng = np.random.default_rng(2)
    ads = rng.choice(np.unique(constraints.ad), 40)  # ads with a forbidden pair
    picks = torch.as_tensor(
        [[rng.integers(len(c)) for c in catalog.candidates[a]] for a in ads], dtype=torch.long
    )
    for k in range(catalog.n_components):
        batch = masks.mask(k, torch.as_tensor(ads), picks).numpy()
        for row, ad in enumerate(ads):
            one = masks.for_ad(int(ad)).mask(k, picks[row : row + 1].numpy())[0]
            np.testing.assert_array_equal(batch[row], one)


def test_masks_need_no_ads_by_catalog_memory():
    # 5,000 ads with their own elements and a forbidden pair each: the dense forbid tensor of
    # before held 5,000 x 12 x 12 bools per constrained component pair; a dense ads x
    # elements map 5,000 x 55,000 cells per component.
    config = CatalogWorldConfig(
        n_ads=5_000,
        n_components=3,
        min_candidates=10,
        max_candidates=12,
        forbid_share=1.0,
        ad_block=5_000,
    )
    world = CatalogWorld(config, 0)
    blk = world.block(0)
    catalog = Catalog.from_frame(world.catalog_block(blk)[0].to_pandas())
    cons = Constraints.from_frame(world.constraint_rows(blk).to_pandas(), catalog)
    masks = LegalMasks(catalog, cons)
    assert catalog.n_ads == len(cons) == 5_000
    rows = sum(len(c) for cands in catalog.candidates for c in cands)
    assert masks.nbytes < 40 * rows  # padded slots + their index: bytes per catalog row
    assert sum(f.nbytes for f in masks.forbid.values()) < 0.1 * 5_000 * 3 * 144
    assert sum(len(f.sj) for f in masks.forbid.values()) == len(cons)


def test_world_json_records_the_run(world):
    with open(world.world, encoding="utf-8") as f:
        stats = json.load(f)
    assert stats["n_impressions"] == N and stats["world"] == "catalog"
    assert stats["catalog_rows"] == pq.ParquetFile(world.catalog).metadata.num_rows


def test_ingest_and_reader_stream_a_dataset_from_an_object_store(world, loaded, gcs, tmp_path):
    from genco.data import storage

    catalog, constraints = loaded
    root = gcs.url("log")
    for part in dataset.parts(world.impressions):
        rel = os.path.relpath(part.path, world.impressions)
        with open(part.path, "rb") as f:
            storage.write_bytes(storage.join(root, rel), f.read(), client=gcs.client)
    assert dataset.is_dataset(root)
    rows = sum(b.num_rows for b in dataset.iter_batches(root, ["click"], 5_000, gcs.client))
    assert rows == N
    summary = ingest(root, catalog, constraints, str(tmp_path / "v"), client=gcs.client)
    assert summary.rows_valid == N


def test_cli_simulates_the_catalog_world_and_validates_its_dataset(tmp_path):
    import subprocess
    import sys

    run = [sys.executable, "-m", "genco.cli"]
    w = tmp_path / "w"
    r = subprocess.run(
        [
            *run,
            "simulate",
            "--world",
            "catalog",
            "--n-ads",
            "40",
            "--n-impressions",
            "3000",
            "--out",
            str(w),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert stats["n_ads"] == 40 and stats["n_impressions"] == 3000
    r = subprocess.run(
        [
            *run,
            "validate",
            "--catalog",
            str(w / "catalog.parquet"),
            "--constraints",
            str(w / "constraints.csv"),
            "--impressions",
            str(w / "impressions"),
            "--out",
            str(tmp_path / "v"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rows_valid"] == 3000
    r = subprocess.run(
        [*run, "simulate", "--world", "default", "--n-ads", "40", "--out", str(tmp_path / "d")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "--n-ads is for --world catalog" in r.stderr
