"""The ``catalog`` world: a retailer's catalog at scale, written in chunks with bounded memory.

100k products by default, each with its own elements (4-6 components, 10-50 candidates per
component, drawn per ad), features from shared distributions and quality and interaction
styles nonlinear in them, as the ``per_product`` worlds. Nothing is held for the whole
catalog but (n_ads,) arrays: ads are generated in blocks of ``ad_block``, each from its own
seed, so any block can be regenerated alone, and the log is written block by block as a
hive-partitioned Parquet dataset by date (``impressions/date=2026-01-01/part-*.parquet``,
one ``pq.write_table`` per date), at most ``write_rows`` rows in memory at a time.

    logit = base + appeal[a] + sum_k main[e_k] + sum_{k<l} style[e_k] . W[k,l] . style[e_l]

The logging policy is uniform over each ad's legal combinations (each component uniform,
combinations holding the ad's forbidden pair redrawn), so propensity = 1 / n_legal(ad).
Ground truth per element (``truth.parquet``: appeal, main, style_*) and the global weights
(``world.json``) are written next to the data.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from genco.data.contract import AD, CLICK, COMPONENT, ELEMENT, PROPENSITY, TIMESTAMP
from genco.errors import ConfigError
from genco.worlds.config import COMPONENT_NAMES
from genco.worlds.truth import CTR_MAX, CTR_MIN

T0 = 1_767_225_600.0  # 2026-01-01 UTC, as the other worlds
PARTITION = "date"


@dataclass(frozen=True)
class CatalogWorldConfig:
    """Parameters of the ``catalog`` world."""

    n_ads: int = field(default=100_000, metadata={"help": "Products (ads)."})
    n_components: int = field(default=5, metadata={"help": "Components per ad (4-6 typical)."})
    min_candidates: int = field(default=10, metadata={"help": "Fewest candidates per component."})
    max_candidates: int = field(default=50, metadata={"help": "Most candidates per component."})
    n_features: int = field(default=4, metadata={"help": "feat_* columns per element."})
    style_rank: int = field(default=2, metadata={"help": "Rank of the interaction styles."})
    base_logit: float = field(default=-3.2, metadata={"help": "Logit of an average impression."})
    appeal_scale: float = field(default=0.5, metadata={"help": "SD of per-ad appeal."})
    main_scale: float = field(default=0.2, metadata={"help": "SD of element main effects."})
    feature_share: float = field(
        default=0.85, metadata={"help": "Share of main-effect variance explained by features."}
    )
    interaction_scale: float = field(default=0.1, metadata={"help": "SD of a pairwise term."})
    forbid_share: float = field(
        default=0.2, metadata={"help": "Share of ads with one forbidden pair of own elements."}
    )
    popularity_skew: float = field(
        default=0.5, metadata={"help": "Zipf exponent of impressions per ad."}
    )
    days: int = field(default=30, metadata={"help": "Days the log spans (one partition each)."})
    n_impressions: int = field(default=10_000_000, metadata={"help": "Default log size."})
    ad_block: int = field(default=10_000, metadata={"help": "Ads generated together."})
    write_rows: int = field(
        default=1_000_000, metadata={"help": "Log rows generated and written at a time."}
    )

    def __post_init__(self) -> None:
        for name in ("n_ads", "n_features", "style_rank", "days", "ad_block", "write_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 2 <= self.n_components <= len(COMPONENT_NAMES):
            raise ConfigError(
                f"n_components must be in [2, {len(COMPONENT_NAMES)}], got {self.n_components}"
            )
        if not 2 <= self.min_candidates <= self.max_candidates <= 99:
            raise ConfigError(
                "need 2 <= min_candidates <= max_candidates <= 99, got "
                f"{self.min_candidates}, {self.max_candidates}"
            )
        for name in ("feature_share", "forbid_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def components(self) -> tuple[str, ...]:
        return COMPONENT_NAMES[: self.n_components]


@dataclass
class AdBlock:
    """Ads [start, start + n) of the world, all arrays for these ads only.

    sizes (n, K) candidates per component; offsets[k] (n + 1,) into the block's elements of
    component k (ad i's candidates are elements offsets[k][i]..offsets[k][i+1]-1, slot order);
    feats[k] (E_k, F), main[k] (E_k,), style[k] (E_k, R); appeal (n,); forbid (n, 4) int
    (component j, slot of j, component l, slot of l) or -1 rows for ads without a pair.
    """

    start: int
    sizes: np.ndarray
    offsets: list[np.ndarray]
    feats: list[np.ndarray]
    main: list[np.ndarray]
    style: list[np.ndarray]
    appeal: np.ndarray
    forbid: np.ndarray

    @property
    def n(self) -> int:
        return len(self.appeal)

    def n_legal(self) -> np.ndarray:
        """(n,) legal combinations per ad: all of them less those holding the forbidden pair."""
        total = np.prod(self.sizes.astype(np.float64), axis=1)
        has = self.forbid[:, 0] >= 0
        rows = np.flatnonzero(has)
        pair = self.sizes[rows, self.forbid[rows, 0]] * self.sizes[rows, self.forbid[rows, 2]]
        total[rows] -= total[rows] / pair
        return total


class CatalogWorld:
    """The world's global weights and per-block generator (deterministic in config, seed)."""

    def __init__(self, config: CatalogWorldConfig, seed: int) -> None:
        self.config, self.seed = config, seed
        c = config
        rng = np.random.default_rng([seed, 15, 0])
        F, R, hidden = c.n_features, c.style_rank, 8
        K = c.n_components
        self.w1 = rng.normal(size=(K, F, hidden)) / np.sqrt(F)
        self.b1 = rng.normal(size=(K, hidden)) * 0.5
        self.w2 = rng.normal(size=(K, hidden)) / np.sqrt(hidden)
        self.proj = rng.normal(size=(K, F, R)) * 1.5 / np.sqrt(F)
        self.inter = c.interaction_scale / R * rng.normal(size=(K, K, R, R))
        # The quality function's spread over the feature distribution, fixed once so that
        # every block is scaled alike.
        probe = rng.normal(size=(20_000, F))
        self.q_sd = np.array([self._quality(k, probe).std() + 1e-9 for k in range(K)])
        ranks = rng.permutation(c.n_ads)
        pop = 1.0 / (1.0 + ranks) ** c.popularity_skew
        self.popularity = pop / pop.sum()  # (n_ads,)

    def _quality(self, k: int, f: np.ndarray) -> np.ndarray:
        return np.tanh(f @ self.w1[k] + self.b1[k]) @ self.w2[k]

    def block(self, b: int) -> AdBlock:
        """Ads [b * ad_block, ...) drawn from the block's own seed."""
        c = self.config
        start = b * c.ad_block
        n = min(c.ad_block, c.n_ads - start)
        rng = np.random.default_rng([self.seed, 15, 1, b])
        K = c.n_components
        sizes = rng.integers(c.min_candidates, c.max_candidates + 1, size=(n, K))
        offsets, feats, main, style = [], [], [], []
        share = c.feature_share
        for k in range(K):
            offsets.append(np.concatenate([[0], np.cumsum(sizes[:, k])]))
            f = rng.normal(size=(int(offsets[k][-1]), c.n_features))
            noise = rng.normal(size=len(f))
            q = self._quality(k, f) / self.q_sd[k]
            main.append(c.main_scale * (np.sqrt(share) * q + np.sqrt(1 - share) * noise))
            style.append(np.tanh(f @ self.proj[k]) * np.sqrt(2.0))
            feats.append(np.round(f, 4))
        appeal = c.appeal_scale * rng.normal(size=n)
        forbid = np.full((n, 4), -1, np.int64)
        has = np.flatnonzero(rng.random(n) < c.forbid_share)
        if len(has):
            pair = np.sort(np.argsort(rng.random((len(has), K)), axis=1)[:, :2], axis=1)
            forbid[has, 0], forbid[has, 2] = pair[:, 0], pair[:, 1]
            for col, comp in ((1, pair[:, 0]), (3, pair[:, 1])):
                forbid[has, col] = (rng.random(len(has)) * sizes[has, comp]).astype(np.int64)
        return AdBlock(start, sizes, offsets, feats, main, style, appeal, forbid)

    @property
    def n_blocks(self) -> int:
        return -(-self.config.n_ads // self.config.ad_block)

    def logit(self, blk: AdBlock, ads: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """True logits of (n,) block-local ads showing (n, K) slots."""
        c = self.config
        K = c.n_components
        el = [blk.offsets[k][ads] + slots[:, k] for k in range(K)]
        z = c.base_logit + blk.appeal[ads]
        for k in range(K):
            z = z + blk.main[k][el[k]]
        for k in range(K):
            for m in range(k + 1, K):
                sk, sm = blk.style[k][el[k]], blk.style[m][el[m]]
                z = z + np.einsum("nr,rs,ns->n", sk, self.inter[k, m], sm)
        lo, hi = np.log(CTR_MIN / (1 - CTR_MIN)), np.log(CTR_MAX / (1 - CTR_MAX))
        return np.clip(z, lo, hi)

    def log_block(self, blk: AdBlock, n: int, rng: np.random.Generator) -> pa.Table:
        """n impressions of the block's ads from the uniform-over-legal logging policy."""
        c = self.config
        K = c.n_components
        pop = self.popularity[blk.start : blk.start + blk.n]
        ads = rng.choice(blk.n, size=n, p=pop / pop.sum())
        slots = np.zeros((n, K), np.int64)
        todo = np.arange(n)
        while len(todo):  # rejection: uniform over the ad's legal combinations
            a = ads[todo]
            for k in range(K):
                slots[todo, k] = (rng.random(len(todo)) * blk.sizes[a, k]).astype(np.int64)
            f = blk.forbid[a]
            rows = np.arange(len(todo))
            hit = f[:, 0] >= 0
            hit &= slots[todo, np.maximum(f[:, 0], 0)] == f[:, 1]
            hit &= slots[todo, np.maximum(f[:, 2], 0)] == f[:, 3]
            todo = todo[rows[hit]]
        z = self.logit(blk, ads, slots)
        click = (rng.random(n) < 1.0 / (1.0 + np.exp(-z))).astype(np.int8)
        ts = T0 + rng.random(n) * c.days * 86_400
        day = ((ts - T0) // 86_400).astype(np.int32)
        cols: dict[str, pa.Array] = {AD: _ad_ids(blk.start + ads)}
        for k, comp in enumerate(c.components):
            cols[comp] = _element_ids(comp, blk.start + ads, slots[:, k])
        cols[CLICK] = pa.array(click)
        cols[PROPENSITY] = pa.array(1.0 / blk.n_legal()[ads])
        cols[TIMESTAMP] = pa.array(np.round(ts, 3))
        dates = pa.array(np.datetime_as_string(np.datetime64("2026-01-01") + np.arange(c.days)))
        cols[PARTITION] = pc.take(dates, pa.array(day))
        return pa.table(cols)

    def catalog_block(self, blk: AdBlock) -> tuple[pa.Table, pa.Table]:
        """The block's catalog rows (ad, component, element, feat_*) and truth rows."""
        c = self.config
        cat_parts, truth_parts = [], []
        for k, comp in enumerate(c.components):
            sizes = blk.sizes[:, k]
            ad = np.repeat(blk.start + np.arange(blk.n), sizes)
            slot = np.arange(len(ad)) - np.repeat(blk.offsets[k][:-1], sizes)
            ids = {AD: _ad_ids(ad), COMPONENT: pa.array([comp] * len(ad))}
            ids[ELEMENT] = _element_ids(comp, ad, slot)
            feats = {f"feat_{j}": pa.array(blk.feats[k][:, j]) for j in range(c.n_features)}
            cat_parts.append(pa.table({**ids, **feats}))
            truth = {**ids, "appeal": pa.array(np.repeat(blk.appeal, sizes))}
            truth["main"] = pa.array(blk.main[k])
            for r in range(c.style_rank):
                truth[f"style_{r}"] = pa.array(blk.style[k][:, r])
            truth_parts.append(pa.table(truth))
        return pa.concat_tables(cat_parts), pa.concat_tables(truth_parts)

    def constraint_rows(self, blk: AdBlock) -> pa.Table:
        rows = np.flatnonzero(blk.forbid[:, 0] >= 0)
        f = blk.forbid[rows]
        ad = blk.start + rows
        comps = np.array(self.config.components)
        return pa.table(
            {
                AD: _ad_ids(ad),
                "component_a": pa.array(comps[f[:, 0]].tolist(), pa.string()),
                "element_a": _element_ids_mixed(comps[f[:, 0]], ad, f[:, 1]),
                "component_b": pa.array(comps[f[:, 2]].tolist(), pa.string()),
                "element_b": _element_ids_mixed(comps[f[:, 2]], ad, f[:, 3]),
            }
        )


def _ad_ids(ads: np.ndarray) -> pa.Array:
    return pa.array(np.char.add("ad_", np.char.zfill(ads.astype(str), 6)))


def _element_ids(comp: str, ads: np.ndarray, slots: np.ndarray) -> pa.Array:
    """``tit_000123_07``: the ad's own elements, per component."""
    a = np.char.zfill(ads.astype(str), 6)
    s = np.char.zfill(slots.astype(str), 2)
    return pa.array(np.char.add(np.char.add(f"{comp[:3]}_", a), np.char.add("_", s)))


def _element_ids_mixed(comps: np.ndarray, ads: np.ndarray, slots: np.ndarray) -> pa.Array:
    out = [_element_ids(str(c), np.array([a]), np.array([s])) for c, a, s in zip(comps, ads, slots)]
    return pa.array([x[0].as_py() for x in out], pa.string())


@dataclass(frozen=True)
class CatalogOutputs:
    catalog: str  # catalog.parquet
    constraints: str  # constraints.csv
    impressions: str  # impressions/ (hive-partitioned by date)
    truth: str  # truth.parquet
    world: str  # world.json


def _write_partitions(log: pa.Table, root: str, name: str) -> None:
    """The log's rows under ``root/date=D/name``, one Parquet file per date (hive layout,
    the date in the path only). Written with ``pq.write_table``, not ``ds.write_dataset``:
    the dataset writer's threads can abort the process at exit (apache/arrow#36980)."""
    for d in pc.unique(log[PARTITION]).to_pylist():
        part = log.filter(pc.equal(log[PARTITION], d)).drop_columns([PARTITION])
        os.makedirs(os.path.join(root, f"{PARTITION}={d}"), exist_ok=True)
        pq.write_table(part, os.path.join(root, f"{PARTITION}={d}", name))


def simulate_catalog(
    config: CatalogWorldConfig, seed: int, out_dir: str, n_impressions: int | None = None
) -> CatalogOutputs:
    """Write the world's catalog, constraints, truth and log under a local out_dir, a block of
    ads and at most ``write_rows`` log rows at a time."""
    n = config.n_impressions if n_impressions is None else n_impressions
    if n < 1:
        raise ConfigError(f"n_impressions must be >= 1, got {n}")
    world = CatalogWorld(config, seed)
    j = os.path.join
    out = CatalogOutputs(
        j(out_dir, "catalog.parquet"),
        j(out_dir, "constraints.csv"),
        j(out_dir, "impressions"),
        j(out_dir, "truth.parquet"),
        j(out_dir, "world.json"),
    )
    if os.path.exists(out.impressions):
        raise ConfigError(f"{out.impressions}: exists; write a world into a new directory")
    os.makedirs(out.impressions)
    rng = np.random.default_rng([seed, 15, 2])
    pop = world.popularity
    block_share = np.add.reduceat(pop, np.arange(0, config.n_ads, config.ad_block))
    per_block = rng.multinomial(n, block_share / block_share.sum())
    cat_writer = truth_writer = None
    constraints = []
    clicks = 0
    try:
        for b in range(world.n_blocks):
            blk = world.block(b)
            cat, truth = world.catalog_block(blk)
            if cat_writer is None:
                cat_writer = pq.ParquetWriter(out.catalog, cat.schema)
                truth_writer = pq.ParquetWriter(out.truth, truth.schema)
            cat_writer.write_table(cat)
            truth_writer.write_table(truth)
            constraints.append(world.constraint_rows(blk))
            brng = np.random.default_rng([seed, 15, 3, b])
            for i, start in enumerate(range(0, int(per_block[b]), config.write_rows)):
                rows = min(config.write_rows, int(per_block[b]) - start)
                log = world.log_block(blk, rows, brng)
                clicks += int(pc.sum(log[CLICK]).as_py() or 0)
                _write_partitions(log, out.impressions, f"part-{b:04d}-{i:04d}-0.parquet")
    finally:
        for w in (cat_writer, truth_writer):
            if w is not None:
                w.close()
    cons = pa.concat_tables(constraints)
    pacsv.write_csv(cons, out.constraints)
    stats = {
        "world": "catalog",
        "seed": seed,
        "n_ads": config.n_ads,
        "components": list(config.components),
        "catalog_rows": pq.ParquetFile(out.catalog).metadata.num_rows,
        "forbidden_pairs": cons.num_rows,
        "n_impressions": n,
        "clicks": clicks,
        "click_rate": round(clicks / n, 5),
        "files": asdict(out),
        "config": asdict(config),
        "weights": {"inter": world.inter.tolist()},
    }
    with open(out.world, "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=1)
    return out


__all__ = ["CatalogOutputs", "CatalogWorld", "CatalogWorldConfig", "simulate_catalog"]
