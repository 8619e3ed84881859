"""Vowpal Wabbit online with SquareCB exploration: a peer of the closed loop
(``genco.evaluation.bandits`` says how it is run)."""

from __future__ import annotations

import itertools

import numpy as np
import vowpalwabbit

from genco.data.contract import Catalog
from genco.evaluation.baselines_vw import (
    AD_NS,
    COMPONENT_NS,
    CONTEXT_NS,
    VWConfig,
    _fmt,
    expand_interactions,
)


class VWOnline:
    name = "vw_squarecb"

    def __init__(
        self,
        catalog: Catalog,
        legal: list[np.ndarray],
        n_context: int,
        gamma_scale: float = 10.0,
        config: VWConfig | None = None,
    ) -> None:
        self.catalog, self.legal, self.n_context = catalog, legal, n_context
        cfg = config or VWConfig()
        groups = (
            cfg.interactions
            if n_context
            else tuple(g for g in cfg.interactions if CONTEXT_NS not in g)
        )
        inter = expand_interactions(groups, catalog.n_components)
        self.args = " ".join(
            [
                "--cb_explore_adf --squarecb --gamma_scale",
                _fmt(gamma_scale),
                "--cb_type mtr --quiet -b",
                str(cfg.bits),
                "-l",
                _fmt(cfg.learning_rate),
                "--random_seed",
                str(cfg.seed),
                *itertools.chain.from_iterable(("--interactions", i) for i in inter),
            ]
        )
        self.ws = vowpalwabbit.Workspace(self.args, enable_logging=False)
        self._segments = [
            [
                " ".join(
                    [f"|{COMPONENT_NS[k]} e{e}"]
                    + [f"f{j}:{_fmt(v)}" for j, v in enumerate(catalog.features[k][e]) if v]
                )
                for e in range(len(catalog.elements[k]))
            ]
            for k in range(catalog.n_components)
        ]
        self._actions = [[self._action(c) for c in legal[a]] for a in range(catalog.n_ads)]

    def _action(self, combo: np.ndarray) -> str:
        return " ".join(self._segments[k][e] for k, e in enumerate(combo))

    def _shared(self, ad: int, x: np.ndarray | None) -> str:
        out = f"shared |{AD_NS} a{ad}"
        if x is not None and len(x):
            out += f" |{CONTEXT_NS} " + " ".join(f"c{j}:{_fmt(v)}" for j, v in enumerate(x))
        return out

    def choose(self, ads: np.ndarray, ctx: np.ndarray | None, rng: np.random.Generator):
        K = self.catalog.n_components
        combos = np.zeros((len(ads), K), dtype=np.int64)
        prop = np.zeros(len(ads))
        flip = np.zeros(len(ads), np.int64) if ctx is None else (ctx[:, 0] > 0.5).astype(np.int64)
        for key in np.unique(ads * 2 + flip):
            a, f = int(key // 2), int(key % 2)
            rows = np.flatnonzero((ads == a) & (flip == f))
            x = None if ctx is None else np.array([float(f)] + [0.0] * (ctx.shape[1] - 1))
            pmf = np.asarray(self.ws.predict([self._shared(a, x), *self._actions[a]]), float)
            pmf = pmf / pmf.sum()
            pick = rng.choice(len(pmf), size=len(rows), p=pmf)
            combos[rows] = self.legal[a][pick]
            prop[rows] = pmf[pick]
        return combos, prop

    def update(self, ads, ctx, combos, clicks, propensity) -> None:
        for i in range(len(ads)):
            x = None if ctx is None else ctx[i]
            self.ws.learn(
                [
                    self._shared(int(ads[i]), x),
                    f"0:{_fmt(-float(clicks[i]) + 0.0)}:{_fmt(max(propensity[i], 1e-6))} "
                    + self._action(combos[i]),
                ]
            )

    def close(self) -> None:
        self.ws.finish()
