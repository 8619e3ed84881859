"""The real AES table (Chen et al., AAAI 2021) as a ground-truth world.

Simulated worlds let us check that the system finds what we planted; this one checks it on
effects nobody planted: 200 legal combinations of one real ad with their measured online CTR,
small and mostly non-additive effects, and a real legality rule (text colours 0-3 only on the
dark background, 4-7 only on the light one). The table *is* the truth, so impressions are drawn
from it and a recommendation is scored by looking its combination up.

Everything is expressed in the data contract (catalog, constraints, impression log) so the rest
of the pipeline cannot tell this world from a simulated one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import pandas as pd

from genco.data import storage
from genco.data.contract import (
    AD,
    ANY_AD,
    CLICK,
    COMPONENT,
    CONSTRAINT_COLUMNS,
    ELEMENT,
    PROPENSITY,
    TIMESTAMP,
    Catalog,
    Constraints,
    code_maps,
)
from genco.data.space import legal_combinations as space_legal_combinations
from genco.errors import ContractError
from genco.worlds.simulate import T0

ENV_AES_CSV = "GENCO_AES_CSV"
AES_AD = "aes"
COMPONENTS = ("background", "picture_size", "text_color", "text_font")
TEMPLATE = "template"
CTR = "ctr"
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def default_aes_path() -> str:
    """Where the table lives: the shared data folder next to the checkout, unless overridden.

    The data is shared between checkouts and must never be copied into the repository, so the
    path points outside it; the environment variable serves other layouts (a pipeline image,
    a gs:// copy).
    """
    return os.environ.get(ENV_AES_CSV) or os.path.normpath(
        os.path.join(_REPO_ROOT, "..", "shared", "data", "aes_online_ctr.csv")
    )


DEFAULT_AES_PATH = default_aes_path()


@dataclass
class TableTruth:
    """True CTR by lookup in the measured table, in the catalog's codes.

    Mirrors ``worlds.simulate.GroundTruth`` (``n_context``, ``ctr``, ``logit``, ``aligned``) so
    evaluation code scores either kind of world the same way. A combination missing from the
    table is illegal, and asking for its CTR is a bug in the caller, so it raises instead of
    returning a made-up value.
    """

    ads: tuple[str, ...]
    components: tuple[str, ...]
    elements: tuple[tuple[str, ...], ...]
    combos: np.ndarray  # (n_legal, K) int64 catalog codes, sorted by key
    ctrs: np.ndarray  # (n_legal,) float64, aligned with combos
    n_context: int = 0
    _strides: np.ndarray = field(init=False, repr=False)
    _dense: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        sizes = np.array([len(e) for e in self.elements], dtype=np.int64)
        # Mixed-radix keys make the lookup one fancy-index into a dense array (NaN = illegal),
        # which stays tiny for a table of this kind (5 * 8 * 5 * 2 cells here).
        self._strides = np.concatenate([np.cumprod(sizes[::-1])[::-1][1:], [1]]).astype(np.int64)
        self._dense = np.full(int(np.prod(sizes)), np.nan)
        keys = self.combos @ self._strides
        if len(np.unique(keys)) != len(keys):
            raise ContractError("the truth table lists a combination twice")
        order = np.argsort(keys)
        self.combos, self.ctrs = self.combos[order], self.ctrs[order]
        self._dense[keys[order]] = self.ctrs

    @staticmethod
    def from_frame(df: pd.DataFrame, catalog: Catalog, path: str = "truth") -> TableTruth:
        """Build from a table with one column per component (element ids) and ``ctr``."""
        missing = [c for c in (*catalog.components, CTR) if c not in df.columns]
        if missing:
            raise ContractError(f"{path}: missing column '{missing[0]}'")
        # Values are read as text; one row of the published table has trailing blanks.
        ctr = pd.to_numeric(df[CTR].astype("string").str.strip(), errors="coerce").to_numpy(
            dtype=np.float64, na_value=np.nan
        )
        bad = ~((ctr > 0) & (ctr < 1))
        if bad.any():
            row = int(np.flatnonzero(bad)[0]) + 1
            raise ContractError(
                f"{path}: row {row}: ctr '{df[CTR].iloc[row - 1]}' is not in (0, 1)"
            )
        combos = np.zeros((len(df), catalog.n_components), dtype=np.int64)
        for k, comp in enumerate(catalog.components):
            ids = df[comp].astype("string").str.strip()
            for i, v in enumerate(ids):
                if pd.isna(v) or not catalog.has_element(k, v):
                    raise ContractError(f"{path}: row {i + 1}: {comp} '{v}' is not in the catalog")
                combos[i, k] = catalog.element_code(k, v)
        return TableTruth(catalog.ads, catalog.components, catalog.elements, combos, ctr)

    def keys(self, combos: np.ndarray) -> np.ndarray:
        """One int64 key per combination (mixed radix over the vocabularies)."""
        return np.asarray(combos, dtype=np.int64) @ self._strides

    def ids(self, combo: np.ndarray) -> list[str]:
        """A combination's element ids; out-of-range codes show as ``#code``."""
        return [
            self.elements[k][int(e)] if 0 <= e < len(self.elements[k]) else f"#{int(e)}"
            for k, e in enumerate(combo)
        ]

    def describe(self, combo: np.ndarray) -> str:
        """``background=0, picture_size=4, ...``: a combination in ids, for messages."""
        return ", ".join(f"{c}={e}" for c, e in zip(self.components, self.ids(combo)))

    def ctr(self, ads: np.ndarray, combos: np.ndarray, ctx: np.ndarray | None = None) -> np.ndarray:
        """True CTR of each (ad, combination); ``ctx`` is accepted for parity and ignored."""
        ads = np.asarray(ads, dtype=np.int64)
        combos = np.asarray(combos, dtype=np.int64)
        if combos.ndim != 2 or combos.shape != (len(ads), len(self.components)):
            raise ContractError(
                f"expected combos of shape ({len(ads)}, {len(self.components)}), got {combos.shape}"
            )
        wrong_ad = (ads < 0) | (ads >= len(self.ads))
        if wrong_ad.any():
            self._check_ad(int(ads[wrong_ad][0]))
        sizes = np.array([len(e) for e in self.elements])
        in_range = np.all((combos >= 0) & (combos < sizes), axis=1)
        out = np.full(len(ads), np.nan)
        out[in_range] = self._dense[combos[in_range] @ self._strides]
        illegal = np.isnan(out)
        if illegal.any():
            i = int(np.flatnonzero(illegal)[0])
            raise ContractError(
                f"combination ({self.describe(combos[i])}) is not in the AES table: it is "
                f"illegal ({int(illegal.sum())} of {len(ads)} asked combinations are)"
            )
        return out

    def logit(
        self, ads: np.ndarray, combos: np.ndarray, ctx: np.ndarray | None = None
    ) -> np.ndarray:
        """Log-odds of ``ctr``, for code that compares worlds on the simulator's scale."""
        p = self.ctr(ads, combos, ctx)
        return np.log(p / (1.0 - p))

    def _check_ad(self, ad: int) -> None:
        if not 0 <= ad < len(self.ads):
            raise ContractError(f"ad code {ad} is not in this world (it has {len(self.ads)} ad)")

    def legal_combinations(self, ad: int = 0) -> np.ndarray:
        """The table's combinations (n_legal, K) in catalog codes: legal is what was measured."""
        self._check_ad(ad)
        return self.combos.copy()

    def best(self, ad: int = 0) -> tuple[np.ndarray, float]:
        """The best legal combination and its true CTR: the oracle a recommendation is held to."""
        self._check_ad(ad)
        i = int(np.argmax(self.ctrs))
        return self.combos[i].copy(), float(self.ctrs[i])

    def aligned(self, catalog: Catalog) -> tuple[np.ndarray, list[np.ndarray]]:
        """Maps from another catalog's codes (same ids, e.g. re-read from disk) to these codes."""
        return code_maps(self.ads, self.components, self.elements, catalog)

    def to_frame(self) -> pd.DataFrame:
        """The table in contract terms (element ids + ctr), enough to rebuild this truth."""
        data: dict[str, object] = {
            c: np.asarray(self.elements[k], dtype=object)[self.combos[:, k]]
            for k, c in enumerate(self.components)
        }
        data[CTR] = self.ctrs
        return pd.DataFrame(data)


@dataclass
class AesWorld:
    """The AES table as a world: the contract inputs plus the truth to score against."""

    catalog: Catalog
    constraints: Constraints
    truth: TableTruth
    n_legal: int


def _code_order(value: str) -> tuple[int, int, str]:
    # The table's codes are small integers; numeric order keeps "10" after "9" and makes
    # catalog codes equal to the published codes.
    return (0, int(value), value) if value.isdigit() else (1, 0, value)


def _read_table(path: str) -> pd.DataFrame:
    df = storage.read_table(path, dtype={c: "str" for c in (TEMPLATE, *COMPONENTS, CTR)})
    missing = [c for c in (TEMPLATE, *COMPONENTS, CTR) if c not in df.columns]
    if missing:
        raise ContractError(f"{path}: missing column '{missing[0]}'")
    for c in (TEMPLATE, *COMPONENTS):
        df[c] = df[c].astype("string").str.strip()
        empty = df[c].isna() | (df[c] == "")
        if empty.any():
            raise ContractError(f"{path}: row {int(np.flatnonzero(empty)[0]) + 1}: '{c}' is empty")
    # One template only, so it is no choice at all: as a component it would be a constant
    # column that every model must learn to ignore. Refuse a table where it would matter.
    templates = df[TEMPLATE].unique()
    if len(templates) != 1:
        raise ContractError(
            f"{path}: column '{TEMPLATE}' has {len(templates)} values "
            f"({', '.join(map(str, templates))}); this world supports exactly one"
        )
    return df


def _catalog(df: pd.DataFrame, path: str) -> Catalog:
    rows = [
        (AES_AD, comp, e) for comp in COMPONENTS for e in sorted(df[comp].unique(), key=_code_order)
    ]
    return Catalog.from_frame(pd.DataFrame(rows, columns=[AD, COMPONENT, ELEMENT]), path)


def _derive_constraints(df: pd.DataFrame, catalog: Catalog, path: str) -> Constraints:
    """Forbid every element pair that no measured combination shows.

    The table lists all legal combinations, so a pair it never shows can only be illegal. For
    this data that finds exactly the (background, text_color) rule; other component pairs all
    co-occur. Deriving rather than hard-coding the rule keeps it tied to the file actually read.
    """
    rows = []
    for ca, cb in combinations(COMPONENTS, 2):
        seen = set(zip(df[ca], df[cb]))
        ka, kb = catalog.components.index(ca), catalog.components.index(cb)
        for ea in catalog.elements[ka]:
            for eb in catalog.elements[kb]:
                if (ea, eb) not in seen:
                    rows.append((ANY_AD, ca, ea, cb, eb))
    if not rows:
        return Constraints.empty()
    return Constraints.from_frame(
        pd.DataFrame(rows, columns=list(CONSTRAINT_COLUMNS)), catalog, path
    )


def load_aes_world(path: str = DEFAULT_AES_PATH) -> AesWorld:
    """Read the AES table into catalog, constraints and truth, checking they agree exactly.

    The pair constraints are the only legality rule the contract can express, so the world is
    only faithful if they admit exactly the measured combinations: a table with a hole that no
    pair rule explains is refused rather than letting the logger show an unmeasured combination.
    """
    df = _read_table(path)
    catalog = _catalog(df, path)
    constraints = _derive_constraints(df, catalog, path)
    truth = TableTruth.from_frame(df[[*COMPONENTS, CTR]], catalog, path)
    legal = space_legal_combinations(catalog, constraints, 0)
    unmeasured = ~np.isin(truth.keys(legal), truth.keys(truth.combos))
    if unmeasured.any() or len(legal) != len(truth.combos):
        raise ContractError(
            f"{path}: the derived constraints allow {len(legal)} combinations but the table has "
            f"{len(truth.combos)}"
            + (
                f"; e.g. ({truth.describe(legal[unmeasured][0])}) is allowed but unmeasured"
                if unmeasured.any()
                else ""
            )
        )
    return AesWorld(catalog, constraints, truth, n_legal=len(truth.combos))


def log_uniform(world: AesWorld, n: int, seed: int) -> pd.DataFrame:
    """Impressions from the uniform logging policy over the legal combinations.

    Uniform logging is the cleanest test of learning from clicks alone: every combination gets
    the same exposure and the propensity is the exact constant 1 / n_legal. Columns and dtypes
    match ``genco.worlds.simulate.log_impressions``.
    """
    if n < 1:
        raise ContractError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng([seed, 7])
    cat, truth = world.catalog, world.truth
    combos = truth.combos[rng.integers(world.n_legal, size=n)]
    ads = np.zeros(n, dtype=np.int64)
    click = (rng.random(n) < truth.ctr(ads, combos)).astype(np.int8)
    ts = T0 + np.sort(rng.random(n)) * 30 * 86_400
    data: dict[str, object] = {AD: cat.ads.take(ads)}
    for k, comp in enumerate(cat.components):
        data[comp] = cat.elements[k].take(combos[:, k])
    data[CLICK] = click
    data[PROPENSITY] = np.full(n, 1.0 / world.n_legal)
    data[TIMESTAMP] = np.round(ts, 6)
    return pd.DataFrame(data)


def load_truth(path: str, catalog: Catalog) -> TableTruth:
    """Read a ``truth.csv`` written by ``write_aes_world`` back, to re-score a finished run."""
    dtype = {c: "str" for c in (*catalog.components, CTR)}
    return TableTruth.from_frame(storage.read_table(path, dtype=dtype), catalog, path)


def write_aes_world(
    out_dir: str,
    n_impressions: int = 2_000_000,
    seed: int = 0,
    path: str = DEFAULT_AES_PATH,
    impressions_format: str = "parquet",
) -> dict[str, str]:
    """Write the AES world in the layout ``worlds.simulate.simulate`` uses, plus ``truth.csv``.

    The truth goes out as a plain table rather than the simulator's parameter file, because
    here the table is the whole truth and a person can read it.
    """
    if impressions_format not in ("csv", "parquet"):
        raise ContractError(
            f"impressions_format must be 'csv' or 'parquet', got '{impressions_format}'"
        )
    world = load_aes_world(path)
    j = storage.join
    files = {
        "catalog": j(out_dir, "catalog.csv"),
        "constraints": j(out_dir, "constraints.csv"),
        "impressions": j(out_dir, f"impressions.{impressions_format}"),
        "contexts": j(out_dir, "contexts.csv"),
        "truth": j(out_dir, "truth.csv"),
        "world": j(out_dir, "world.json"),
    }
    storage.makedirs(out_dir)
    storage.write_table(world.catalog.to_arrow(), files["catalog"])
    storage.write_table(world.constraints.to_frame(world.catalog), files["constraints"])
    log = log_uniform(world, n_impressions, seed)
    storage.write_table(log, files["impressions"])
    storage.write_table(pd.DataFrame({AD: list(world.catalog.ads)}), files["contexts"])
    storage.write_table(world.truth.to_frame(), files["truth"])
    best_combo, best_ctr = world.truth.best()
    stats = {
        "world": "aes",
        "source": path,
        "seed": seed,
        "n_ads": world.catalog.n_ads,
        "components": list(world.catalog.components),
        "elements_per_component": [len(e) for e in world.catalog.elements],
        "n_legal": world.n_legal,
        "forbidden_pairs": len(world.constraints),
        "table_mean_ctr": round(float(world.truth.ctrs.mean()), 6),
        "best_ctr": best_ctr,
        "best_combination": dict(zip(world.catalog.components, world.truth.ids(best_combo))),
        "n_impressions": n_impressions,
        "clicks": int(log[CLICK].sum()),
        "click_rate": round(float(log[CLICK].mean()), 5),
        "files": files,
    }
    storage.write_json(files["world"], stats)
    return files


__all__ = [
    "AES_AD",
    "COMPONENTS",
    "DEFAULT_AES_PATH",
    "ENV_AES_CSV",
    "AesWorld",
    "TableTruth",
    "default_aes_path",
    "load_aes_world",
    "load_truth",
    "log_uniform",
    "write_aes_world",
]
