"""Simulated worlds with known ground truth: catalog, constraints, logged impressions, true CTR.

A world's true click logit for ad ``a``, context ``x`` and combination ``(e_1..e_K)`` is

    base + appeal[a] + ctx_appeal . x
    + sum_k  main[k][e_k] * (1 + flip * s(x))        # s(x) = +1/-1 from ctx_0 (contextual)
    + sum_{k<l} style[k][e_k] . W[k,l] . style[l][e_l]  # styles are linear in element features

clipped to CTR in [0.5%, 15%]. Element main effects are partly driven by ``feat_*`` features
(so unseen elements are predictable), and interactions only through features' styles.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pandas as pd

from genco.data import storage
from genco.data.contract import (
    AD,
    CLICK,
    COMPONENT,
    ELEMENT,
    PROPENSITY,
    TIMESTAMP,
    Catalog,
    Constraints,
    code_maps,
)
from genco.data.space import count_legal, legal_combinations, touched_by_constraints

COMPONENT_NAMES = ("title", "image", "highlight", "badge", "color", "layout", "cta", "font")
CTR_MIN, CTR_MAX = 0.005, 0.15
_LOGIT_MIN, _LOGIT_MAX = (
    float(np.log(CTR_MIN / (1 - CTR_MIN))),
    float(np.log(CTR_MAX / (1 - CTR_MAX))),
)
T0 = 1_767_225_600.0  # 2026-01-01 UTC: simulated logs start here


@dataclass(frozen=True)
class WorldConfig:
    """Parameters of a simulated world. Presets live in ``WORLDS``."""

    name: str = field(metadata={"help": "Preset name, recorded in the outputs."})
    n_ads: int = field(default=20, metadata={"help": "Number of ads (products)."})
    n_components: int = field(default=3, metadata={"help": "Components per ad card."})
    n_candidates: int = field(default=5, metadata={"help": "Candidates per component per ad."})
    pool_size: int = field(
        default=8, metadata={"help": "Elements per component shared by all ads (>= n_candidates)."}
    )
    n_features: int = field(default=4, metadata={"help": "feat_* columns per element."})
    style_rank: int = field(default=2, metadata={"help": "Rank of the interaction styles."})
    base_logit: float = field(default=-3.6, metadata={"help": "Logit of an average impression."})
    appeal_scale: float = field(default=0.3, metadata={"help": "SD of per-ad appeal."})
    main_scale: float = field(default=0.3, metadata={"help": "SD of element main effects."})
    feature_share: float = field(
        default=0.5, metadata={"help": "Share of main-effect variance explained by features."}
    )
    interaction_scale: float = field(
        default=0.1, metadata={"help": "SD of each pairwise interaction term."}
    )
    context_flip: float = field(
        default=0.0, metadata={"help": "Main effects multiply by (1 + flip*s), s=+-1 from ctx_0."}
    )
    n_global_forbidden: int = field(default=0, metadata={"help": "Forbidden pairs for all ads."})
    forbid_best_share: float = field(
        default=0.0, metadata={"help": "Share of ads whose unconstrained best combo is forbidden."}
    )
    epsilon: float = field(
        default=1.0, metadata={"help": "Logging policy: uniform with prob epsilon, else greedy."}
    )
    greedy: str = field(
        default="random",
        metadata={
            "help": "Logging policy's greedy combo per ad: random | confounded (the worst "
            "combination on appealing ads, the best on the others)."
        },
    )
    popularity_skew: float = field(
        default=0.0, metadata={"help": "Zipf exponent of impressions per ad (by appeal rank)."}
    )
    cold_start_share: float = field(
        default=0.0, metadata={"help": "Share of elements never shown by the logging policy."}
    )
    per_product: bool = field(
        default=False,
        metadata={
            "help": "Every ad has its own elements (features drawn from shared distributions); "
            "quality and styles are nonlinear functions of the features."
        },
    )
    three_way_scale: float = field(
        default=0.0, metadata={"help": "SD of the three-way term over the first three styles."}
    )
    n_impressions: int = field(default=20_000, metadata={"help": "Default log size."})

    def __post_init__(self) -> None:
        for name in ("n_ads", "n_components", "n_candidates", "pool_size", "n_features"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pool_size < self.n_candidates and not self.per_product:
            raise ValueError(
                f"pool_size ({self.pool_size}) must be >= n_candidates ({self.n_candidates})"
            )
        if self.n_components > len(COMPONENT_NAMES):
            raise ValueError(f"n_components must be <= {len(COMPONENT_NAMES)}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon}")
        if self.greedy not in ("random", "confounded"):
            raise ValueError(f"greedy must be 'random' or 'confounded', got '{self.greedy}'")
        if not 0.0 <= self.cold_start_share < 1.0:
            raise ValueError(f"cold_start_share must be in [0, 1), got {self.cold_start_share}")
        if self.three_way_scale and self.n_components < 3:
            raise ValueError("three_way_scale needs n_components >= 3")

    @property
    def contextual(self) -> bool:
        return self.context_flip != 0.0


WORLDS: dict[str, WorldConfig] = {
    w.name: w
    for w in (
        WorldConfig(
            "default",
            n_ads=20,
            n_components=3,
            n_candidates=5,
            pool_size=8,
            interaction_scale=0.15,
            n_global_forbidden=2,
            n_impressions=50_000,
        ),
        WorldConfig(
            "additive",
            n_ads=50,
            n_components=4,
            n_candidates=6,
            pool_size=10,
            interaction_scale=0.0,
            main_scale=0.3,
            n_impressions=200_000,
        ),
        WorldConfig(
            "interactions",
            n_ads=50,
            n_components=4,
            n_candidates=6,
            pool_size=10,
            main_scale=0.12,
            interaction_scale=0.2,
            n_impressions=500_000,
        ),
        WorldConfig(
            "confounded",
            n_ads=60,
            n_components=3,
            n_candidates=6,
            pool_size=6,
            appeal_scale=0.7,
            main_scale=0.25,
            interaction_scale=0.05,
            epsilon=0.3,
            greedy="confounded",
            popularity_skew=1.0,
            n_impressions=200_000,
        ),
        WorldConfig(
            "constrained",
            n_ads=40,
            n_components=4,
            n_candidates=6,
            pool_size=10,
            main_scale=0.3,
            interaction_scale=0.15,
            n_global_forbidden=12,
            forbid_best_share=0.5,
            n_impressions=200_000,
        ),
        WorldConfig(
            "contextual",
            n_ads=40,
            n_components=3,
            n_candidates=6,
            pool_size=10,
            main_scale=0.2,
            interaction_scale=0.1,
            context_flip=1.5,
            n_impressions=300_000,
        ),
        WorldConfig(
            "cold_start",
            n_ads=40,
            n_components=3,
            n_candidates=8,
            pool_size=12,
            main_scale=0.35,
            feature_share=0.9,
            interaction_scale=0.05,
            cold_start_share=0.25,
            n_impressions=200_000,
        ),
        WorldConfig(
            "large",
            n_ads=30,
            n_components=5,
            n_candidates=12,
            pool_size=16,
            main_scale=0.25,
            interaction_scale=0.08,
            n_impressions=1_000_000,
        ),
        # Worlds of the usual e-commerce kind: every product has its own titles and images,
        # each seen a few hundred times at 500k impressions, so the signal must travel through
        # element features shared across products.
        WorldConfig(
            "per_product",
            n_ads=120,
            base_logit=-3.2,
            n_components=4,
            n_candidates=6,
            n_features=6,
            appeal_scale=0.5,
            main_scale=0.2,
            feature_share=0.85,
            interaction_scale=0.15,
            per_product=True,
            n_impressions=500_000,
        ),
        WorldConfig(
            "per_product_contextual",
            n_ads=120,
            base_logit=-3.2,
            n_components=3,
            n_candidates=8,
            n_features=6,
            appeal_scale=0.5,
            main_scale=0.2,
            feature_share=0.85,
            interaction_scale=0.1,
            context_flip=1.5,
            per_product=True,
            n_impressions=500_000,
        ),
        WorldConfig(
            "per_product_3way",
            n_ads=120,
            base_logit=-3.2,
            n_components=4,
            n_candidates=5,
            n_features=6,
            appeal_scale=0.5,
            main_scale=0.15,
            feature_share=0.85,
            interaction_scale=0.1,
            three_way_scale=0.2,
            per_product=True,
            n_impressions=500_000,
        ),
    )
}


def world_config(name: str, **overrides) -> WorldConfig:
    """A preset by name, with field overrides; errors list the presets."""
    if name not in WORLDS:
        raise ValueError(f"unknown world '{name}'; choose one of: {', '.join(WORLDS)}")
    return replace(WORLDS[name], **overrides)


@dataclass
class GroundTruth:
    """True CTR of any combination, in the world's own (catalog) codes.

    Arrays: appeal (n_ads,), ctx_appeal (n_ctx,), main[k] (n_elements_k,),
    style[k] (n_elements_k, rank), inter[(k, l)] (rank, rank).
    """

    config: WorldConfig
    ads: tuple[str, ...]
    components: tuple[str, ...]
    elements: tuple[tuple[str, ...], ...]
    appeal: np.ndarray
    ctx_appeal: np.ndarray
    main: list[np.ndarray]
    style: list[np.ndarray]
    inter: dict[tuple[int, int], np.ndarray]
    cold: list[np.ndarray]  # boolean (n_elements_k,) never logged
    # (k, l, m) -> (rank, rank, rank): three-way terms over styles; empty in most worlds
    inter3: dict[tuple[int, int, int], np.ndarray] = field(default_factory=dict)

    @property
    def n_context(self) -> int:
        return len(self.ctx_appeal)

    def logit(
        self, ads: np.ndarray, combos: np.ndarray, ctx: np.ndarray | None = None
    ) -> np.ndarray:
        """True logits. ads (n,), combos (n, K) element codes, ctx (n, n_ctx) or None."""
        z = self.config.base_logit + self.appeal[ads]
        sign = np.ones(len(ads))
        if self.n_context:
            if ctx is None:
                raise ValueError(f"world '{self.config.name}' needs context columns")
            z = z + ctx @ self.ctx_appeal
            sign = np.where(ctx[:, 0] > 0.5, 1.0, -1.0)
        flip = 1.0 + self.config.context_flip * sign
        for k in range(len(self.components)):
            z = z + self.main[k][combos[:, k]] * flip
        for (k, m), w in self.inter.items():
            z = z + np.einsum(
                "nr,rs,ns->n", self.style[k][combos[:, k]], w, self.style[m][combos[:, m]]
            )
        for (k, m, j), w in self.inter3.items():
            z = z + np.einsum(
                "nr,rst,ns,nt->n",
                self.style[k][combos[:, k]],
                w,
                self.style[m][combos[:, m]],
                self.style[j][combos[:, j]],
            )
        return np.clip(z, _LOGIT_MIN, _LOGIT_MAX)

    def element_effects(self) -> list[np.ndarray]:
        """Each element's average marginal effect on the logit, centred per component.

        E[logit | e_k = e] - E[logit] with every other component drawn uniformly from its
        catalog elements and ctx_0 a fair coin (so the flip averages out): the main effect
        plus each pairwise term averaged over the partner component. Unlike a split of the
        pairwise terms, this is identified from clicks, so models can be compared on it.
        """
        out = [m.copy() for m in self.main]
        for (k, m), w in self.inter.items():
            out[k] += self.style[k] @ w @ self.style[m].mean(0)
            out[m] += self.style[m] @ w.T @ self.style[k].mean(0)
        for (k, m, j), w in self.inter3.items():
            mk, mm, mj = (self.style[c].mean(0) for c in (k, m, j))
            out[k] += np.einsum("nr,rst,s,t->n", self.style[k], w, mm, mj)
            out[m] += np.einsum("ns,rst,r,t->n", self.style[m], w, mk, mj)
            out[j] += np.einsum("nt,rst,r,s->n", self.style[j], w, mk, mm)
        return [o - o.mean() for o in out]

    def ctr(self, ads: np.ndarray, combos: np.ndarray, ctx: np.ndarray | None = None) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logit(ads, combos, ctx)))

    def aligned(self, catalog: Catalog) -> tuple[np.ndarray, list[np.ndarray]]:
        """Maps from another catalog's codes (same ids) to this world's codes."""
        return code_maps(self.ads, self.components, self.elements, catalog)

    # Persistence: plain arrays + JSON, nothing pickled.
    def save(self, path: str, client=None) -> None:
        arrays: dict[str, np.ndarray] = {
            "appeal": self.appeal,
            "ctx_appeal": self.ctx_appeal,
        }
        for k in range(len(self.components)):
            arrays[f"main_{k}"] = self.main[k]
            arrays[f"style_{k}"] = self.style[k]
            arrays[f"cold_{k}"] = self.cold[k]
        for (k, m), w in self.inter.items():
            arrays[f"inter_{k}_{m}"] = w
        for (k, m, j), w in self.inter3.items():
            arrays[f"inter3_{k}_{m}_{j}"] = w
        meta = {
            "config": asdict(self.config),
            "ads": list(self.ads),
            "components": list(self.components),
            "elements": [list(e) for e in self.elements],
        }
        import io

        buf = io.BytesIO()
        np.savez(buf, meta=np.array(json.dumps(meta)), **arrays)
        storage.write_bytes(path, buf.getvalue(), client=client)

    @staticmethod
    def load(path: str, client=None) -> GroundTruth:
        import io

        with np.load(io.BytesIO(storage.read_bytes(path, client=client)), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            n_comp = len(meta["components"])
            inter, inter3 = {}, {}
            for name in z.files:
                if name.startswith("inter_"):
                    _, k, m = name.split("_")
                    inter[(int(k), int(m))] = z[name]
                elif name.startswith("inter3_"):
                    _, k, m, j = name.split("_")
                    inter3[(int(k), int(m), int(j))] = z[name]
            return GroundTruth(
                config=WorldConfig(**meta["config"]),
                ads=tuple(meta["ads"]),
                components=tuple(meta["components"]),
                elements=tuple(tuple(e) for e in meta["elements"]),
                appeal=z["appeal"],
                ctx_appeal=z["ctx_appeal"],
                main=[z[f"main_{k}"] for k in range(n_comp)],
                style=[z[f"style_{k}"] for k in range(n_comp)],
                inter=inter,
                cold=[z[f"cold_{k}"] for k in range(n_comp)],
                inter3=inter3,
            )


@dataclass
class World:
    """A generated world: catalog, constraints, truth, and the logging policy's choices."""

    config: WorldConfig
    catalog: Catalog
    constraints: Constraints
    truth: GroundTruth
    greedy: np.ndarray  # (n_ads, K) the logging policy's greedy combination per ad
    warm: list[list[np.ndarray]]  # per ad, per component: candidates the logger may show
    n_legal_warm: np.ndarray  # (n_ads,) legal combinations over warm candidates
    popularity: np.ndarray  # (n_ads,) share of impressions


