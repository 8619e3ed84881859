"""Simulated worlds' parameters: ``WorldConfig`` and the presets in ``WORLDS``."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from genco.errors import ConfigError

COMPONENT_NAMES = ("title", "image", "highlight", "badge", "color", "layout", "cta", "font")


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
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pool_size < self.n_candidates and not self.per_product:
            raise ConfigError(
                f"pool_size ({self.pool_size}) must be >= n_candidates ({self.n_candidates})"
            )
        if self.n_components > len(COMPONENT_NAMES):
            raise ConfigError(f"n_components must be <= {len(COMPONENT_NAMES)}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ConfigError(f"epsilon must be in [0, 1], got {self.epsilon}")
        if self.greedy not in ("random", "confounded"):
            raise ConfigError(f"greedy must be 'random' or 'confounded', got '{self.greedy}'")
        if not 0.0 <= self.cold_start_share < 1.0:
            raise ConfigError(f"cold_start_share must be in [0, 1), got {self.cold_start_share}")
        if self.three_way_scale and self.n_components < 3:
            raise ConfigError("three_way_scale needs n_components >= 3")

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
        raise ConfigError(f"unknown world '{name}'; choose one of: {', '.join(WORLDS)}")
    return replace(WORLDS[name], **overrides)
