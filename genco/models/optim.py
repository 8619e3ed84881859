"""What both trainers share: the device they train on, and optimizers that keep a step's
cost to what its batch touches (sparse rows of the id tables, dense Adam for the rest)."""

from __future__ import annotations

import torch
from torch import nn

from genco.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """'auto' = cuda when this torch build sees a GPU, else cpu; 'cuda' without one is a
    ConfigError (the default install is the CPU wheel)."""
    if name not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got '{name}'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device 'cuda': this torch build sees no GPU (torch "
            f"{torch.__version__}); use --device cpu or auto, or install a CUDA build of torch"
        )
    return torch.device(name)


# Embedding tables with more rows than this get sparse gradients (a step updates the rows
# its batch touched); smaller ones stay dense, which measured faster (per_product world,
# 2,880 element rows: 2.4-3.4 s dense vs 3.6 s sparse CPU time for the same fit).
SPARSE_MIN_ROWS = 20_000


def set_sparse(model: nn.Module, sparse: bool | None = None) -> None:
    """Sparse gradients on the embedding tables: on, off (NCCL all-reduces dense only) or,
    with None, by size (more than SPARSE_MIN_ROWS rows)."""
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            m.sparse = m.num_embeddings > SPARSE_MIN_ROWS if sparse is None else sparse


class Optimizers:
    """SparseAdam over the rows a step touched of each sparse embedding table, Adam over
    every other parameter: a step costs what its batch touches, not the catalog's size."""

    def __init__(self, model: nn.Module, lr: float) -> None:
        sparse_ids = {
            id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse
        }
        sparse = [p for p in model.parameters() if id(p) in sparse_ids]
        dense = [p for p in model.parameters() if id(p) not in sparse_ids]
        self.all = []
        if sparse:
            self.all.append(torch.optim.SparseAdam(sparse, lr=lr))
        if dense:
            self.all.append(torch.optim.Adam(dense, lr=lr))

    def zero_grad(self) -> None:
        for o in self.all:
            o.zero_grad(set_to_none=True)

    def step(self) -> None:
        for o in self.all:
            o.step()

    def scale_lr(self, factor: float) -> None:
        for o in self.all:
            for group in o.param_groups:
                group["lr"] *= factor
