"""Training at scale: sparse row updates, the streaming trainer, DDP under torchrun, --device."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from genco.errors import ConfigError, ContractError
from genco.evaluation.metrics import log_loss
from genco.models.checkpoint import load_reward_model
from genco.models.generator import BoundGenerator, Generator, GeneratorConfig
from genco.models.optim import (
    Optimizers,
    RowAdam,
    RowStep,
    Snapshot,
    resolve_device,
    set_sparse,
)
from genco.models.reward import BoundModel, RewardModel, RewardModelConfig
from genco.models.vocab import Vocab, encode
from genco.training.reward_fit import train_reward_model
from genco.training.stream_fit import train_reward_model_stream
from genco.worlds.simulate import WORLDS, log_impressions, make_world

# Small enough for seconds, and the stream really streams: several chunks and buffers, and
# an in-memory sample a tenth of the log.
STREAM = {"chunk_rows": 8192, "sample_rows": 5000, "shuffle_rows": 32768}
EPOCHS = 4


@pytest.fixture(scope="module")
def world():
    return make_world(WORLDS["default"], 0)


@pytest.fixture(scope="module")
def logs(world, tmp_path_factory):
    """(directory with catalog.csv and impressions.parquet, fresh held-out log encoded)."""
    d = tmp_path_factory.mktemp("scale")
    log_impressions(world, 50_000, 0).to_parquet(d / "impressions.parquet")
    world.catalog.to_frame().to_csv(d / "catalog.csv", index=False)
    return d, encode(log_impressions(world, 50_000, 1000), world.catalog)


def heldout_loss(model, catalog, test) -> float:
    return log_loss(test.click, BoundModel(model, catalog).ctr(test.ads, test.combos, test.ctx))


@pytest.fixture(scope="module")
def streamed(world, logs):
    d, test = logs
    config = RewardModelConfig(epochs=EPOCHS, device="cpu")
    model, report = train_reward_model_stream(
        world.catalog, str(d / "impressions.parquet"), config, **STREAM
    )
    return model, report, heldout_loss(model, world.catalog, test)


def test_sparse_steps_update_only_the_rows_their_batch_touched(world):
    model = RewardModel(Vocab.from_catalog(world.catalog, ()), RewardModelConfig())
    set_sparse(model, True)
    opt = Optimizers(model, lr=0.1)
    K = model.K
    batches = [torch.arange(K)[None, :] + 0, torch.arange(K)[None, :] + K]  # disjoint rows
    for i, elem in enumerate(batches):
        before = model.id_ffm.weight.detach().clone()
        ad = torch.tensor([i])
        z = model(ad, elem, torch.zeros(1, K, max(model.F, 1)), torch.zeros(1, 0))
        opt.zero_grad()
        (z.sum() ** 2).backward()
        assert model.id_ffm.weight.grad.is_sparse
        opt.step()
        changed = (model.id_ffm.weight.detach() != before).any(1).nonzero()[:, 0]
        # Dense Adam would move batch 0's rows again in step 2 (their momentum); lazy rows not.
        assert sorted(changed.tolist()) == sorted(elem[0].tolist())


def test_row_adam_takes_sparse_adams_steps():
    """The row-gather update is torch's SparseAdam's, step for step (repeated rows in a
    batch, rows revisited after others moved, and a halved step)."""
    g = torch.Generator().manual_seed(0)
    tables = [torch.nn.Embedding(50, 3, sparse=True) for _ in range(2)]
    tables[1].load_state_dict(tables[0].state_dict())
    start = tables[0].weight.detach().clone()
    opts = [torch.optim.SparseAdam(tables[0].parameters(), lr=0.05)]
    opts.append(RowAdam(tables[1].parameters(), lr=0.05))
    for step in range(20):
        idx = torch.randint(0, 50, (64,), generator=g)  # with repeats
        target = torch.randn(64, 3, generator=g)
        if step == 10:
            for o in opts:
                o.param_groups[0]["lr"] *= 0.5
        for t, o in zip(tables, opts):
            o.zero_grad()
            ((t(idx) - target) ** 2).sum().backward()
            o.step()
    assert ((tables[1].weight.detach() - start).abs() > 1e-4).all()  # every row moved
    torch.testing.assert_close(tables[1].weight, tables[0].weight, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dim3", [0, 3], ids=["pairwise", "three-way"])
def test_a_row_step_is_the_sparse_gradient_step(world, dim3):
    """RowStep's dense leaves + RowAdam.update move every parameter as sparse gradients +
    RowAdam.step do (the DDP path), up to float noise, L2 term included (and the three-way
    term's id table with it)."""
    from genco.training.reward_fit import l2_penalty

    config = RewardModelConfig(l2_id=0.01, dim3=dim3)
    vocab = Vocab.from_catalog(world.catalog, ())
    models = [RewardModel(vocab, config) for _ in range(2)]
    for m in models:
        set_sparse(m, True)
    opts = [Optimizers(m, lr=0.05) for m in models]
    g = torch.Generator().manual_seed(1)
    K, F = models[0].K, max(models[0].F, 1)
    start = models[0].id_ffm.weight.detach().clone()
    start3 = models[0].id3.weight.detach().clone() if dim3 else None
    for _ in range(3):
        ad = torch.randint(0, len(vocab.ads), (32,), generator=g)
        elem = torch.randint(0, models[0].n_elements, (32, K), generator=g)
        feats, x, y = torch.randn(32, K, F, generator=g), torch.zeros(32, 0), torch.rand(32)
        for i, (m, opt) in enumerate(zip(models, opts)):
            rows = RowStep(m, ad, elem) if i else None
            a, e = (rows.ad, rows.elem) if rows else (ad, elem)
            bce = torch.nn.functional.binary_cross_entropy_with_logits
            loss = bce(m(a, e, feats, x), y) + l2_penalty(m, a, e, config)
            opt.zero_grad()
            loss.backward()
            opt.step(rows)
            m.row_tables = None
    assert not torch.allclose(models[1].id_ffm.weight, start)
    if dim3:
        assert models[1].id3.weight.is_sparse is False and models[1].id3.sparse
        assert not torch.allclose(models[1].id3.weight, start3)
    for (name, p0), (_, p1) in zip(models[0].named_parameters(), models[1].named_parameters()):
        torch.testing.assert_close(p1, p0, rtol=1e-5, atol=1e-6, msg=name)


def test_snapshot_restores_dense_parameters_and_its_rows_of_sparse_tables(world):
    model = RewardModel(Vocab.from_catalog(world.catalog, ()), RewardModelConfig())
    set_sparse(model, True)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    snap = Snapshot(model, {"id_ffm.weight": torch.tensor([0, 2])})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    snap.restore(model)
    for name, p in model.named_parameters():
        if name == "id_ffm.weight":
            torch.testing.assert_close(p[[0, 2]], before[name][[0, 2]])
            # rows outside the snapshot are the caller's promise (a fit never moves them)
            torch.testing.assert_close(p[1], before[name][1] + 1.0)
        else:
            torch.testing.assert_close(p, before[name], msg=name)


def test_small_tables_stay_dense_large_ones_go_sparse(world):
    model = RewardModel(Vocab.from_catalog(world.catalog, ()), RewardModelConfig())
    assert not model.id_ffm.sparse  # a default-world table: dense measured faster
    big = torch.nn.Embedding(50_000, 2)
    holder = torch.nn.ModuleDict({"big": big, "small": torch.nn.Embedding(10, 2)})
    set_sparse(holder)
    assert big.sparse and not holder["small"].sparse


def test_generator_training_computes_candidates_for_the_batch_ads_only(world):
    vocab = Vocab.from_catalog(world.catalog, ())
    bound = BoundGenerator(Generator(vocab, GeneratorConfig()), world.catalog, world.constraints)
    ads = torch.tensor([3, 0, 3])
    batch = bound._batch_vectors(ads)  # grad enabled: the training path
    with torch.no_grad():
        full = bound.candidate_vectors()
    for k, c in enumerate(batch):
        assert c.shape == (3, *full[k].shape[1:])
        torch.testing.assert_close(c.detach(), full[k][ads])


def test_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="device 'cuda': this torch build sees no GPU"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda, got 'tpu'"):
        RewardModelConfig(device="tpu")


def test_streamed_fit_matches_the_in_memory_fit(world, logs, streamed):
    d, test = logs
    _, report, loss = streamed

    frame = pd.read_parquet(d / "impressions.parquet")
    mem, _ = train_reward_model(world.catalog, frame, RewardModelConfig(epochs=EPOCHS))
    assert report.train_rows + report.val_rows == 50_000
    assert report.val_rows == pytest.approx(5_000, rel=0.05)
    assert report.tuning["sample_rows"] < 10_000
    assert loss == pytest.approx(heldout_loss(mem, world.catalog, test), rel=0.01)


def test_stream_errors_name_the_row_column_and_value(world, tmp_path):
    log = log_impressions(world, 300, 0)
    log.loc[270, "ad_id"] = "no_such_ad"
    log.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ContractError, match="impressions row 270: ad_id 'no_such_ad' is not in"):
        train_reward_model_stream(world.catalog, str(tmp_path / "bad.parquet"), chunk_rows=64)
    log.drop(columns=["click"]).to_parquet(tmp_path / "noclick.parquet")
    with pytest.raises(ContractError, match="impressions: missing column 'click'"):
        train_reward_model_stream(world.catalog, str(tmp_path / "noclick.parquet"))


