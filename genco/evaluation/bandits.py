"""Online peers for the closed loop, served the same requests as GenCO.

* ``UniformPeer``: every legal combination of the ad equally often.
* ``ElementThompson``: per-element Thompson sampling, what AES and most production creative
  systems run: a Beta(1, 1) posterior per (ad, component, element) on the click rate of
  impressions showing it; each request draws every element's rate and shows, per component,
  the element with the highest draw (when that combination breaks a constraint: the legal
  combination with the highest sum of log draws). It ignores the context.
* ``ComboThompson``: Thompson sampling per (ad, legal combination), a Beta(1, 1) posterior on
  each combination's own click rate, nothing shared between combinations or ads: the
  textbook bandit over the whole space, what GenCO's structure has to beat when combinations
  are many and traffic per combination is thin.
* ``genco.evaluation.bandits_vw.VWOnline`` (needs ``genco[bench]``): Vowpal Wabbit
  ``--cb_explore_adf --squarecb`` (SquareCB exploration on VW's own regression,
  ``--cb_type mtr``), every legal combination of the ad one action, with the namespaces and
  interactions of ``genco.evaluation.baselines_vw`` (ad, context, one namespace per
  component with element id and ``feat_*``). It learns from every impression online; its
  action distribution is asked once per (ad, ctx_0) and batch of requests (the loop's
  ``chunks``), because asking for ~1,300 actions on each of 100k requests would take hours
  on two cores; in contextual worlds that query uses ctx_1 = 0 (noise in these worlds).

Each peer: ``choose(ads, ctx, rng) -> (combos (n, K), propensity (n,))`` and
``update(ads, ctx, combos, clicks, propensity)``.
"""

from __future__ import annotations

import numpy as np

from genco.data.contract import Catalog, Constraints


class UniformPeer:
    name = "uniform"

    def __init__(self, legal: list[np.ndarray]) -> None:
        self.legal = legal

    def choose(self, ads: np.ndarray, ctx: np.ndarray | None, rng: np.random.Generator):
        combos = np.zeros((len(ads), self.legal[0].shape[1]), dtype=np.int64)
        prop = np.zeros(len(ads))
        for a in np.unique(ads):
            rows = np.flatnonzero(ads == a)
            combos[rows] = self.legal[a][rng.integers(len(self.legal[a]), size=len(rows))]
            prop[rows] = 1.0 / len(self.legal[a])
        return combos, prop

    def update(self, ads, ctx, combos, clicks, propensity) -> None:
        return None


class ElementThompson:
    name = "element_ts"

    def __init__(self, catalog: Catalog, constraints: Constraints, legal: list[np.ndarray]):
        self.catalog, self.constraints, self.legal = catalog, constraints, legal
        K = catalog.n_components
        sizes = [len(catalog.elements[k]) for k in range(K)]
        self.alpha = [np.ones((catalog.n_ads, s)) for s in sizes]
        self.beta = [np.ones((catalog.n_ads, s)) for s in sizes]
        # (n_ads, n_elements_k): which elements are the ad's candidates
        self.allowed = [np.zeros((catalog.n_ads, s), dtype=bool) for s in sizes]
        for a in range(catalog.n_ads):
            for k in range(K):
                self.allowed[k][a, catalog.candidates[a][k]] = True

    def choose(self, ads: np.ndarray, ctx: np.ndarray | None, rng: np.random.Generator):
        K = self.catalog.n_components
        draws = []
        combos = np.zeros((len(ads), K), dtype=np.int64)
        for k in range(K):
            theta = rng.beta(self.alpha[k][ads], self.beta[k][ads])  # (n, n_elements_k)
            theta[~self.allowed[k][ads]] = -1.0
            combos[:, k] = theta.argmax(1)
            draws.append(theta)
        if len(self.constraints):
            bad = np.flatnonzero(self.constraints.violations(ads, combos) >= 0)
            for i in bad:
                legal = self.legal[ads[i]]
                score = sum(np.log(draws[k][i, legal[:, k]]) for k in range(K))
                combos[i] = legal[int(np.argmax(score))]
        return combos, np.full(len(ads), np.nan)  # a TS propensity has no closed form

    def update(self, ads, ctx, combos, clicks, propensity) -> None:
        for k in range(self.catalog.n_components):
            np.add.at(self.alpha[k], (ads, combos[:, k]), clicks)
            np.add.at(self.beta[k], (ads, combos[:, k]), 1 - clicks)


class ComboThompson:
    name = "combo_ts"

    def __init__(self, legal: list[np.ndarray]) -> None:
        self.legal = legal
        self.alpha = [np.ones(len(rows)) for rows in legal]
        self.beta = [np.ones(len(rows)) for rows in legal]
        # Each ad's legal rows by a mixed-radix key, to find a shown combination's row.
        self.radix = [rows.max(0) + 1 for rows in legal]
        keys = [self._key(a, rows) for a, rows in enumerate(legal)]
        self.order = [np.argsort(k) for k in keys]
        self.keys = [k[o] for k, o in zip(keys, self.order, strict=True)]

    def _key(self, a: int, combos: np.ndarray) -> np.ndarray:
        stride = np.cumprod(np.concatenate([[1], self.radix[a][:0:-1]]))[::-1]
        return combos @ stride

    def choose(self, ads: np.ndarray, ctx: np.ndarray | None, rng: np.random.Generator):
        combos = np.zeros((len(ads), self.legal[0].shape[1]), dtype=np.int64)
        for a in np.unique(ads):
            rows = np.flatnonzero(ads == a)
            for part in np.array_split(rows, max(1, len(rows) * len(self.legal[a]) // 4_000_000)):
                theta = rng.beta(self.alpha[a], self.beta[a], size=(len(part), len(self.alpha[a])))
                combos[part] = self.legal[a][theta.argmax(1)]
        return combos, np.full(len(ads), np.nan)  # a TS propensity has no closed form

    def update(self, ads, ctx, combos, clicks, propensity) -> None:
        for a in np.unique(ads):
            rows = np.flatnonzero(ads == a)
            at = self.order[a][np.searchsorted(self.keys[a], self._key(a, combos[rows]))]
            np.add.at(self.alpha[a], at, clicks[rows])
            np.add.at(self.beta[a], at, 1 - clicks[rows])