def make_world(config: WorldConfig, seed: int) -> World:
    """Draw a world's parameters. Deterministic in (config, seed)."""
    rng = np.random.default_rng([seed, _stable_hash(config.name)])
    K = config.n_components
    components = COMPONENT_NAMES[:K]
    ads = tuple(f"ad_{i:04d}" for i in range(config.n_ads))
    elements = _element_ids(config, components)
    P = [len(e) for e in elements]
    feats = [rng.normal(size=(P[k], config.n_features)) for k in range(K)]
    effects = _nonlinear_effects if config.per_product else _linear_effects
    main, style = effects(config, feats, rng)
    inter, inter3 = _interaction_weights(config, rng)
    appeal = config.appeal_scale * rng.normal(size=config.n_ads)
    ctx_appeal = np.array([0.2, 0.0]) if config.contextual else np.zeros(0)
    cold = _cold_elements(config, P, rng)
    cand_rows = _candidates(config, cold, rng)
    catalog = _catalog(ads, components, elements, feats, cand_rows)
    # The catalog's codes follow first appearance; align the truth to them.
    truth0 = GroundTruth(
        config, ads, components, elements, appeal, ctx_appeal, main, style, inter, cold, inter3
    )
    _, emap = truth0.aligned(catalog)
    truth = GroundTruth(
        config,
        catalog.ads,
        components,
        catalog.elements,
        appeal,
        ctx_appeal,
        [main[k][emap[k]] for k in range(K)],
        [style[k][emap[k]] for k in range(K)],
        inter,
        [cold[k][emap[k]] for k in range(K)],
        inter3,
    )
    constraints = _constraints(config, catalog, truth, rng)
    warm = [
        [c[~truth.cold[k][c]] for k, c in enumerate(catalog.candidates[a])]
        for a in range(config.n_ads)
    ]
    n_legal_warm = np.array(
        [count_legal(catalog, constraints, a, warm[a]) for a in range(config.n_ads)]
    )
    if np.any(n_legal_warm == 0):
        raise ValueError(f"world '{config.name}': an ad has no legal loggable combination")
    greedy = _greedy_combinations(config, catalog, constraints, truth, warm, rng)
    ranks = np.argsort(np.argsort(-appeal))  # most appealing ads are the most shown
    pop = 1.0 / (1.0 + ranks) ** config.popularity_skew
    return World(config, catalog, constraints, truth, greedy, warm, n_legal_warm, pop / pop.sum())


