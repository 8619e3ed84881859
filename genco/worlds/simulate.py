"""Simulated worlds with known ground truth: catalog, constraints, logged impressions.

Worlds come in two kinds (``genco.worlds.config``): elements drawn from a pool shared by all
ads, with main effects and interaction styles linear in the element features; or (the
``per_product`` worlds, the usual e-commerce case) every ad with its own elements, quality and
styles nonlinear functions of features drawn from shared distributions, optionally with
three-way effects. The truth is ``genco.worlds.truth.GroundTruth``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

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
)
from genco.data.space import count_legal, legal_combinations, touched_by_constraints
from genco.errors import ConfigError
from genco.worlds.config import COMPONENT_NAMES, WORLDS, WorldConfig, world_config
from genco.worlds.truth import GroundTruth

T0 = 1_767_225_600.0  # 2026-01-01 UTC: simulated logs start here


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
    # per component (n_elements_k,): the part of each element's main effect that its features
    # do not explain (``truth.main`` = feature part + this); what only its own clicks can tell
    idiosyncratic: list[np.ndarray]


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
    main, style, idiosyncratic = effects(config, feats, rng)
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
        raise ConfigError(f"world '{config.name}': an ad has no legal loggable combination")
    greedy = _greedy_combinations(config, catalog, constraints, truth, warm, rng)
    ranks = np.argsort(np.argsort(-appeal))  # most appealing ads are the most shown
    pop = 1.0 / (1.0 + ranks) ** config.popularity_skew
    idiosyncratic = [idiosyncratic[k][emap[k]] for k in range(K)]
    return World(
        config,
        catalog,
        constraints,
        truth,
        greedy,
        warm,
        n_legal_warm,
        pop / pop.sum(),
        idiosyncratic,
    )


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


def _mix(from_feat: np.ndarray, config: WorldConfig, rng) -> tuple[np.ndarray, np.ndarray]:
    """Main effects: a share of their variance from the features, the rest idiosyncratic.
    Returns (main effects, their idiosyncratic part)."""
    from_feat = (from_feat - from_feat.mean()) / (from_feat.std() + 1e-9)
    noise = rng.normal(size=len(from_feat))
    noise = (noise - noise.mean()) / (noise.std() + 1e-9)
    m = np.sqrt(config.feature_share) * from_feat + np.sqrt(1 - config.feature_share) * noise
    return config.main_scale * m, config.main_scale * np.sqrt(1 - config.feature_share) * noise


def _linear_effects(config: WorldConfig, feats, rng) -> tuple[list, list, list]:
    """Main effects and interaction styles linear in the features (and the main effects'
    idiosyncratic parts)."""
    F, R = config.n_features, config.style_rank
    main, style, idio = [], [], []
    for f in feats:
        beta = rng.normal(size=F) / np.sqrt(F)
        m, i = _mix(f @ beta, config, rng)
        main.append(m)
        idio.append(i)
        proj = rng.normal(size=(F, R)) / np.sqrt(F)
        style.append(f @ proj)
    return main, style, idio


def _nonlinear_effects(config: WorldConfig, feats, rng, hidden: int = 8) -> tuple[list, list, list]:
    """Quality a random one-hidden-layer function of the features; styles a saturating
    projection of them (compatibility between components is then nonlinear in features)."""
    F, R = config.n_features, config.style_rank
    main, style, idio = [], [], []
    for f in feats:
        w1 = rng.normal(size=(F, hidden)) / np.sqrt(F)
        b1 = rng.normal(size=hidden) * 0.5
        w2 = rng.normal(size=hidden) / np.sqrt(hidden)
        m, i = _mix(np.tanh(f @ w1 + b1) @ w2, config, rng)
        main.append(m)
        idio.append(i)
        proj = rng.normal(size=(F, R)) * 1.5 / np.sqrt(F)
        style.append(np.tanh(f @ proj) * np.sqrt(2.0))
    return main, style, idio


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
            raise ConfigError(f"world '{config.name}': constraints leave ad {a} no combination")
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
    data: dict[str, object] = {AD: cat.ads.take(ads)}
    for k, comp in enumerate(cat.components):
        data[comp] = cat.elements[k].take(combos[:, k])
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
        raise ConfigError(
            f"impressions_format must be 'csv' or 'parquet', got '{impressions_format}'"
        )
    n = config.n_impressions if n_impressions is None else n_impressions
    if n < 1:
        raise ConfigError(f"n_impressions must be >= 1, got {n}")
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
    storage.write_table(w.catalog.to_arrow(), out.catalog, client=client)
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