def test_two_ddp_processes_match_one_within_one_percent(world, logs, streamed, tmp_path):
    d, test = logs
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun), "--standalone", "--nproc-per-node", "2",
        "-m", "genco.training.distributed",
        "--catalog", str(d / "catalog.csv"),
        "--impressions", str(d / "impressions.parquet"),
        "--out", str(tmp_path / "model"),
        "--epochs", str(EPOCHS), "--device", "cpu",
        "--chunk-rows", str(STREAM["chunk_rows"]),
        "--sample-rows", str(STREAM["sample_rows"]),
        "--shuffle-rows", str(STREAM["shuffle_rows"]),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp, _ = load_reward_model(str(tmp_path / "model"))
    single = streamed[2]
    assert heldout_loss(ddp, world.catalog, test) == pytest.approx(single, rel=0.01)
    assert not np.array_equal(  # really trained by two workers, not a copy of one
        ddp.id_ffm.weight.detach().numpy(), streamed[0].id_ffm.weight.detach().numpy()
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: cuda is valid")
@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("cuda", "genco attribute: error: device 'cuda': this torch build sees no GPU"),
        ("tpu", "genco attribute: error: device must be one of auto, cpu, cuda, got 'tpu'"),
    ],
)
def test_cli_device_errors_are_one_line(logs, tmp_path, device, message):
    d, _ = logs
    r = subprocess.run(
        [
            sys.executable, "-m", "genco.cli", "attribute",
            "--catalog", str(d / "catalog.csv"), "--impressions", str(d / "impressions.parquet"),
            "--out", str(tmp_path / "m"), "--epochs", "1", "--device", device,
        ],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()},
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line]  # beside progress bars
    assert len(errors) == 1 and errors[0].startswith(message), r.stderr
    assert "Traceback" not in r.stderr


def test_small_logs_are_fitted_in_memory(world, logs):
    """fit_reward_log keeps the in-memory fit (faster) up to STREAM_MIN_ROWS impressions."""
    from genco.training.stream_fit import STREAM_MIN_ROWS, fit_reward_log

    d, _ = logs
    assert STREAM_MIN_ROWS >= 50_000
    _, report = fit_reward_log(
        world.catalog, str(d / "impressions.parquet"), RewardModelConfig(epochs=2)
    )
    assert report.train_rows + report.val_rows == 50_000
    assert "sample_rows" not in report.tuning  # the streamed fit records its sample