def _element_ids(config: WorldConfig, components) -> tuple[tuple[str, ...], ...]:
    """Element ids per component: a pool shared by all ads, or (per_product) each ad's own."""
    if config.per_product:
        return tuple(
            tuple(
                f"{c[:3]}_{a:04d}_{j:02d}"
                for a in range(config.n_ads)
                for j in range(config.n_candidates)
            )
            for c in components
        )
    return tuple(tuple(f"{c[:3]}_{j:03d}" for j in range(config.pool_size)) for c in components)


def _mix(from_feat: np.ndarray, config: WorldConfig, rng) -> np.ndarray:
    """Main effects: a share of their variance from the features, the rest idiosyncratic."""
    from_feat = (from_feat - from_feat.mean()) / (from_feat.std() + 1e-9)
    noise = rng.normal(size=len(from_feat))
    noise = (noise - noise.mean()) / (noise.std() + 1e-9)
    m = np.sqrt(config.feature_share) * from_feat + np.sqrt(1 - config.feature_share) * noise
    return config.main_scale * m


def _linear_effects(config: WorldConfig, feats, rng) -> tuple[list, list]:
    """Main effects and interaction styles linear in the features."""
    F, R = config.n_features, config.style_rank
    main, style = [], []
    for f in feats:
        beta = rng.normal(size=F) / np.sqrt(F)
        main.append(_mix(f @ beta, config, rng))
        proj = rng.normal(size=(F, R)) / np.sqrt(F)
        style.append(f @ proj)
    return main, style


