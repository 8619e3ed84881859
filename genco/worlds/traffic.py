"""Live traffic from a world with ground truth: what the closed-loop simulation serves.

A ``Traffic`` draws the requests of a round (ad by the world's popularity, context as the
world draws it), gives the true CTR of any shown combination, and the oracle: the best legal
combination per request by true CTR. Simulated presets (``genco.worlds.config``) and the
measured AES table (``aes``: one ad, no context) both qualify.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from genco.data.contract import Catalog, Constraints
from genco.data.space import legal_combinations
from genco.errors import ConfigError
from genco.worlds.aes import load_aes_world
from genco.worlds.config import WORLDS, world_config
from genco.worlds.simulate import make_world, sample_contexts

AES = "aes"
NAMES = (*WORLDS, AES)


@dataclass
class Traffic:
    name: str
    catalog: Catalog
    constraints: Constraints
    truth: object  # GroundTruth or TableTruth, both in this catalog's codes
    popularity: np.ndarray  # (n_ads,)
    context_columns: tuple[str, ...]
    legal: list[np.ndarray] = field(default_factory=list)  # per ad (n_legal, K) codes
    _oracle: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.legal = [
            legal_combinations(self.catalog, self.constraints, a) for a in range(self.catalog.n_ads)
        ]

    def requests(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        """n requests: ad codes (n,) and contexts (n, n_ctx) or None."""
        ads = rng.choice(self.catalog.n_ads, size=n, p=self.popularity)
        ctx = sample_contexts(self.truth, n, rng) if self.context_columns else None
        return ads, ctx

    def ctr(self, ads: np.ndarray, combos: np.ndarray, ctx: np.ndarray | None) -> np.ndarray:
        return self.truth.ctr(ads, combos, ctx)

    def uniform(self, ads: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Uniform over each ad's legal combinations: codes (n, K) and exact propensities."""
        combos = np.zeros((len(ads), self.catalog.n_components), dtype=np.int64)
        prop = np.zeros(len(ads))
        for a in np.unique(ads):
            rows = np.flatnonzero(ads == a)
            legal = self.legal[a]
            combos[rows] = legal[rng.integers(len(legal), size=len(rows))]
            prop[rows] = 1.0 / len(legal)
        return combos, prop

    def oracle(self, ads: np.ndarray, ctx: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The best legal combination of each request (codes (n, K)) and its true CTR (n,).

        The context enters the truth as an additive appeal plus ctx_0's flip of element
        effects, so the best combination depends on (ad, ctx_0) only; its CTR on the row's
        whole context."""
        flip = np.zeros(len(ads), np.int64) if ctx is None else (ctx[:, 0] > 0.5).astype(np.int64)
        best = np.zeros((len(ads), self.catalog.n_components), dtype=np.int64)
        for key in np.unique(ads * 2 + flip):
            a, f = int(key // 2), int(key % 2)
            if (a, f) not in self._oracle:
                legal = self.legal[a]
                c = None if ctx is None else np.tile([float(f), 0.0], (len(legal), 1))
                z = self.ctr(np.full(len(legal), a), legal, c)
                self._oracle[(a, f)] = legal[int(np.argmax(z))]
            best[(ads == a) & (flip == f)] = self._oracle[(a, f)]
        return best, self.ctr(ads, best, ctx)


def load_traffic(name: str, seed: int) -> Traffic:
    """A world by name (a simulated preset, drawn with ``seed``, or ``aes``)."""
    if name == AES:
        w = load_aes_world()
        return Traffic(AES, w.catalog, w.constraints, w.truth, np.ones(1), ())
    if name not in WORLDS:
        raise ConfigError(f"unknown world '{name}'; choose one of: {', '.join(NAMES)}")
    config = world_config(name)
    w = make_world(config, seed)
    ctx_cols = ("ctx_0", "ctx_1") if w.truth.n_context else ()
    return Traffic(name, w.catalog, w.constraints, w.truth, w.popularity, ctx_cols)
