"""The reward model's nonlinear feature map: one small tanh tower per component, from an
element's standardised features to what it adds to the element's main-effect coefficients
and interaction vectors, beside the linear map (``RewardModelConfig.feature_hidden``).
Whether a fit keeps it is chosen on the held-out slice (``genco.training.term_choice``)."""

from __future__ import annotations

import math

import torch
from torch import nn

# Offset of the towers' random stream from the model's seed: the other tensors' start is
# then the same with the towers or without (a fit with them switched off is the linear one).
TOWER_SEED_OFFSET = 104_729


def make_towers(
    n_components: int, n_features: int, hidden: int, n_out: int, init_scale: float, seed: int
) -> nn.ModuleList:
    """``n_components`` towers (n_features -> hidden, tanh -> n_out); none when hidden or
    n_features is 0. The output layer starts at ``init_scale`` / sqrt(hidden), its bias 0."""
    if not (hidden and n_features):
        return nn.ModuleList()
    towers = nn.ModuleList(
        nn.Sequential(nn.Linear(n_features, hidden), nn.Tanh(), nn.Linear(hidden, n_out))
        for _ in range(n_components)
    )
    g = torch.Generator().manual_seed(seed + TOWER_SEED_OFFSET)
    with torch.no_grad():
        for t in towers:
            t[0].weight.normal_(0.0, 1.0 / math.sqrt(n_features), generator=g)
            t[0].bias.normal_(0.0, 0.5, generator=g)
            t[2].weight.normal_(0.0, init_scale / math.sqrt(hidden), generator=g)
            t[2].bias.zero_()
    return towers


@torch.no_grad()
def set_towers(towers: nn.ModuleList, on: bool) -> bool:
    """Off: zero every tower weight (exactly no output; a bundle saved so loads with the
    towers off, ``genco.models.checkpoint``) and freeze them, so a fit leaves them at zero.
    On: trainable again, e.g. after their weights were restored from a snapshot taken
    before. Returns whether the towers are to be computed."""
    for p in towers.parameters():
        if not on:
            p.zero_()
        p.requires_grad_(on)
    return on and len(towers) > 0