def _nonlinear_effects(config: WorldConfig, feats, rng, hidden: int = 8) -> tuple[list, list]:
    """Quality a random one-hidden-layer function of the features; styles a saturating
    projection of them (compatibility between components is then nonlinear in features)."""
    F, R = config.n_features, config.style_rank
    main, style = [], []
    for f in feats:
        w1 = rng.normal(size=(F, hidden)) / np.sqrt(F)
        b1 = rng.normal(size=hidden) * 0.5
        w2 = rng.normal(size=hidden) / np.sqrt(hidden)
        main.append(_mix(np.tanh(f @ w1 + b1) @ w2, config, rng))
        proj = rng.normal(size=(F, R)) * 1.5 / np.sqrt(F)
        style.append(np.tanh(f @ proj) * np.sqrt(2.0))
    return main, style


def _interaction_weights(config: WorldConfig, rng) -> tuple[dict, dict]:
    K, R = config.n_components, config.style_rank
    inter: dict[tuple[int, int], np.ndarray] = {}
    if config.interaction_scale > 0:
        for k in range(K):
            for m_ in range(k + 1, K):
                # Divided by R so that each pairwise term has SD ~ interaction_scale.
                inter[(k, m_)] = config.interaction_scale / R * rng.normal(size=(R, R))
    inter3: dict[tuple[int, int, int], np.ndarray] = {}
    if config.three_way_scale > 0:
        inter3[(0, 1, 2)] = config.three_way_scale / R**1.5 * rng.normal(size=(R, R, R))
    return inter, inter3


