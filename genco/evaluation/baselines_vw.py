"""Vowpal Wabbit baseline: the contextual-bandit library a practitioner would pick.

GenCO has to beat what a competent engineer gets from VW in an afternoon, so this module gives
VW a fair shot rather than a strawman: the logged propensities, namespaces for the ad, the
context and every component (element id plus the catalog's ``feat_*`` features), and
quadratic interactions between those namespaces, so that a linear VW model *can* represent
element x element and context x element effects. Two ways of casting the problem exist:

``cb_adf``
    Every legal combination of an ad is one action (``--cb_adf --cb_type mtr``). Exact and
    able to learn interactions, but the action set is the whole combination space, so it is
    only used when every ad has at most ``VWConfig.max_actions`` legal combinations.

``slates``
    VW's ``--slates`` reduction: one slot per component, whose actions are the ad's
    candidates for that component. It scales with the sum, not the product, of candidate
    counts, but each slot's action only carries its own component's namespace: cross-slot
    (element x element) interactions cannot be learned, and constraints are VW-unaware:
    ``best_legal_by_slots`` turns the per-slot scores (log softmax probabilities) into the
    best legal combination, trying the slot-wise best first.

Training cost. With ``--cb_type mtr`` VW updates only the logged action: it regresses the
chosen action's cost with importance weight ``1/p`` times ``events/actions`` seen so far
(``cb_adf::learn_MTR``); the other actions are only scored for progress output. So each
impression is passed with its logged action alone, one example costs O(features) instead of
O(combinations x features), and 500k impressions train in seconds. The only difference from
passing every action is that ``events/actions`` factor (1 / mean number of actions); it is
replaced by dividing propensities by their maximum in the log, which keeps the ``1/p``
ratios and, under a uniform logger, gives every row weight 1 exactly as the full action set
does (the tests check the two give identical predictions). VW's CB text labels carry no
example weight and probabilities above 1 are clipped, hence the division by the maximum.
``ips``/``dr`` would need every action on every row (they update all of them), which is
why ``mtr`` (VW's default for ``cb_adf``) is used.

Why these defaults. Tuned on the ``additive`` and ``interactions`` worlds (seeds 0 and 1):
element pairs ("ee") are what lift ``interactions`` from ~0.5 to ~0.95 of the oracle gap;
ad x element ("ae") only adds noise; clicks are rare (~3%), so VW's default ``-l 0.5``
chases noise and a rate of 0.005 closes the most gap on average; a second pass changed
little. Context x element pair ("xee") lets the linear CTR-scale model follow a context that
rescales every element effect (0.39 -> 0.75 of the gap on ``contextual``).
"""

from __future__ import annotations

import heapq
import itertools
import math
import string
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import vowpalwabbit

from genco.data.contract import AD, CLICK, CONTEXT_PREFIX, PROPENSITY, Catalog, Constraints
from genco.data.space import MAX_ENUMERATE, legal_combinations, touched_by_constraints

MODES = ("cb_adf", "slates")
AD_NS = "a"
CONTEXT_NS = "x"
SLOT_NS = "s"
# One namespace letter per component; VW keys interactions on a namespace's first byte.
COMPONENT_NS = tuple(
    c for c in string.ascii_letters + string.digits if c not in (AD_NS, CONTEXT_NS, SLOT_NS)
)
# Slates only reports softmax probabilities per slot, not scores; with --epsilon 0 the log
# probabilities are -lambda * predicted cost + a per-slot constant, which is all the
# constrained decoder needs. lambda = 1 keeps probabilities far from float32 underflow.
SLATES_LAMBDA = 1.0
_GROUP_LETTERS = "axe"


