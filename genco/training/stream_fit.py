"""Fitting the reward model on a log too large to hold: mini-batch epochs streamed from Parquet.

Cost is linear in impressions and memory is bounded by the chunk and shuffle-buffer sizes:

1. one scan (only ids, click, timestamp, propensity and context columns) counts the rows,
   fixes the held-out split (the latest ``val_fraction`` by timestamp, its cutoff read from a
   sample; random by row when there is no timestamp) and draws a uniform sample of at most
   ``sample_rows`` impressions;
2. the sample is fitted in memory by the usual trainer (``reward_fit._fit_tuned``), which
   chooses the id-embedding L2 on the sample's held-out rows (its path on a sub-sample
   when the sample is larger than ``reward_fit.L2_SAMPLE_MIN_ROWS``); that model is the
   warm start;
3. epochs stream the whole log in chunks through a shuffle buffer, from the warm start at
   half the step, Adam on the dense parameters and RowAdam (SparseAdam's update) on the
   rows of the large id tables each batch touched, early stopping and step halving on the
   streamed held-out loss, as in the in-memory trainer;
4. the combination residuals are fitted on the whole log merged by (ad, combination,
   context) in one more pass, or on the sample when that has more than
   MAX_RESIDUAL_GROUPS distinct rows (continuous contexts), so memory stays bounded.

Distributed (``world > 1``, under ``torchrun``; see ``genco.training.distributed``): every
rank reads every chunk and trains on its stride of rows (row i goes to rank i % world), so
all ranks take the same number of steps; DDP averages their gradients, the held-out sums
are all-reduced, and every rank takes the same early-stopping decisions.

The log is read by ``genco.training.log_reader.open_log`` alone, so another reader (the
data layer's) can replace it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pyarrow.dataset as ds
import torch
from torch import nn

from genco.data.contract import CONTEXT_PREFIX, TIMESTAMP, Catalog
from genco.errors import ContractError
from genco.models.optim import Optimizers, RowStep, resolve_device, set_sparse
from genco.models.residual_index import row_hash
from genco.models.reward import BoundModel, RewardModel, RewardModelConfig
from genco.models.vocab import Encoded, Vocab, fit_scalers
from genco.training.log_reader import ChunkEncoder, concat, open_log
from genco.training.residuals import fit_residuals
from genco.training.reward_fit import (
    Plateau,
    TrainReport,
    _fit_tuned,
    l2_penalty,
    train_reward_model,
)

# Logs with at most this many impressions are read into memory and fitted there (faster:
# identical impressions merge, and no epoch re-reads the files); larger ones stream.
STREAM_MIN_ROWS = 2_000_000
CHUNK_ROWS = 131_072
SHUFFLE_ROWS = 1_048_576
SAMPLE_ROWS = 1_000_000
# The residuals are fitted on the whole log merged by (ad, combination, context) while that
# has at most this many distinct rows (~60 bytes each), else on the sample.
MAX_RESIDUAL_GROUPS = 5_000_000


class LogStream:
    """One pass over the log as Encoded chunks; the scan fixes the split and the sample."""

    def __init__(
        self,
        path: str,
        catalog: Catalog,
        config: RewardModelConfig,
        chunk_rows: int = CHUNK_ROWS,
        sample_rows: int = SAMPLE_ROWS,
    ) -> None:
        self.dataset = open_log(path)
        schema = self.dataset.schema
        ctx_cols = tuple(c for c in schema.names if c.startswith(CONTEXT_PREFIX))
        self.encoder = ChunkEncoder(catalog, ctx_cols)
        self.columns = self.encoder.columns(schema)
        self.config, self.chunk_rows = config, chunk_rows
        self.n = self.dataset.count_rows()
        if self.n == 0:
            raise ContractError("impressions: no rows to learn from")
        self.has_time = TIMESTAMP in schema.names
        self._scan(min(sample_rows, self.n))

    def chunks(self, part: str | None = None) -> Iterator[tuple[int, Encoded]]:
        """(first row number, chunk) in file order; ``part`` 'train' or 'val' with a time
        split reads only those rows (row groups outside the cutoff are skipped), numbered
        within the part."""
        where = None
        if part and self.has_time and self.config.val_fraction > 0:
            t = ds.field(TIMESTAMP)
            where = t >= self.cutoff if part == "val" else t < self.cutoff
        first = 0
        batches = self.dataset.to_batches(
            columns=self.columns, batch_size=self.chunk_rows, filter=where
        )
        for batch in batches:
            if batch.num_rows:
                yield first, self.encoder(batch, first)
                first += batch.num_rows

    def is_val(self, rows: np.ndarray, enc: Encoded) -> np.ndarray:
        """(n,) bool: which rows of ``enc`` (row numbers ``rows`` in the log) are held out."""
        if self.config.val_fraction == 0:
            return np.zeros(len(enc), bool)
        if self.has_time:
            return enc.timestamp >= self.cutoff
        with np.errstate(over="ignore"):
            h = (rows.astype(np.uint64) + np.uint64(self.config.seed)) * np.uint64(
                0x9E3779B97F4A7C15
            )
        return (h >> np.uint64(40)).astype(np.float64) / 2.0**24 < self.config.val_fraction

    def _scan(self, sample_rows: int) -> None:
        """Counts, click totals, propensity mean and a uniform sample (row-hash Bernoulli)."""
        rng = np.random.default_rng(self.config.seed)
        keep_p = sample_rows / self.n
        parts, positions, ts_sample = [], [], []
        self.clicks = 0.0
        inv_prop_sum, rows = 0.0, 0
        for first, enc in self.chunks():
            self.clicks += float(enc.click.sum())
            if enc.propensity is not None:
                inv_prop_sum += float((1.0 / enc.propensity).sum())
            rows += len(enc)
            take = np.flatnonzero(rng.random(len(enc)) < keep_p)
            parts.append(enc.take(take))
            positions.append(first + take)
            if self.has_time:
                ts_sample.append(enc.timestamp[take])
        if self.has_time and self.config.val_fraction > 0:
            self.cutoff = float(
                np.quantile(np.concatenate(ts_sample), 1 - self.config.val_fraction)
            )
        self.sample = concat(parts)
        self.sample_rows = np.concatenate(positions)
        self.mean_inv_prop = inv_prop_sum / rows if inv_prop_sum else 1.0

    def weights(self, enc: Encoded) -> np.ndarray:
        if not self.config.propensity_weighting:
            return np.ones(len(enc))
        if enc.propensity is None:
            raise ContractError("propensity_weighting needs a 'propensity' column")
        w = 1.0 / enc.propensity / self.mean_inv_prop
        return np.minimum(w, self.config.max_weight)


def train_reward_model_stream(
    catalog: Catalog,
    path: str,
    config: RewardModelConfig | None = None,
    progress: bool = False,
    init: RewardModel | None = None,
    chunk_rows: int = CHUNK_ROWS,
    sample_rows: int = SAMPLE_ROWS,
    shuffle_rows: int = SHUFFLE_ROWS,
    rank: int = 0,
    world: int = 1,
) -> tuple[RewardModel, TrainReport]:
    """Fit the reward model by streaming the Parquet log at ``path`` (see the module's
    docstring); every rank of a distributed run returns the same model."""
    config = config or RewardModelConfig()
    t0, c0 = time.perf_counter(), time.process_time()
    stream = LogStream(path, catalog, config, chunk_rows, sample_rows)
    seconds = {"scan": time.perf_counter() - t0}
    cpu = {"scan": time.process_time() - c0}  # this process's CPU: apart from contention
    sample = stream.sample
    if stream.clicks == 0:
        raise ContractError("impressions: no clicks at all; a click model cannot be learned")
    if stream.clicks == stream.n:
        raise ContractError(
            "impressions: every impression was clicked; a click model cannot be learned"
        )
    torch.manual_seed(config.seed)
    model = RewardModel(Vocab.from_catalog(catalog, stream.encoder.context_columns), config)
    if init is not None:
        model.load_state_dict({**model.state_dict(), **init.state_dict()})  # as reward_fit's
    bound = BoundModel(model, catalog)
    sample_val = stream.is_val(stream.sample_rows, sample)
    tr, va = np.flatnonzero(~sample_val), np.flatnonzero(sample_val)
    sample_w = stream.weights(sample)
    fit_scalers(model, catalog, sample.ctx[tr])
    with torch.no_grad():
        rate = stream.clicks / stream.n
        if init is None:
            model.bias.fill_(math.log(rate / (1 - rate)))
    # The sample fit: the warm start, and the L2 it chose on the sample's held-out rows.
    t, c = time.perf_counter(), time.process_time()
    sample_history, _, tuning = _fit_tuned(
        model, bound, sample, tr, va, sample_w, config, progress and rank == 0
    )
    seconds["sample_fit"], cpu["sample_fit"] = time.perf_counter() - t, time.process_time() - c
    # From the warm start at half the step: at the full step the first streamed epochs
    # overshot it (per_product world, seed 1, 200k impressions: held-out log loss 0.18708
    # at lr, 0.18541 at lr / 2, 0.18539 fitted in memory).
    cfg = replace(config, l2_id=tuning["l2_id"], lr=config.lr / 2)
    t, c = time.perf_counter(), time.process_time()
    history, best_epoch = _stream_epochs(
        model, bound, stream, cfg, shuffle_rows, rank, world, progress
    )
    seconds["epochs"], cpu["epochs"] = time.perf_counter() - t, time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    tuning = {**tuning, "sample_rows": len(sample), "sample_history": sample_history}
    if config.residual:
        merged = merged_log(stream, MAX_RESIDUAL_GROUPS)
        if merged is None:  # too many distinct (ad, combination, context): the sample's
            tuning.update(fit_residuals(model, bound, sample, sample_w))
            tuning["residual_rows"] = f"sample of {len(sample)} impressions"
        else:
            tuning.update(fit_residuals(model, bound, *merged))
            tuning["residual_rows"] = f"all {stream.n} impressions ({len(merged[0])} merged)"
    seconds["residuals"], cpu["residuals"] = time.perf_counter() - t, time.process_time() - c
    tuning["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    tuning["cpu_seconds"] = {k: round(v, 2) for k, v in cpu.items()}
    n_val = history[-1]["val_rows"] if history else 0
    report = TrainReport(
        len(history), best_epoch, stream.n - n_val, n_val,
        "time" if stream.has_time else "random", time.perf_counter() - t0, history, tuning,
    )  # fmt: skip
    return model, report


def merged_log(stream: LogStream, max_groups: int) -> tuple[Encoded, np.ndarray] | None:
    """The whole log merged by (ad, combination, context) in one streamed pass: one row per
    group (``click`` its weighted click rate) and its summed weight; None when the groups
    outnumber ``max_groups`` (memory stays bounded; the caller falls back to the sample)."""
    table: Encoded | None = None
    table_w = np.zeros(0)
    pending: list[tuple[Encoded, np.ndarray]] = []

    def fold() -> bool:
        nonlocal table, table_w, pending
        parts = ([(table, table_w)] if table is not None else []) + pending
        enc = concat([p for p, _ in parts])
        w = np.concatenate([w for _, w in parts])
        keys = np.column_stack([enc.ads, enc.combos, enc.ctx.view(np.int32)]).astype(np.int64)
        uniq, first, group = np.unique(row_hash(keys), return_index=True, return_inverse=True)
        group = group.reshape(-1)
        table_w = np.bincount(group, w, len(uniq))
        rate = np.bincount(group, w * enc.click, len(uniq)) / np.maximum(table_w, 1e-12)
        table = enc.take(first)
        table.click = rate.astype(np.float32)
        pending = []
        return len(uniq) <= max_groups

    held = 0
    for _, enc in stream.chunks():
        pending.append((enc, stream.weights(enc)))
        held += len(enc)
        if held >= SHUFFLE_ROWS:
            if not fold():
                return None
            held = 0
    if pending and not fold():
        return None
    return table, table_w


def _shuffled(
    stream: LogStream, buffer_rows: int, rng: np.random.Generator, rank: int, world: int
) -> Iterator[tuple[Encoded, int]]:
    """(this rank's training rows, shuffled; all ranks' training rows) per shuffle buffer:
    chunks are gathered until ``buffer_rows`` and permuted together."""
    parts, n_global = [], 0
    for first, enc in stream.chunks("train"):
        rows = np.arange(first, first + len(enc))
        train = np.flatnonzero(~stream.is_val(rows, enc))
        n_global += len(train)
        parts.append(enc.take(train[rows[train] % world == rank]))
        if n_global >= buffer_rows:
            buf = concat(parts)
            yield buf.take(rng.permutation(len(buf))), n_global
            parts, n_global = [], 0
    if parts and n_global:
        buf = concat(parts)
        yield buf.take(rng.permutation(len(buf))), n_global


def _stream_epochs(
    model: RewardModel,
    bound: BoundModel,
    stream: LogStream,
    config: RewardModelConfig,
    buffer_rows: int,
    rank: int,
    world: int,
    progress: bool,
) -> tuple[list[dict], int]:
    """Streamed epochs from the current weights; returns (history, best epoch)."""
    device = resolve_device(config.device)
    model.to(device)
    net: nn.Module = model
    if world > 1:
        if device.type == "cuda":
            set_sparse(model, False)  # NCCL all-reduces dense gradients only
        net = nn.parallel.DistributedDataParallel(model)
    opt = Optimizers(model, config.lr)
    bce = nn.BCEWithLogitsLoss(reduction="none")
    rng = np.random.default_rng([config.seed, 11])
    start_loss, n_val = _val_loss(model, bound, stream, rank, world, device)  # the warm start's
    plateau = Plateau(model, config.patience, start_loss)
    seen = torch.zeros(model.n_elements + 1, dtype=torch.bool, device=device)
    history: list[dict] = []
    for epoch in range(config.epochs):
        model.train()
        total, seen_w, t, c = 0.0, 0.0, time.perf_counter(), time.process_time()
        for buf, n_global in _shuffled(stream, buffer_rows, rng, rank, world):
            steps = max(1, math.ceil(n_global / config.batch_size))  # the same on every rank
            bounds = np.linspace(0, len(buf), steps + 1).astype(int)
            w_all = stream.weights(buf)
            for s in range(steps):
                part = slice(bounds[s], bounds[s + 1])  # views, not copies
                ad, elem, feats, x = (
                    v.to(device)
                    for v in bound._inputs(buf.ads[part], buf.combos[part], buf.ctx[part])
                )
                if epoch == 0:
                    seen[elem.unique()] = True
                y = torch.as_tensor(buf.click[part], device=device)
                w = torch.as_tensor(w_all[part], dtype=torch.float32, device=device)
                # One process: the batch's id rows as small dense leaves (RowStep); DDP
                # all-reduces the tables' sparse gradients instead.
                rows = RowStep(model, ad, elem) if world == 1 else None
                if rows is not None:
                    ad, elem = rows.ad, rows.elem
                try:
                    raw = (bce(net(ad, elem, feats, x), y) * w).sum()
                    total, seen_w = total + float(raw.detach()), seen_w + float(w.sum())
                    loss = raw / w.sum().clamp_min(1e-12)
                    loss = loss + l2_penalty(model, ad, elem, config)
                    opt.zero_grad()
                    loss.backward()
                    opt.step(rows)
                finally:
                    model.row_tables = None
        val_loss, n_val = _val_loss(model, bound, stream, rank, world, device)
        record = {
            "epoch": epoch + 1,
            "train_loss": total / max(seen_w, 1e-12),
            "val_loss": val_loss,
            "val_rows": n_val,
            "seconds": round(time.perf_counter() - t, 2),
            "cpu_seconds": round(time.process_time() - c, 2),
        }
        score = val_loss if n_val else record["train_loss"]
        history.append(record)
        if progress and rank == 0:
            print(f"reward model (streamed) {record}", flush=True)
        if plateau.update(model, opt, score, epoch + 1):
            break
    plateau.best.restore(model)
    with torch.no_grad():
        if world > 1:  # an element is seen when any rank saw it
            seen = seen.to(torch.uint8)
            torch.distributed.all_reduce(seen, op=torch.distributed.ReduceOp.MAX)
        seen[model.n_elements] = False
        model.seen.copy_(seen.bool())
        model.id_main.weight[~model.seen] = 0.0
        model.id_ffm.weight[~model.seen] = 0.0
        if model.d3:
            model.id3.weight[~model.seen] = 0.0
    model.to("cpu")
    model.eval()
    return history, plateau.best_epoch


@torch.no_grad()
def _val_loss(model, bound, stream: LogStream, rank: int, world: int, device) -> tuple[float, int]:
    """Weighted held-out BCE over the whole log (each rank its stride, summed across ranks)
    and the number of held-out rows."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, weight, rows
    bce = nn.BCEWithLogitsLoss(reduction="none")
    for first, enc in stream.chunks("val"):
        rows = np.arange(first, first + len(enc))
        val = np.flatnonzero(stream.is_val(rows, enc))
        val = val[rows[val] % world == rank]
        if not len(val):
            continue
        part = enc.take(val)
        z = model(*(v.to(device) for v in bound._inputs(part.ads, part.combos, part.ctx)))
        y = torch.as_tensor(part.click, device=device)
        sums[0] += bce(z, y).sum().double()  # held-out rows unweighted, as in reward_fit
        sums[1] += len(val)
        sums[2] += len(val)
    if world > 1:
        torch.distributed.all_reduce(sums)
    if sums[1] == 0:  # no held-out rows: the training loss is all there is
        return float("inf"), 0
    return float(sums[0] / sums[1]), int(sums[2])


def fit_reward_log(
    catalog: Catalog,
    path: str,
    config: RewardModelConfig | None = None,
    progress: bool = False,
    init: RewardModel | None = None,
) -> tuple[RewardModel, TrainReport]:
    """The reward model from a Parquet log, by size: read into memory and fitted there when
    it has at most STREAM_MIN_ROWS impressions (faster), else streamed."""
    dataset = open_log(path)
    if dataset.count_rows() <= STREAM_MIN_ROWS:
        frame = dataset.to_table().to_pandas()
        return train_reward_model(catalog, frame, config, progress, init)
    return train_reward_model_stream(catalog, path, config, progress, init)