def _cold_elements(config: WorldConfig, sizes: list[int], rng) -> list[np.ndarray]:
    cold = [np.zeros(p, dtype=bool) for p in sizes]
    if config.cold_start_share > 0:
        for k, p in enumerate(sizes):
            n_cold = max(1, round(config.cold_start_share * p))
            cold[k][rng.choice(p, n_cold, replace=False)] = True
    return cold


def _candidates(config: WorldConfig, cold: list[np.ndarray], rng) -> list[list[np.ndarray]]:
    """Each ad's candidates per component (element indices), at least one loggable."""
    K, C = config.n_components, config.n_candidates
    if config.per_product:
        return [[np.arange(a * C, (a + 1) * C) for _ in range(K)] for a in range(config.n_ads)]
    out = []
    for _ in range(config.n_ads):
        per = []
        for k in range(K):
            pick = np.sort(rng.choice(config.pool_size, C, replace=False))
            if cold[k][pick].all():  # keep at least one loggable candidate
                pick[0] = np.flatnonzero(~cold[k])[0]
                pick = np.unique(pick)
            per.append(pick)
        out.append(per)
    return out


def _greedy_combinations(config, catalog, constraints, truth, warm, rng) -> np.ndarray:
    """The logging policy's greedy combination per ad."""
    greedy = np.zeros((config.n_ads, config.n_components), dtype=np.int64)
    ctx0 = _default_context(truth, 1)
    for a in range(config.n_ads):
        legal = legal_combinations(catalog, constraints, a, warm[a])
        if config.greedy == "confounded":
            # Popular products shown with bad creatives, unpopular ones with good creatives:
            # naive per-element CTRs then credit elements with the product's appeal.
            ctx = None if ctx0 is None else np.repeat(ctx0, len(legal), 0)
            z = truth.logit(np.full(len(legal), a), legal, ctx)
            appeal = truth.appeal
            pick = np.argmin(z) if appeal[a] > np.median(appeal) else np.argmax(z)
            greedy[a] = legal[pick]
        else:
            greedy[a] = legal[rng.integers(len(legal))]
    return greedy


