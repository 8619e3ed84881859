"""The reward model's configuration (``genco.models.reward``): one typed, self-validating
dataclass, from which the CLI flags and pipeline parameters are built."""

from __future__ import annotations

from dataclasses import dataclass, field

# Degrees of freedom of the combination residuals' Student-t prior (``genco.training.
# residuals``): heavy tails, so the few combinations far from the structure (the ones an argmax
# cares about) are shrunk less than the many near it. Serving's posterior draws use it too.
RESIDUAL_DOF = 4.0


@dataclass(frozen=True)
class RewardModelConfig:
    dim: int = field(default=8, metadata={"help": "Size of each field-aware interaction vector."})
    use_appeal: bool = field(
        default=True, metadata={"help": "Per-ad appeal term (keeps popularity out of credit)."}
    )
    use_interactions: bool = field(default=True, metadata={"help": "Pairwise terms on/off."})
    epochs: int = field(default=30, metadata={"help": "Maximum passes over the training log."})
    batch_size: int = field(default=4096, metadata={"help": "Impressions per gradient step."})
    lr: float = field(default=0.01, metadata={"help": "Adam learning rate."})
    l2_id: float = field(
        default=0.0,
        metadata={
            "help": "L2 on id embeddings (pulls rare elements to their feature prediction); "
            "0 = chosen on the held-out slice from L2_ID_GRID."
        },
    )
    l2_dense: float = field(default=1e-6, metadata={"help": "L2 on feature projections."})
    val_fraction: float = field(
        default=0.1, metadata={"help": "Held-out share: the latest impressions, or random."}
    )
    patience: int = field(
        default=3,
        metadata={"help": "Epochs without improvement to stop; each one halves the step size."},
    )
    propensity_weighting: bool = field(
        default=False, metadata={"help": "Weight impressions by 1/propensity (mean 1)."}
    )
    max_weight: float = field(default=20.0, metadata={"help": "Clip of normalised weights."})
    init_scale: float = field(default=0.05, metadata={"help": "SD of initial interaction vectors."})
    dim3: int = field(
        default=4,
        metadata={
            "help": "Size of each element's three-way vector u(e) (id part + feature "
            "projection): adds sum over component triples k<l<m of <u(e_k), u(e_l), u(e_m)> "
            "(a third-order factorization machine), kept only if it lowers the held-out loss "
            "by more than 2 standard errors (a paired test over the held-out impressions); "
            "0 = no three-way term."
        },
    )
    feature_hidden: int = field(
        default=0,
        metadata={
            "help": "Hidden units of each component's feature tower (element features to "
            "main-effect coefficients and interaction vectors, beside the linear map), kept "
            "only when it lowers the held-out log loss by more than 2 standard errors (a "
            "paired test over the held-out impressions); 0 = linear only."
        },
    )
    residual: bool = field(
        default=True,
        metadata={
            "help": "Per (ad, combination) residual on top of the structure, shrunk by its own "
            "traffic (empirical Bayes): the observed CTR where traffic is plenty, the "
            "structure where it is thin."
        },
    )
    residual_sd: float = field(
        default=0.0,
        metadata={
            "help": "Scale of the residuals' Student-t prior on the logit; 0 = chosen by "
            "marginal likelihood from genco.training.residuals.RESIDUAL_SD_GRID."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for init, split and shuffling."})
    device: str = field(
        default="auto",
        metadata={"help": "Where to train: auto (cuda when present), cpu or cuda."},
    )

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be one of auto, cpu, cuda, got '{self.device}'")
        positive = ("dim", "epochs", "batch_size", "lr", "max_weight", "init_scale")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("l2_id", "l2_dense", "residual_sd", "feature_hidden", "dim3"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
