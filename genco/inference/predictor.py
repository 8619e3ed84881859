"""The predictor: one object that turns a bundle into recommendations.

The CLI's ``recommend``, the pipeline's evaluation and the TorchServe handler all call it.
Modes: ``beam`` (the best combinations: generator beam search re-ranked by the reward model),
``sample`` (exploration: combinations drawn from the generator with their exact
propensities, for logging and off-policy evaluation) and ``thompson`` (posterior draws of the
reward model, ``genco.inference.thompson``: exploration aimed where the model is unsure, with
exact propensities).
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from genco.data import storage
from genco.data.contract import (
    AD,
    COMPONENT,
    ELEMENT,
    Catalog,
    Constraints,
    load_catalog,
    load_constraints,
)
from genco.errors import ConfigError
from genco.models.checkpoint import (
    CATALOG,
    CONSTRAINTS,
    load_generator,
    load_reward_model,
    verify_bundle,
    version_id,
)
from genco.models.generator import BoundGenerator, Generator
from genco.models.policy_tables import PolicyTables
from genco.models.reward import BoundModel, RewardModel
from genco.models.tables import REFINES, RewardTables, TableCache

from .candidates import beam_candidates, distinct
from .thompson import mixed_draws, thompson_policy

MODES = ("beam", "sample", "thompson")
EXACT_MAX = 4096
MAX_TOP_K = 100


@dataclass
class Recommendation:
    rank: int
    elements: dict[str, str]
    score: float  # predicted CTR
    propensity: float | None = None
    attribution: dict[str, float] | None = None

    def to_dict(self) -> dict:
        out: dict = {"rank": self.rank, "elements": self.elements, "score": self.score}
        if self.propensity is not None:
            out["propensity"] = self.propensity
        if self.attribution is not None:
            out["attribution"] = self.attribution
        return out


@dataclass(frozen=True)
class Decoded:
    """Decoded combinations of one ad, best first: catalog codes (n, K), predicted CTR (n,),
    Shapley credit on the logit (n, K), propensity (n,) when sampled, and how many distinct
    combinations the reward model scored to choose them (beam plus refinement moves)."""

    codes: np.ndarray
    score: np.ndarray
    credit: np.ndarray
    propensity: np.ndarray | None
    scored: int
    shown: int = 0  # the row an ad server shows: beam's best, or sample's first draw


@dataclass(frozen=True)
class Served:
    """What an ad server shows for one request and must log to make the next training set.

    ``propensity`` is the exact probability that the served policy shows ``elements``:
    in ``sample`` mode the mixture ``(1 - explore) pi(c) + explore q(c)``; ``beam`` is
    deterministic (``deterministic`` true, propensity 1). ``impression_id`` joins the clicks
    file to the served log (README "Served log").
    """

    impression_id: str
    model_version: str
    mode: str
    ad_id: str
    elements: dict[str, str]
    propensity: float
    deterministic: bool
    explore: float
    recommendations: list[Recommendation]

    def log_fields(self) -> dict:
        """The served-log row's fields (without ``ctx_*`` and ``timestamp``)."""
        return {
            "impression_id": self.impression_id,
            "model_version": self.model_version,
            "ad_id": self.ad_id,
            **self.elements,
            "propensity": self.propensity,
            "mode": self.mode,
        }