def _stable_hash(s: str) -> int:
    return int.from_bytes(s.encode()[:8].ljust(8, b"\0"), "little") % (2**32)


def _default_context(truth: GroundTruth, n: int) -> np.ndarray | None:
    return np.zeros((n, truth.n_context)) if truth.n_context else None


def _catalog(ads, components, elements, feats, cand_rows) -> Catalog:
    rows = []
    for a, ad in enumerate(ads):
        for k, comp in enumerate(components):
            for e in cand_rows[a][k]:
                rows.append((ad, comp, elements[k][e], *np.round(feats[k][e], 4)))
    cols = [AD, COMPONENT, ELEMENT, *[f"feat_{j}" for j in range(feats[0].shape[1])]]
    df = pd.DataFrame(rows, columns=cols)
    return Catalog.from_frame(df, "simulated catalog")


def _constraints(config: WorldConfig, catalog: Catalog, truth: GroundTruth, rng) -> Constraints:
    K = catalog.n_components
    rows: list[tuple[int, int, int, int, int]] = []
    if K >= 2:
        for _ in range(config.n_global_forbidden):
            ka, kb = np.sort(rng.choice(K, 2, replace=False))
            ea = rng.integers(len(catalog.elements[ka]))
            eb = rng.integers(len(catalog.elements[kb]))
            rows.append((-1, int(ka), int(ea), int(kb), int(eb)))
        n_forbid = round(config.forbid_best_share * catalog.n_ads)
        for a in rng.choice(catalog.n_ads, n_forbid, replace=False) if n_forbid else []:
            combos = legal_combinations(catalog, Constraints.empty(), int(a))
            ctx = _default_context(truth, len(combos))
            best = combos[np.argmax(truth.logit(np.full(len(combos), a), combos, ctx))]
            ka, kb = np.sort(rng.choice(K, 2, replace=False))
            rows.append((int(a), int(ka), int(best[ka]), int(kb), int(best[kb])))
    rows = sorted(set(rows))
    if not rows:
        return Constraints.empty()
    arr = np.array(rows, dtype=np.int64).T
    cons = Constraints(arr[0], arr[1], arr[2], arr[3], arr[4])
    # A world whose constraints leave an ad nothing to show is a broken preset.
    for a in range(catalog.n_ads):
        if touched_by_constraints(cons, a) and count_legal(catalog, cons, a) == 0:
            raise ValueError(f"world '{config.name}': constraints leave ad {a} no combination")
    return cons


