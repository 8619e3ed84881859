"""Batch recommendation at catalog scale: every ad of a shard (or every context row of it),
decoded a chunk of ads at a time (``genco.inference.chunked``) and written as it goes.

A shard ``i/n`` is the i-th of n contiguous blocks of the catalog's ads, so n workers (the
pipeline's ``ParallelFor``, or n ``genco recommend --shard i/n``) split the catalog with no
overlap and no coordination. Within a shard the models are folded for a block of ads at once
and each ad's tables serve all of its context rows; memory is one chunk of output plus one
block's tables (``chunked.FOLD_BYTES``), whatever the catalog's size.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from genco.data import storage
from genco.data.contract import AD
from genco.errors import ConfigError, UnknownIdError
from genco.inference.chunked import decode_rows
from genco.inference.predictor import Predictor

CHUNK_ADS = 1024
_SHARD = re.compile(r"^(\d+)/(\d+)$")


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n; ConfigError naming the value otherwise."""
    m = _SHARD.match(text.strip())
    if m is None or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ConfigError(f"shard must be 'i/n' with 0 <= i < n, got '{text}'")
    return int(m.group(1)), int(m.group(2))


def shard_range(n_ads: int, index: int, count: int) -> range:
    """Ad codes of shard ``index`` of ``count``: contiguous, sizes differing by at most 1."""
    if not 0 <= index < count:
        raise ConfigError(f"shard must be 'i/n' with 0 <= i < n, got '{index}/{count}'")
    return range(index * n_ads // count, (index + 1) * n_ads // count)


@dataclass(frozen=True)
class BatchSummary:
    """What one shard wrote: its rows, the inputs decoded (ads, or context rows), the
    distinct ads among them and the wall time."""

    out: str
    shard: str
    inputs: int
    ads: int
    rows: int
    seconds: float

    @property
    def inputs_per_second(self) -> float:
        return self.inputs / self.seconds if self.seconds > 0 else float("nan")


@dataclass(frozen=True)
class _Plan:
    """The shard's inputs grouped by ad: ad codes (n,), contexts (n, C) float64 or None, and
    the model's context column names."""

    codes: np.ndarray
    x: np.ndarray | None
    columns: tuple[str, ...]


def _plan(predictor: Predictor, shard: tuple[int, int], contexts: pd.DataFrame | None) -> _Plan:
    ads = shard_range(predictor.catalog.n_ads, *shard)
    want = tuple(predictor.context_columns)
    if contexts is None:
        if want:
            raise ConfigError(
                f"the model needs context columns ({', '.join(want)}): pass --contexts"
            )
        return _Plan(np.arange(ads.start, ads.stop), None, ())
    if AD not in contexts.columns:
        raise ConfigError("contexts: missing required column 'ad_id'")
    missing = [c for c in want if c not in contexts.columns]
    if missing:
        raise ConfigError(f"contexts: missing column '{missing[0]}' the model needs")
    ids = contexts[AD].astype(str)
    codes = predictor.catalog.ads.codes(ids.to_numpy(dtype=object))
    if (codes < 0).any():
        row = int(np.flatnonzero(codes < 0)[0])
        raise UnknownIdError(
            f"contexts: row {row + 1}: ad_id '{ids.iloc[row]}' is not in the catalog"
        )
    x = None
    if want:
        x = contexts[list(want)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
        bad = ~np.isfinite(x)
        if bad.any():
            row, col = (int(v[0]) for v in np.nonzero(bad))
            raise ConfigError(
                f"contexts: row {row + 1}: {want[col]} '{contexts[want[col]].iloc[row]}' "
                "is not a finite number"
            )
    keep = np.flatnonzero((codes >= ads.start) & (codes < ads.stop))
    keep = keep[np.argsort(codes[keep], kind="stable")]  # grouped by ad, input order within
    return _Plan(codes[keep], None if x is None else x[keep], want)


def _schema(predictor: Predictor, plan: _Plan) -> pa.Schema:
    fields = [pa.field(AD, pa.string())]
    fields += [pa.field(c, pa.float64()) for c in plan.columns]
    fields.append(pa.field("rank", pa.int64()))
    fields += [pa.field(c, pa.string()) for c in predictor.catalog.components]
    fields.append(pa.field("score", pa.float64()))
    return pa.schema(fields)


def _chunks(predictor: Predictor, plan: _Plan, top_k: int, chunk_ads: int) -> Iterator[pa.Table]:
    if chunk_ads < 1:
        raise ConfigError(f"chunk_ads must be >= 1, got {chunk_ads}")
    cat = predictor.catalog
    schema = _schema(predictor, plan)
    ad_ids = cat.ads.array
    vocab = [v.array for v in cat.elements]
    x32 = None if plan.x is None else plan.x.astype(np.float32)
    # Chunk boundaries fall between ads, so an ad's context rows share one chunk.
    edges = np.flatnonzero(np.diff(plan.codes)) + 1
    starts = [0]
    for e in edges:
        if plan.codes[e] - plan.codes[starts[-1]] >= chunk_ads:
            starts.append(int(e))
    for lo, hi in zip(starts, [*starts[1:], len(plan.codes)]):
        if lo == hi:
            continue
        x = None if x32 is None else x32[lo:hi]
        decoded = decode_rows(predictor, plan.codes[lo:hi], x, top_k)
        src = [np.full(len(c), lo + i) for i, (c, _) in enumerate(decoded)]
        picks = [c for c, _ in decoded]
        scores = [s for _, s in decoded]
        take = np.concatenate(src)
        combo = np.concatenate(picks)
        cols: list[pa.Array] = [pc.take(ad_ids, pa.array(plan.codes[take]))]
        cols += [pa.array(plan.x[take, j]) for j in range(len(plan.columns))]
        cols.append(pa.array(np.concatenate([np.arange(1, len(s) + 1) for s in scores])))
        cols += [pc.take(vocab[k], pa.array(combo[:, k])) for k in range(cat.n_components)]
        cols.append(pa.array(np.concatenate(scores).astype(np.float64)))
        yield pa.Table.from_arrays(cols, schema=schema)


def iter_recommendations(
    predictor: Predictor,
    top_k: int = 1,
    shard: tuple[int, int] = (0, 1),
    contexts: pd.DataFrame | None = None,
    chunk_ads: int = CHUNK_ADS,
) -> Iterator[pa.Table]:
    """Recommendations of one shard in the contract format (``ad_id``, the model's ``ctx_*``,
    ``rank``, one column per component, ``score``), a table per chunk of about ``chunk_ads``
    ads. Every ad of the shard, or (with ``contexts``) every context row of its ads."""
    yield from _chunks(predictor, _plan(predictor, shard, contexts), top_k, chunk_ads)


def write_recommendations(
    predictor: Predictor,
    out: str,
    top_k: int = 1,
    shard: tuple[int, int] = (0, 1),
    contexts: pd.DataFrame | None = None,
    chunk_ads: int = CHUNK_ADS,
    client=None,
) -> BatchSummary:
    """Stream one shard's recommendations to ``out`` (.parquet: a row group per chunk; .csv),
    written atomically: readers see the whole file or none."""
    fmt = storage.table_format(out)
    if out.lower().endswith(".gz"):
        raise ConfigError(f"{out}: write recommendations as .csv or .parquet")
    t0 = time.perf_counter()
    plan = _plan(predictor, shard, contexts)
    schema = _schema(predictor, plan)
    rows = 0
    with storage.atomic_local_path(out, client=client, suffix=f".{fmt}") as tmp:
        open_writer = pq.ParquetWriter if fmt == "parquet" else pacsv.CSVWriter
        with open_writer(tmp, schema) as writer:
            for table in _chunks(predictor, plan, top_k, chunk_ads):
                writer.write_table(table)
                rows += table.num_rows
    seconds = time.perf_counter() - t0
    n_ads = len(np.unique(plan.codes))
    return BatchSummary(out, f"{shard[0]}/{shard[1]}", len(plan.codes), n_ads, rows, seconds)


__all__ = [
    "CHUNK_ADS",
    "BatchSummary",
    "iter_recommendations",
    "parse_shard",
    "shard_range",
    "write_recommendations",
]
