"""Batch recommendation at catalog scale: shards, streaming output, the same answers as the
predictor one ad at a time, and mistakes named."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from genco.errors import ConfigError, UnknownIdError
from genco.inference.batch import (
    iter_recommendations,
    parse_shard,
    shard_range,
    write_recommendations,
)
from genco.inference.predictor import Predictor
from genco.models.generator import Generator, GeneratorConfig
from genco.models.reward import RewardModel, RewardModelConfig
from genco.models.vocab import Vocab
from genco.worlds.simulate import make_world, world_config


def _predictor(world_name: str, n_ads: int, ctx: tuple[str, ...] = ()) -> Predictor:
    """Untrained models on a simulated catalog: decoding costs and answers are what is under
    test here, not the models' quality."""
    world = make_world(world_config(world_name, n_ads=n_ads), seed=0)
    torch.manual_seed(0)
    vocab = Vocab.from_catalog(world.catalog, ctx)
    reward = RewardModel(vocab, RewardModelConfig())
    gen = Generator(vocab, GeneratorConfig())
    return Predictor(reward.eval(), gen.eval(), world.catalog, world.constraints)


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return _predictor("constrained", 23)


def test_shards_cover_every_ad_once():
    for n_ads in (1, 7, 100):
        for count in (1, 3, 8):
            ads = [a for i in range(count) for a in shard_range(n_ads, i, count)]
            assert ads == list(range(n_ads))
    assert parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "-1/3", "a/b", "3", "1/0"):
        with pytest.raises(ConfigError, match=f"got '{bad}'"):
            parse_shard(bad)