def sample_contexts(truth: GroundTruth, n: int, rng: np.random.Generator) -> np.ndarray | None:
    """ctx_0 ~ Bernoulli(0.5) flips preferences; ctx_1 ~ N(0, 1) is noise the model must ignore."""
    if not truth.n_context:
        return None
    return np.stack([rng.integers(0, 2, n).astype(np.float64), rng.normal(size=n)], 1)


def log_impressions(world: World, n: int, seed: int) -> pd.DataFrame:
    """Impressions drawn from the world's logging policy, with exact propensities."""
    rng = np.random.default_rng([seed, 7])
    cfg, cat, cons = world.config, world.catalog, world.constraints
    K = cat.n_components
    ads = rng.choice(cat.n_ads, size=n, p=world.popularity)
    explore = rng.random(n) < cfg.epsilon
    combos = world.greedy[ads].copy()
    todo = np.flatnonzero(explore)
    # Uniform over legal warm combinations by rejection: each component uniform, redraw illegal.
    while len(todo):
        for k in range(K):
            for a in np.unique(ads[todo]):
                rows = todo[ads[todo] == a]
                combos[rows, k] = world.warm[a][k][
                    rng.integers(len(world.warm[a][k]), size=len(rows))
                ]
        bad = (
            cons.violations(ads[todo], combos[todo]) >= 0
            if len(cons)
            else np.zeros(len(todo), bool)
        )
        todo = todo[bad]
    is_greedy = np.all(combos == world.greedy[ads], axis=1)
    propensity = cfg.epsilon / world.n_legal_warm[ads] + (1 - cfg.epsilon) * is_greedy
    ctx = sample_contexts(world.truth, n, rng)
    ctr = world.truth.ctr(ads, combos, ctx)
    click = (rng.random(n) < ctr).astype(np.int8)
    ts = T0 + np.sort(rng.random(n)) * 30 * 86_400
    data: dict[str, object] = {AD: np.asarray(cat.ads, dtype=object)[ads]}
    for k, comp in enumerate(cat.components):
        data[comp] = np.asarray(cat.elements[k], dtype=object)[combos[:, k]]
    data[CLICK] = click
    data[PROPENSITY] = propensity
    data[TIMESTAMP] = np.round(ts, 6)
    if ctx is not None:
        for j in range(ctx.shape[1]):
            data[f"ctx_{j}"] = ctx[:, j]
    return pd.DataFrame(data)