@dataclass
class Predictor:
    reward: RewardModel
    generator: Generator
    catalog: Catalog
    constraints: Constraints
    version: str = "unversioned"
    # Local search on the reward model after the beam (REFINES). "none" by default: the
    # served policy, which the evaluation gate judges; batch recommendations ask for "pairs".
    refine: str = "none"
    # Ads with at most this many combinations (before constraints) are decoded exactly: every
    # legal combination scored by the reward model, ~0.1 ms at 4,096 once the ad's table is
    # built. Larger spaces go through the generator's beam.
    exact_max: int = EXACT_MAX
    _bound: tuple[BoundModel, BoundGenerator] | None = field(default=None, repr=False)
    _reward_tables: TableCache = field(default_factory=TableCache, repr=False)
    # The posterior-draw policy per (ad, context) (``genco.inference.thompson``)
    _thompson: TableCache = field(default_factory=TableCache, repr=False)

    @staticmethod
    def load(
        model_dir: str,
        catalog: Catalog | None = None,
        constraints: Constraints | None = None,
        client=None,
    ) -> Predictor:
        """Load a bundle; by default with the catalog and constraints it was trained on.

        The bundle is checked against its manifest first (``verify_bundle``): a directory
        without one, or with a file changed after it was written, is a ``BundleError``.
        """
        manifest, raw, _ = verify_bundle(model_dir, client)
        reward, _ = load_reward_model(model_dir, client=client)
        generator = load_generator(model_dir, client=client)
        if catalog is None:
            catalog = load_catalog(storage.join(model_dir, CATALOG), client=client)
            if constraints is None:
                constraints = load_constraints(
                    storage.join(model_dir, CONSTRAINTS), catalog, client=client
                )
        constraints = constraints if constraints is not None else Constraints.empty()
        version = version_id(manifest, hashlib.sha256(raw).hexdigest())
        return Predictor(reward, generator, catalog, constraints, version)

    @property
    def context_columns(self) -> tuple[str, ...]:
        return self.reward.vocab.context_columns

    def bound(self) -> tuple[BoundModel, BoundGenerator]:
        if self._bound is None:
            with torch.inference_mode():
                b = BoundModel(self.reward, self.catalog, allow_unknown_ads=True)
                g = BoundGenerator(self.generator, self.catalog, self.constraints)
                g.candidate_vectors()  # warm the cache
            self._bound = (b, g)
        return self._bound

    def tables(self, ad: int) -> tuple[PolicyTables, RewardTables]:
        """The generator and reward model folded for one ad, cached per ad."""
        reward, gen = self.bound()
        policy = gen.tables(ad)  # cached by the generator
        tables = self._reward_tables.get(ad)
        if tables is None:
            tables = reward.tables(ad, policy.masks.codes)
            self._reward_tables.put(ad, tables, tables.nbytes)
        return policy, tables

    def cache_counts(self) -> tuple[int, int]:
        """(hits, misses) of the per-ad table cache so far: a miss folds the models for an ad
        (the slow path of a request), a hit reuses them."""
        return self._reward_tables.hits, self._reward_tables.misses

    def context_vector(self, ctx: dict[str, float] | np.ndarray | None) -> np.ndarray | None:
        """Context as the model's column order; missing columns are an error naming them."""
        cols = self.context_columns
        if not cols:
            return None
        if ctx is None:
            raise ConfigError(f"context is required: {', '.join(cols)}")
        if isinstance(ctx, dict):
            missing = [c for c in cols if c not in ctx]
            if missing:
                raise ConfigError(f"context is missing '{missing[0]}'")
            return np.array([float(ctx[c]) for c in cols], dtype=np.float32)
        arr = np.asarray(ctx, dtype=np.float32).reshape(-1)
        if len(arr) != len(cols):
            raise ConfigError(f"context has {len(arr)} values, expected {len(cols)}")
        return arr

    def decode(
        self,
        ad: int,
        x: np.ndarray | None,
        top_k: int = 5,
        mode: str = "beam",
        temperature: float = 1.0,
        seed: int | None = None,
        refine: str | None = None,
        explore: float | None = None,
    ) -> Decoded:
        """The best (beam) or sampled combinations of catalog ad ``ad``, best score first.

        beam: an ad with at most ``exact_max`` combinations is decoded exactly (every legal
        one scored by the reward model, residuals included). Otherwise the generator's beam
        plus the ad's combinations with the largest residuals are scored by the reward model;
        unless ``refine`` (default: the predictor's) is "none", the best ``top_k`` of them are
        improved by local search on the model's structure (``RewardTables.refine``: swaps of
        one component, and with "pairs" of two, while they help), and the union is ranked
        again. sample: ``top_k`` draws, each from the policy with probability 1 - ``explore``
        (default: the generator's ``explore``) else from the exploration draw, duplicates
        merged, with the exact mixture propensities. thompson: the same, with the
        posterior-draw policy (``thompson``) in place of the generator's.
        """
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got '{mode}'")
        if not 1 <= top_k <= MAX_TOP_K:
            raise ConfigError(f"top_k must be in [1, {MAX_TOP_K}], got {top_k}")
        refine = self.refine if refine is None else refine
        if refine not in REFINES:
            raise ConfigError(f"refine must be one of {', '.join(REFINES)}, got '{refine}'")
        policy, reward = self.tables(ad)
        propensity = None
        refined = 0
        exhaustive = reward.exhaustive(policy.masks, self.exact_max) if mode == "beam" else None
        if exhaustive is not None and len(exhaustive.slots):  # (none: the beam says why)
            z = exhaustive.logits(reward, x)
            top = np.argsort(-z, kind="stable")[:top_k]
            slots = exhaustive.slots[top]
            _, credit = reward.credit(slots, x)
            return Decoded(
                codes=policy.masks.to_codes(slots),
                score=1.0 / (1.0 + np.exp(-z[top])),
                credit=credit,
                propensity=None,
                scored=len(z),
            )
        if mode == "beam":
            slots = beam_candidates(policy, reward, x, max(self.generator.config.beam_width, top_k))
            if refine != "none":
                _, credit = reward.credit(slots, x)
                best = np.argsort(-credit.sum(1), kind="stable")[:top_k]
                pairs = refine == "pairs"
                better, refined = reward.refine(slots[best], x, policy.masks, pairs)
                slots = distinct(np.concatenate([slots, better]))[0]
        else:
            rng = np.random.default_rng(seed)
            if mode == "thompson":
                slots, propensity = self._thompson_draws(ad, x, top_k, rng, explore)
            else:
                slots, propensity = self._draws(policy, x, top_k, rng, temperature, explore)
            slots, first = distinct(slots)
            propensity = propensity[first]
        base, credit = reward.credit(slots, x)
        score = 1.0 / (1.0 + np.exp(-(base + credit.sum(1, dtype=np.float64))))
        order = np.argsort(-score, kind="stable")[:top_k]
        return Decoded(
            codes=policy.masks.to_codes(slots[order]),
            score=score[order],
            credit=credit[order],
            propensity=None if propensity is None else propensity[order],
            scored=len(slots) + refined,
            # distinct keeps first occurrences in order: row 0 is the first draw
            shown=int(np.flatnonzero(order == 0)[0]) if propensity is not None else 0,
        )

    def _draws(
        self,
        policy: PolicyTables,
        x: np.ndarray | None,
        n: int,
        rng: np.random.Generator,
        temperature: float,
        explore: float | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """n independent draws (n, K slots) of the served policy and their exact propensities:
        each from the generator with probability 1 - explore, else from the exploration draw."""
        eps = self.generator.config.explore if explore is None else explore
        if not 0.0 <= eps <= 1.0:
            raise ConfigError(f"explore must be in [0, 1], got {eps}")
        slots, _ = policy.sample(x, n, rng, temperature)
        wide = rng.random(n) < eps
        if wide.any():
            slots[wide] = policy.uniform(int(wide.sum()), rng)
        # Exact: the policy's probability mixed with the exploration draw's.
        propensity = (1 - eps) * np.exp(policy.log_prob(x, slots, temperature))
        if eps:
            propensity = propensity + eps * np.exp(policy.log_uniform(slots))
        return slots, propensity

    def draw(
        self,
        ad: int,
        x: np.ndarray | None,
        n: int,
        rng: np.random.Generator,
        explore: float | None = None,
        temperature: float = 1.0,
        thompson: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """n impressions served to catalog ad ``ad`` in context ``x``: catalog codes (n, K)
        and each one's exact propensity (n,). Each impression is the exploration draw with
        probability ``explore``, else the policy's: with ``thompson`` the posterior-draw
        policy (``thompson_policy``); else a generator sample at ``temperature`` (as
        ``serve`` in ``sample`` mode), or with ``temperature`` 0 the greedy pick (beam
        mode's top-1), so that the propensity is ``(1 - explore) 1[c = greedy] + explore q(c)``.
        """
        if n < 1:
            raise ConfigError(f"n must be >= 1, got {n}")
        if temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {temperature}")
        policy, _ = self.tables(ad)
        if thompson:
            slots, propensity = self._thompson_draws(ad, x, n, rng, explore)
            return policy.masks.to_codes(slots), propensity
        if temperature > 0:
            slots, propensity = self._draws(policy, x, n, rng, temperature, explore)
            return policy.masks.to_codes(slots), propensity
        eps = self.generator.config.explore if explore is None else explore
        if not 0.0 <= eps <= 1.0:
            raise ConfigError(f"explore must be in [0, 1], got {eps}")
        masks = policy.masks
        best_codes = self.greedy(ad, x)
        best = np.array(
            [int(np.flatnonzero(masks.codes[k] == c)[0]) for k, c in enumerate(best_codes)]
        )
        slots = np.tile(best, (n, 1))
        wide = rng.random(n) < eps
        if wide.any():
            slots[wide] = policy.uniform(int(wide.sum()), rng)
        propensity = (1 - eps) * np.all(slots == best, axis=1)
        if eps:
            propensity = propensity + eps * np.exp(policy.log_uniform(slots))
        codes = masks.to_codes(slots)
        return codes, propensity

    def thompson(self, ad: int, x: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The posterior-draw policy of catalog ad ``ad`` in context ``x``: candidate slots
        (N, K) and their probabilities (N,), built once per (ad, context) and cached."""
        key = (ad, None if x is None else np.ascontiguousarray(x, np.float32).tobytes())
        hit = self._thompson.get(key)
        if hit is None:
            policy, reward = self.tables(ad)
            beam = self.generator.config.beam_width
            sd = float(self.reward.residual_sd)
            hit = thompson_policy(policy, reward, x, ad, self.exact_max, beam, sd)
            self._thompson.put(key, hit, hit[0].nbytes + hit[1].nbytes)
        return hit

    def _thompson_draws(
        self, ad: int, x: np.ndarray | None, n: int, rng: np.random.Generator,
        explore: float | None,
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """n draws (slots (n, K)) of the posterior-draw policy mixed with the exploration
        draw, and their exact propensities."""
        eps = self.generator.config.explore if explore is None else explore
        if not 0.0 <= eps <= 1.0:
            raise ConfigError(f"explore must be in [0, 1], got {eps}")
        policy, reward = self.tables(ad)
        return mixed_draws(policy, reward, *self.thompson(ad, x), n, rng, eps)

    def greedy(self, ad: int, x: np.ndarray | None) -> np.ndarray:
        """The served policy's best combination (beam mode's top-1) as catalog codes (K,)."""
        return self.decode(ad, x, top_k=1, mode="beam").codes[0]

    def recommend(
        self,
        ad_id: str,
        ctx: dict[str, float] | np.ndarray | None = None,
        top_k: int = 5,
        mode: str = "beam",
        explain: bool = False,
        temperature: float = 1.0,
        seed: int | None = None,
        refine: str | None = None,
        explore: float | None = None,
    ) -> list[Recommendation]:
        ad = self.catalog.ad_code(ad_id)
        x = self.context_vector(ctx)
        d = self.decode(ad, x, top_k, mode, temperature, seed, refine, explore)
        return self._recommendations(d, explain)

    def _recommendations(self, d: Decoded, explain: bool) -> list[Recommendation]:
        comps = self.catalog.components
        out = []
        for r in range(len(d.codes)):
            elements = {c: self.catalog.elements[k][d.codes[r, k]] for k, c in enumerate(comps)}
            out.append(
                Recommendation(
                    rank=r + 1,
                    elements=elements,
                    score=float(d.score[r]),
                    propensity=None if d.propensity is None else float(d.propensity[r]),
                    attribution=(
                        {c: float(d.credit[r, k]) for k, c in enumerate(comps)} if explain else None
                    ),
                )
            )
        return out

    def serve(
        self,
        ad_id: str,
        ctx: dict[str, float] | np.ndarray | None = None,
        top_k: int = 5,
        mode: str = "beam",
        explain: bool = False,
        temperature: float = 1.0,
        seed: int | None = None,
        refine: str | None = None,
        explore: float | None = None,
        impression_id: str | None = None,
    ) -> Served:
        """``recommend`` plus what the ad server shows and logs (``Served``).

        impression_id: the caller's id for this impression; a fresh uuid4 hex when None.
        """
        ad = self.catalog.ad_code(ad_id)
        x = self.context_vector(ctx)
        d = self.decode(ad, x, top_k, mode, temperature, seed, refine, explore)
        recs = self._recommendations(d, explain)
        shown = recs[d.shown]
        sampled = mode != "beam"
        eps = (self.generator.config.explore if explore is None else explore) if sampled else 0.0
        return Served(
            impression_id=impression_id or uuid.uuid4().hex,
            model_version=self.version,
            mode=mode,
            ad_id=ad_id,
            elements=dict(shown.elements),
            propensity=float(shown.propensity) if sampled else 1.0,
            deterministic=not sampled,
            explore=float(eps),
            recommendations=recs,
        )


def inline_catalog(
    candidates: dict[str, list], feature_names: tuple[str, ...], ad_id: str = "__inline__"
) -> Catalog:
    """A one-ad catalog from a request's ``{component: [element id | {id, feat_*...}]}``."""
    rows = []
    for comp, elems in candidates.items():
        if not isinstance(elems, list) or not elems:
            raise ConfigError(f"candidates.{comp} must be a non-empty list")
        for e in elems:
            if isinstance(e, dict):
                if "id" not in e:
                    raise ConfigError(f"candidates.{comp}: an element object needs an 'id'")
                feats = [float(e.get(f, 0.0)) for f in feature_names]
                rows.append((ad_id, comp, str(e["id"]), *feats))
            else:
                rows.append((ad_id, comp, str(e), *([0.0] * len(feature_names))))
    return Catalog.from_frame(
        pd.DataFrame(rows, columns=[AD, COMPONENT, ELEMENT, *feature_names]), "candidates"
    )