def test_sharded_output_is_the_predictors_answer_for_every_ad(predictor, tmp_path):
    # The contract format of the predictor's per-ad answers (what serving returns).
    rows = [
        {"ad_id": ad, "rank": r.rank, **r.elements, "score": r.score}
        for ad in predictor.catalog.ads
        for r in predictor.recommend(ad, top_k=3)
    ]
    want = pd.DataFrame(rows, columns=["ad_id", "rank", *predictor.catalog.components, "score"])
    parts = []
    for i in range(3):
        out = str(tmp_path / f"recs-{i}.parquet")
        summary = write_recommendations(predictor, out, top_k=3, shard=(i, 3), chunk_ads=4)
        assert summary.inputs == summary.ads == len(shard_range(23, i, 3))
        assert pq.ParquetFile(out).metadata.num_row_groups == -(-summary.ads // 4)  # chunks
        parts.append(pd.read_parquet(out))
    got = pd.concat(parts, ignore_index=True)
    assert list(got.columns) == list(want.columns)
    pd.testing.assert_frame_equal(got, want, check_dtype=False)


def test_contexts_rows_grouped_by_ad_and_checked(tmp_path):
    predictor = _predictor("contextual", 6, ("ctx_0", "ctx_1"))
    ctx = pd.DataFrame(
        {
            "ad_id": ["ad_0003", "ad_0000", "ad_0003", "ad_0005"],
            "ctx_0": [0.0, 1.0, 1.0, 0.0],
            "ctx_1": [0.5, 0.0, -0.5, 2.0],
        }
    )
    tables = list(iter_recommendations(predictor, 2, (0, 1), ctx, chunk_ads=2))
    got = pd.concat([t.to_pandas() for t in tables], ignore_index=True)
    assert got["ad_id"].tolist() == ["ad_0000"] * 2 + ["ad_0003"] * 4 + ["ad_0005"] * 2
    assert got["ctx_1"].tolist()[2:6] == [0.5, 0.5, -0.5, -0.5]  # input order within an ad
    one = predictor.recommend("ad_0003", {"ctx_0": 1.0, "ctx_1": -0.5}, top_k=2)
    assert [r.score for r in one] == pytest.approx(got["score"].tolist()[4:6], rel=1e-6)
    # The first shard of two (ads 0-2) keeps only ad_0000's row.
    half = pd.concat(t.to_pandas() for t in iter_recommendations(predictor, 1, (0, 2), ctx))
    assert half["ad_id"].tolist() == ["ad_0000"]
    with pytest.raises(UnknownIdError, match="row 2: ad_id 'ad_9' is not in the catalog"):
        next(iter_recommendations(predictor, 1, (0, 1), ctx.assign(ad_id=["ad_0000", "ad_9"] * 2)))
    with pytest.raises(ConfigError, match="row 3: ctx_1 'x' is not a finite number"):
        next(iter_recommendations(predictor, 1, (0, 1), ctx.assign(ctx_1=["1", "2", "x", "3"])))
    with pytest.raises(ConfigError, match="missing column 'ctx_1'"):
        next(iter_recommendations(predictor, 1, (0, 1), ctx.drop(columns="ctx_1")))
    with pytest.raises(ConfigError, match="pass --contexts"):
        next(iter_recommendations(predictor, 1, (0, 1), None))


def test_cli_recommend_writes_its_shard_and_refuses_a_bad_one(predictor, tmp_path):
    model = tmp_path / "m"
    _save_bundle(predictor, model)
    run = [sys.executable, "-m", "genco.cli", "recommend", "--model", str(model)]
    r = subprocess.run(
        [*run, "--shard", "1/2", "--out", str(tmp_path / "r.csv")], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    rec = pd.read_csv(tmp_path / "r.csv", dtype={"ad_id": str})
    assert rec["ad_id"].tolist() == list(predictor.catalog.ads[11:23])
    r = subprocess.run(
        [*run, "--shard", "2/2", "--out", str(tmp_path / "x.csv")], capture_output=True, text=True
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "genco recommend: error: shard must be 'i/n' with 0 <= i < n, got '2/2'"
    ]


def _save_bundle(predictor: Predictor, model) -> None:
    """A bundle directory of the predictor's models, catalog and constraints, manifest last."""
    from genco.data import storage
    from genco.models.checkpoint import CATALOG, CONSTRAINTS, save_generator, save_reward_model
    from genco.training.bundle import write_manifest

    model.mkdir()
    save_reward_model(predictor.reward, str(model))
    save_generator(predictor.generator, str(model))
    storage.write_table(predictor.catalog.to_frame(), str(model / CATALOG))
    storage.write_table(predictor.constraints.to_frame(predictor.catalog), str(model / CONSTRAINTS))
    write_manifest(str(model))


def test_chunks_never_split_an_ads_rows(predictor):
    sizes = [t.num_rows for t in iter_recommendations(predictor, 2, (0, 1), None, chunk_ads=5)]
    assert sizes == [10, 10, 10, 10, 6]
    assert np.sum(sizes) == 2 * 23


def test_pipeline_fans_out_over_ad_shards(predictor, tmp_path):
    import yaml

    from genco.pipeline.recommend import compile_recommend, run_recommend_local

    with pytest.raises(ConfigError, match="no component image"):
        compile_recommend(str(tmp_path / "refused.yaml"))  # a cluster could not pull it
    path = compile_recommend(str(tmp_path / "recommend.yaml"), image="registry.example/genco:1")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert "registry.example/genco:1" in text
    spec = yaml.safe_load(text)
    tasks = spec["root"]["dag"]["tasks"]
    name, loop = next((n, t) for n, t in tasks.items() if t["taskInfo"]["name"] == "ad-shards")
    assert loop["parameterIterator"]["items"]["inputParameter"].endswith("plan-shards-Output")
    assert loop["iteratorPolicy"]["parallelismLimit"] == 16
    assert tasks["count-rows"]["dependentTasks"] == [name]  # the fan-in waits for every shard
    # The real local runner runs the loop: one file per shard, every ad once.
    model = tmp_path / "m"
    _save_bundle(predictor, model)
    out = tmp_path / "recs"
    import builtins
    import logging

    root = logging.getLogger()
    handlers, level, print_ = root.handlers[:], root.level, builtins.print
    rows = run_recommend_local(str(model), str(out), n_shards=3, top_k=2, refine="none")
    assert rows == 2 * 23
    # kfp's per-task print and logger swaps, entered from ParallelFor's threads, leave the
    # process as it was (else later prints are indented and log lines land on stdout).
    assert root.handlers == handlers and root.level == level and builtins.print is print_
    files = sorted(os.listdir(out))
    assert files == [f"shard-{i:05d}-of-00003.parquet" for i in range(3)]
    got = pd.concat(pd.read_parquet(out / f) for f in files)
    assert got["ad_id"].tolist() == [a for a in predictor.catalog.ads for _ in range(2)]


def test_cli_compiles_either_pipeline(tmp_path, capsys):
    from genco.cli.main import main

    r, t = str(tmp_path / "r.yaml"), str(tmp_path / "t.yaml")
    main(["pipeline", "compile", "--pipeline", "recommend", "--out", r, "--image", "reg/g:1"])
    main(["pipeline", "compile", "--out", t, "--local"])
    assert capsys.readouterr().out.split() == [str(tmp_path / "r.yaml"), str(tmp_path / "t.yaml")]
    assert "genco-batch-recommend" in (tmp_path / "r.yaml").read_text()
    assert "genco-retraining" in (tmp_path / "t.yaml").read_text()