def policy_propensity(world: World, ad: int, combos: np.ndarray) -> np.ndarray:
    """The logging policy's probability of each given combination of one ad."""
    cfg = world.config
    warm_ok = np.ones(len(combos), dtype=bool)
    for k in range(world.catalog.n_components):
        warm_ok &= np.isin(combos[:, k], world.warm[ad][k])
    legal = world.constraints.violations(np.full(len(combos), ad), combos) < 0
    uniform = cfg.epsilon * (warm_ok & legal) / world.n_legal_warm[ad]
    return uniform + (1 - cfg.epsilon) * np.all(combos == world.greedy[ad], axis=1)


def contexts_frame(world: World) -> pd.DataFrame:
    """Recommendation inputs: one row per ad, or per ad and ctx_0 value in a contextual world."""
    if not world.truth.n_context:
        return pd.DataFrame({AD: list(world.catalog.ads)})
    rows = [(ad, float(c0), 0.0) for ad in world.catalog.ads for c0 in (0, 1)]
    return pd.DataFrame(rows, columns=[AD, "ctx_0", "ctx_1"])


@dataclass(frozen=True)
class SimulationOutputs:
    catalog: str
    impressions: str
    constraints: str | None
    contexts: str
    ground_truth: str
    world: str


def simulate(
    world: str | WorldConfig,
    seed: int,
    out_dir: str,
    n_impressions: int | None = None,
    impressions_format: str = "csv",
    client=None,
) -> SimulationOutputs:
    """Write a world's catalog, constraints, impressions, contexts and ground truth to out_dir."""
    config = world_config(world) if isinstance(world, str) else world
    if impressions_format not in ("csv", "parquet"):
        raise ValueError(
            f"impressions_format must be 'csv' or 'parquet', got '{impressions_format}'"
        )
    n = config.n_impressions if n_impressions is None else n_impressions
    if n < 1:
        raise ValueError(f"n_impressions must be >= 1, got {n}")
    w = make_world(config, seed)
    j = storage.join
    out = SimulationOutputs(
        catalog=j(out_dir, "catalog.csv"),
        impressions=j(out_dir, f"impressions.{impressions_format}"),
        constraints=j(out_dir, "constraints.csv") if len(w.constraints) else None,
        contexts=j(out_dir, "contexts.csv"),
        ground_truth=j(out_dir, "ground_truth.npz"),
        world=j(out_dir, "world.json"),
    )
    storage.makedirs(out_dir)
    storage.write_table(w.catalog.to_frame(), out.catalog, client=client)
    if out.constraints:
        storage.write_table(w.constraints.to_frame(w.catalog), out.constraints, client=client)
    log = log_impressions(w, n, seed)
    storage.write_table(log, out.impressions, client=client)
    storage.write_table(contexts_frame(w), out.contexts, client=client)
    w.truth.save(out.ground_truth, client=client)
    cat = w.catalog
    stats = {
        "world": config.name,
        "seed": seed,
        "n_ads": cat.n_ads,
        "components": list(cat.components),
        "candidates_per_component": config.n_candidates,
        "combinations_per_ad": cat.n_combinations(0),
        "forbidden_pairs": len(w.constraints),
        "context_columns": [c for c in log.columns if c.startswith("ctx_")],
        "n_impressions": n,
        "clicks": int(log[CLICK].sum()),
        "click_rate": round(float(log[CLICK].mean()), 5),
        "files": asdict(out),
        "config": asdict(config),
    }
    storage.write_json(out.world, stats, client=client)
    return out


def world_summary(out: SimulationOutputs, client=None) -> dict:
    """What ``simulate`` wrote, for printing: the world.json written next to the data."""
    stats = storage.read_json(out.world, client=client)
    stats.pop("config", None)
    return stats


__all__ = [
    "WORLDS",
    "GroundTruth",
    "World",
    "WorldConfig",
    "contexts_frame",
    "log_impressions",
    "make_world",
    "policy_propensity",
    "simulate",
    "world_config",
    "world_summary",
]