@dataclass(frozen=True)
class VWConfig:
    """How VW is run; validated on construction so a bad benchmark grid fails before training."""

    mode: str = field(
        default="cb_adf",
        metadata={
            "help": "cb_adf: every legal combination is an action (small spaces); slates: "
            "VW --slates with one slot per component (large spaces)."
        },
    )
    passes: int = field(default=1, metadata={"help": "Passes over the log, in log order."})
    learning_rate: float = field(default=0.005, metadata={"help": "VW -l."})
    interactions: tuple[str, ...] = field(
        default=("ee", "xe", "xee"),
        metadata={
            "help": "Interactions over namespace groups: a = ad, x = context, e = element "
            "namespaces (expanded to every set of distinct components), 2 or 3 letters, e.g. "
            "'ee' = all element pairs, 'xe' = context x each element, 'ae' = ad x element."
        },
    )
    max_actions: int = field(
        default=2000,
        metadata={
            "help": "cb_adf only when every ad has at most this many legal combinations; "
            "otherwise slates is used (see VWRecommender.mode_used)."
        },
    )
    bits: int = field(default=22, metadata={"help": "VW -b: bits of the feature hash."})
    seed: int = field(default=0, metadata={"help": "VW --random_seed."})

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"VWConfig.mode must be 'cb_adf' or 'slates', got {self.mode!r}")
        for name, low in (("passes", 1), ("max_actions", 1), ("seed", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"VWConfig.{name} must be an integer >= {low}, got {value!r}")
        if (
            not isinstance(self.bits, int)
            or isinstance(self.bits, bool)
            or not 10 <= self.bits <= 30
        ):
            raise ValueError(f"VWConfig.bits must be an integer in [10, 30], got {self.bits!r}")
        lr = self.learning_rate
        if (
            not isinstance(lr, int | float)
            or isinstance(lr, bool)
            or not math.isfinite(lr)
            or lr <= 0
        ):
            raise ValueError(f"VWConfig.learning_rate must be a finite number > 0, got {lr!r}")
        if isinstance(self.interactions, str) or not isinstance(self.interactions, tuple | list):
            raise ValueError(
                f"VWConfig.interactions must be a tuple of strings, got {self.interactions!r}"
            )
        object.__setattr__(self, "interactions", tuple(self.interactions))
        for item in self.interactions:
            ok = (
                isinstance(item, str)
                and 2 <= len(item) <= 3
                and all(c in _GROUP_LETTERS for c in item)
                and item.count(AD_NS) <= 1
                and item.count(CONTEXT_NS) <= 1
            )
            if not ok:
                raise ValueError(
                    f"VWConfig.interactions item {item!r} must be 2 or 3 letters from "
                    "a (ad), x (context), e (element), with a and x at most once each"
                )


def expand_interactions(items: tuple[str, ...], n_components: int) -> list[str]:
    """VW namespace strings for the group-level interactions.

    Groups keep the config independent of how many components a catalog has: 'ee' means
    every pair of distinct components, which is what lets VW learn element x element effects.
    """
    if n_components > len(COMPONENT_NS):
        raise ValueError(
            f"VW baseline supports at most {len(COMPONENT_NS)} components, got {n_components}"
        )
    out: list[str] = []
    for item in items:
        fixed = "".join(sorted(c for c in item if c != "e"))
        n_e = item.count("e")
        for combo in itertools.combinations(range(n_components), n_e):
            ns = fixed + "".join(COMPONENT_NS[k] for k in combo)
            if ns not in out:
                out.append(ns)
    return out


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def best_legal_by_slots(
    constraints: Constraints,
    ad: int,
    candidates: Sequence[np.ndarray],
    utilities: Sequence[np.ndarray],
) -> np.ndarray:
    """Legal combination with the highest summed per-slot utility.

    ``utilities[k][i]`` scores ``candidates[k][i]`` (higher is better). Slot models score
    components independently and know nothing of forbidden pairs, so the slot-wise best is
    tried first and, when it is illegal, combinations are visited in decreasing order of
    summed utility until one is legal: the exact best legal combination under the slot model,
    not a heuristic repair, and usually found within a handful of steps because a pair
    constraint removes few combinations.
    """
    cands = [np.asarray(c, dtype=np.int64) for c in candidates]
    if len(cands) != len(utilities) or any(
        len(c) != len(u) or len(c) == 0 for c, u in zip(cands, utilities)
    ):
        raise ValueError("each slot needs as many utilities as candidates, and >= 1 candidate")
    order = [np.argsort(-np.asarray(u, dtype=np.float64), kind="stable") for u in utilities]
    sorted_u = [np.asarray(u, dtype=np.float64)[o] for u, o in zip(utilities, order)]
    n_slots = len(cands)
    ad_arr = np.array([ad], dtype=np.int64)

    def combo_of(ranks: tuple[int, ...]) -> np.ndarray:
        return np.array([cands[k][order[k][r]] for k, r in enumerate(ranks)], dtype=np.int64)

    start = (0,) * n_slots
    if not touched_by_constraints(constraints, ad):
        return combo_of(start)
    # A rank vector's only parent is itself with its last raised coordinate lowered, so
    # children raise coordinates at or after that one: every vector is pushed exactly once.
    heap: list[tuple[float, tuple[int, ...], int]] = [
        (-float(sum(u[0] for u in sorted_u)), start, 0)
    ]
    visited = 0
    while heap and visited < MAX_ENUMERATE:
        neg, ranks, last = heapq.heappop(heap)
        visited += 1
        combo = combo_of(ranks)
        if constraints.violations(ad_arr, combo[None, :])[0] < 0:
            return combo
        for j in range(last, n_slots):
            if ranks[j] + 1 < len(cands[j]):
                child = (*ranks[:j], ranks[j] + 1, *ranks[j + 1 :])
                delta = float(sorted_u[j][ranks[j] + 1] - sorted_u[j][ranks[j]])
                heapq.heappush(heap, (neg - delta, child, j))
    raise ValueError(f"ad {ad} has no legal combination among its candidates")


class VWRecommender:
    """Learns from a click log with VW and returns VW's top-1 legal combination per ad/context.

    Attributes set for reporting: ``mode_used`` (which VW formulation was run),
    ``vw_args`` (the exact VW command line), ``train_seconds`` and ``n_scored`` (how many
    combinations, for cb_adf, or slot actions, for slates, VW scored in ``best``).
    """

    def __init__(
        self, catalog: Catalog, constraints: Constraints, config: VWConfig | None = None
    ) -> None:
        if catalog.n_components > len(COMPONENT_NS):
            raise ValueError(
                f"VW baseline supports at most {len(COMPONENT_NS)} components, "
                f"got {catalog.n_components}"
            )
        self.catalog = catalog
        self.constraints = constraints
        self.config = config if config is not None else VWConfig()
        self.mode_used = self._choose_mode()
        self.n_scored = 0
        self.train_seconds = 0.0
        self.vw_args = ""
        self._ws: vowpalwabbit.Workspace | None = None
        self._ctx_columns: tuple[str, ...] = ()
        self._legal: dict[int, np.ndarray] = {}
        self._action_lines: dict[int, list[str]] = {}
        # Per component and element: "|<ns> e<code> f0:.. f1:..", built once: every training
        # and scoring line is a join of these, which keeps Python's share of the time small.
        self._segments: list[list[str]] = []
        for k in range(catalog.n_components):
            ns = COMPONENT_NS[k]
            feats = catalog.features[k]
            segs = []
            for e in range(len(catalog.elements[k])):
                parts = [f"|{ns} e{e}"]
                parts += [f"f{j}:{_fmt(v)}" for j, v in enumerate(feats[e]) if v != 0.0]
                segs.append(" ".join(parts))
            self._segments.append(segs)

    # -- set-up ---------------------------------------------------------------------------

    def _n_legal_upper(self, ad: int) -> int:
        """Legal combinations of an ad, or an upper bound when enumerating them is pointless."""
        n = self.catalog.n_combinations(ad)
        if n <= self.config.max_actions or n > MAX_ENUMERATE:
            return n
        if not touched_by_constraints(self.constraints, ad):
            return n
        return len(legal_combinations(self.catalog, self.constraints, ad))

    def _choose_mode(self) -> str:
        if self.config.mode == "slates":
            return "slates"
        for ad in range(self.catalog.n_ads):
            if self._n_legal_upper(ad) > self.config.max_actions:
                return "slates"
        return "cb_adf"

    def _vw_arguments(self) -> str:
        cfg = self.config
        groups = cfg.interactions
        if self.mode_used == "slates":
            # A slot's action only has its own component's namespace: element pairs never fire.
            groups = tuple(g for g in groups if g.count("e") <= 1)
        if not self._ctx_columns:
            groups = tuple(g for g in groups if CONTEXT_NS not in g)
        inter = expand_interactions(groups, self.catalog.n_components)
        if self.mode_used == "cb_adf":
            head = ["--cb_adf", "--cb_type", "mtr"]
        else:
            head = [
                "--slates",
                "--cb_type",
                "mtr",
                "--epsilon",
                "0",
                "--softmax",
                "--lambda",
                _fmt(SLATES_LAMBDA),
            ]
        args = [
            *head,
            "--quiet",
            "-b",
            str(cfg.bits),
            "-l",
            _fmt(cfg.learning_rate),
            "--random_seed",
            str(cfg.seed),
            *itertools.chain.from_iterable(("--interactions", i) for i in inter),
        ]
        return " ".join(args)

    # -- training -------------------------------------------------------------------------

    def _encode(self, impressions: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ad codes, (n, K) element codes and the float ctx matrix of the contract columns."""
        cat = self.catalog
        required = [AD, *cat.components, CLICK]
        for col in required:
            if col not in impressions.columns:
                raise ValueError(f"impressions: missing required column '{col}'")
        if len(impressions) == 0:
            raise ValueError("impressions: no rows to learn from")
        ad_index = {a: i for i, a in enumerate(cat.ads)}
        ads_s = impressions[AD].astype(str)
        ads = ads_s.map(ad_index)
        if ads.isna().any():
            bad = ads_s[ads.isna()].iloc[0]
            raise KeyError(f"ad_id '{bad}' is not in the catalog")
        combos = np.zeros((len(impressions), cat.n_components), dtype=np.int64)
        for k, comp in enumerate(cat.components):
            index = {e: i for i, e in enumerate(cat.elements[k])}
            col = impressions[comp].astype(str)
            codes = col.map(index)
            if codes.isna().any():
                bad = col[codes.isna()].iloc[0]
                raise KeyError(f"element '{bad}' is not in component '{comp}'")
            combos[:, k] = codes.to_numpy(dtype=np.int64)
        ctx_cols = tuple(c for c in impressions.columns if str(c).startswith(CONTEXT_PREFIX))
        self._ctx_columns = ctx_cols
        ctx = impressions[list(ctx_cols)].to_numpy(dtype=np.float64) if ctx_cols else None
        if ctx is None:
            ctx = np.zeros((len(impressions), 0))
        return ads.to_numpy(dtype=np.int64), combos, ctx

    def _shared_features(self, ad: int, ctx: np.ndarray) -> str:
        feats = f"|{AD_NS} a{ad}"
        if len(ctx):
            feats += f" |{CONTEXT_NS} " + " ".join(f"c{j}:{_fmt(v)}" for j, v in enumerate(ctx))
        return feats

    def _action_line(self, combo: np.ndarray) -> str:
        return " ".join(self._segments[k][e] for k, e in enumerate(combo))

    def fit(self, impressions: pd.DataFrame) -> VWRecommender:
        """Train VW online on the log (``passes`` times, in log order).

        Cost is ``-click`` (VW minimizes cost); the logged propensity is VW's probability,
        normalized as explained in the module docstring. A log without propensities is
        treated as uniformly logged (every row weight 1).
        """
        ads, combos, ctx = self._encode(impressions)
        click = impressions[CLICK].to_numpy(dtype=np.float64)
        if not np.all((click == 0) | (click == 1)):
            raise ValueError("impressions: click must be 0 or 1")
        cost = 0.0 - click  # +0.0, not -0.0, for non-clicks
        if PROPENSITY in impressions.columns:
            p = impressions[PROPENSITY].to_numpy(dtype=np.float64)
            if not np.all((p > 0) & (p <= 1)):
                raise ValueError("impressions: propensity must be in (0, 1]")
        else:
            p = np.ones(len(impressions))
        # cb_adf: see the module docstring. Slates passes every slot action, so VW's own
        # events/actions factor applies; it wants each slot's probability but the log has the
        # joint one, split evenly in log space (exact when components are drawn independently).
        p = p ** (1.0 / self.catalog.n_components) if self.mode_used == "slates" else p / p.max()

        if self._ws is not None:
            self._ws.finish()
        self.vw_args = self._vw_arguments()
        self._action_lines.clear()
        self._legal.clear()
        ws = vowpalwabbit.Workspace(self.vw_args, enable_logging=False)
        self._ws = ws
        rows = list(zip(ads, combos, ctx, cost, p))
        start = time.perf_counter()
        # Lines are built as they are fed: a slates example is ~K x candidates lines, and
        # holding a whole log of them would cost far more memory than VW itself.
        for _ in range(self.config.passes):
            for a, combo, x, c, q in rows:
                if self.mode_used == "cb_adf":
                    ws.learn(
                        [
                            "shared " + self._shared_features(a, x),
                            f"0:{_fmt(c)}:{_fmt(q)} " + self._action_line(combo),
                        ]
                    )
                else:
                    ws.learn(self._slates_lines(a, x, combo, c, q))
        self.train_seconds = time.perf_counter() - start
        return self

    # -- slates lines -----------------------------------------------------------------------

    def _slates_actions(self, ad: int) -> list[str]:
        return [
            f"slates action {k} " + self._segments[k][e]
            for k, cands in enumerate(self.catalog.candidates[ad])
            for e in cands
        ]

    def _slates_lines(
        self,
        ad: int,
        ctx: np.ndarray,
        combo: np.ndarray | None = None,
        cost: float = 0.0,
        prob: float = 1.0,
    ) -> list[str]:
        """Shared, action and slot lines; labeled with the logged choice when combo is given.

        Slot labels index the slot's own actions (VW's slates convention), i.e. the logged
        element's position among the ad's candidates for that component.
        """
        cands = self.catalog.candidates[ad]
        if combo is None:
            shared = "slates shared " + self._shared_features(ad, ctx)
            slots = [f"slates slot |{SLOT_NS} k{k}" for k in range(len(cands))]
        else:
            shared = f"slates shared {_fmt(cost)} " + self._shared_features(ad, ctx)
            slots = []
            for k, c in enumerate(cands):
                i = int(np.searchsorted(c, combo[k]))
                if i >= len(c) or c[i] != combo[k]:
                    raise ValueError(
                        f"impressions: {self.catalog.components[k]} "
                        f"'{self.catalog.elements[k][combo[k]]}' is not a candidate of ad "
                        f"'{self.catalog.ads[ad]}'"
                    )
                slots.append(f"slates slot {i}:{_fmt(prob)} |{SLOT_NS} k{k}")
        if ad not in self._action_lines:
            self._action_lines[ad] = self._slates_actions(ad)
        return [shared, *self._action_lines[ad], *slots]

    # -- decoding ---------------------------------------------------------------------------

    def _check_query(self, ad: int, ctx: np.ndarray | None) -> np.ndarray:
        if self._ws is None:
            raise RuntimeError("VWRecommender.best called before fit")
        if not 0 <= ad < self.catalog.n_ads:
            raise ValueError(f"ad code {ad} is out of range [0, {self.catalog.n_ads})")
        n_ctx = len(self._ctx_columns)
        if ctx is None:
            if n_ctx:
                raise ValueError(f"the model was trained with context columns {self._ctx_columns}")
            return np.zeros(0)
        x = np.asarray(ctx, dtype=np.float64).reshape(-1)
        if len(x) != n_ctx:
            raise ValueError(f"ctx has {len(x)} values, the model expects {n_ctx}")
        return x

    def best(self, ad: int, ctx: np.ndarray | None = None) -> np.ndarray:
        """(K,) element codes of VW's top-1 legal combination for the ad in this context."""
        x = self._check_query(ad, ctx)
        if self.mode_used == "cb_adf":
            return self._best_cb_adf(ad, x)
        return self._best_slates(ad, x)

    def _best_cb_adf(self, ad: int, x: np.ndarray) -> np.ndarray:
        assert self._ws is not None
        if ad not in self._legal:
            legal = legal_combinations(self.catalog, self.constraints, ad)
            self._legal[ad] = legal
            self._action_lines[ad] = [self._action_line(c) for c in legal]
        legal = self._legal[ad]
        scores = self._ws.predict(
            ["shared " + self._shared_features(ad, x), *self._action_lines[ad]]
        )
        self.n_scored += len(legal)
        # Scores come back in action order; lowest predicted cost wins, ties to the first.
        return legal[int(np.argmin(np.asarray(scores, dtype=np.float64)))].copy()

    def _best_slates(self, ad: int, x: np.ndarray) -> np.ndarray:
        """Best legal combination under the sum of VW's per-slot scores.

        The slot-wise best is tried first; when it is illegal, combinations are visited in
        order of decreasing summed score (best-first over the per-slot rankings) until a
        legal one is found, so the answer is the best legal combination VW's slot model
        can express, not a heuristic repair.
        """
        assert self._ws is not None
        cands = self.catalog.candidates[ad]
        pred = self._ws.predict(self._slates_lines(ad, x))
        self.n_scored += sum(len(c) for c in cands)
        utils: list[np.ndarray] = []
        for k, slot in enumerate(pred):
            u = np.full(len(cands[k]), -np.inf)
            for i, prob in slot:
                u[i] = math.log(max(prob, 1e-300)) / SLATES_LAMBDA
            utils.append(u)
        return best_legal_by_slots(self.constraints, ad, cands, utils)

    def close(self) -> None:
        """Release VW's native workspace; the recommender cannot score afterwards."""
        if self._ws is not None:
            self._ws.finish()
            self._ws = None
