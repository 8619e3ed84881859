"""What both trainers share: the device they train on, and optimizers that keep a step's
cost to what its batch touches (sparse rows of the id tables, dense Adam for the rest)."""

from __future__ import annotations

import math

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


class RowAdam(torch.optim.Optimizer):
    """torch.optim.SparseAdam's update (the same formula, in the same order) done with row
    gathers and scatters (``index_select``/``index_copy_``/``index_add_``) on the coalesced
    gradient's rows instead of sparse tensor arithmetic (``sparse_mask`` and sparse ``add_``
    on the moment tables). Parameters: dense tensors with sparse gradients
    (``nn.Embedding(sparse=True)``), or ``update`` with RowStep's dense row gradients. A
    4,096-impression step at 1k ads: optimizer ~9.3 ms CPU with SparseAdam, 8.0 with this
    step, 4.0 with RowStep (BENCHMARKS.md, "The streamed fit's cost, cut")."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.coalesce()  # the update is non-linear: rows must be unique
                rows, g = grad.indices()[0], grad.values()  # (R,), (R, D)
                if not len(rows):
                    continue
                self.update(p, rows, g, group)

    @torch.no_grad()
    def update(self, p: torch.Tensor, rows: torch.Tensor, g: torch.Tensor, group: dict) -> None:
        """SparseAdam's update of the unique rows ``rows`` (R,) of ``p`` (in param group
        ``group``) with their gradient g (R, D)."""
        beta1, beta2 = group["betas"]
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        m, v = state["exp_avg"], state["exp_avg_sq"]
        old_m, old_v = m.index_select(0, rows), v.index_select(0, rows)
        new_m = g.sub(old_m).mul_(1 - beta1).add_(old_m)
        new_v = g.pow(2).sub_(old_v).mul_(1 - beta2).add_(old_v)
        m.index_copy_(0, rows, new_m)
        v.index_copy_(0, rows, new_v)
        bias1, bias2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
        step_size = group["lr"] * math.sqrt(bias2) / bias1
        update = new_m.div_(new_v.sqrt_().add_(group["eps"]))
        p.index_add_(0, rows, update, alpha=-step_size)


class RowStep:
    """One training step's rows of the sparse id tables as small dense leaves: the step looks
    up ``self.ad``/``self.elem`` (indices into the leaves) through ``RewardModel.lookup``,
    backward fills each leaf's dense gradient (R, D), and ``Optimizers.step(rows=...)`` hands
    it to RowAdam. What a sparse gradient cost (concatenating the forward's and the L2
    term's (B * K, D) entries, then sorting them in ``coalesce``) becomes one ``unique``
    per index tensor. A context manager: the model looks up its own tables again after."""

    def __init__(self, model: nn.Module, ad: torch.Tensor, elem: torch.Tensor) -> None:
        self.model, self.ad, self.elem = model, ad, elem
        self.parts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(weight): rows, leaf
        tables: dict[str, torch.Tensor] = {}
        inverse: dict[str, torch.Tensor] = {}
        for name, key in (
            ("appeal", "ad"),
            ("id_main", "elem"),
            ("id_ffm", "elem"),
            ("id3", "elem"),
        ):
            table = getattr(model, name, None)
            if not (isinstance(table, nn.Embedding) and table.sparse):
                continue
            if key not in inverse:
                rows, inverse[key] = getattr(self, key).unique(return_inverse=True)
                inverse[key + "_rows"] = rows
            rows = inverse[key + "_rows"]
            leaf = table.weight.detach().index_select(0, rows).requires_grad_()
            tables[name] = leaf
            keep = rows != table.padding_idx  # the unknown row stays zero, as with sparse
            self.parts[id(table.weight)] = (rows[keep], leaf, keep)
        self.ad = inverse.get("ad", ad)
        self.elem = inverse.get("elem", elem)
        model.row_tables = tables

    def __enter__(self) -> RowStep:
        return self

    def __exit__(self, *exc) -> None:
        self.model.row_tables = None

    def grads(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """id(weight) -> (rows, their gradient), for the leaves backward reached."""
        out = {}
        for key, (rows, leaf, keep) in self.parts.items():
            if leaf.grad is not None:
                out[key] = (rows, leaf.grad[keep])
        return out


class Optimizers:
    """RowAdam (SparseAdam's update) over the rows a step touched of each sparse embedding
    table, Adam over every other parameter: a step costs what its batch touches, not the
    catalog's size."""

    def __init__(self, model: nn.Module, lr: float) -> None:
        sparse_ids = {
            id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse
        }
        sparse = [p for p in model.parameters() if id(p) in sparse_ids]
        dense = [p for p in model.parameters() if id(p) not in sparse_ids]
        self.all = []
        if sparse:
            self.all.append(RowAdam(sparse, lr=lr))
        if dense:
            self.all.append(torch.optim.Adam(dense, lr=lr))

    def zero_grad(self) -> None:
        for o in self.all:
            o.zero_grad(set_to_none=True)

    def step(self, rows: RowStep | None = None) -> None:
        """One step; with ``rows``, the sparse tables' gradients are its leaves'."""
        grads = rows.grads() if rows is not None else {}
        for o in self.all:
            if isinstance(o, RowAdam) and grads:
                for group in o.param_groups:
                    for p in group["params"]:
                        if id(p) in grads:
                            o.update(p, *grads[id(p)], group)
            else:
                o.step()

    def scale_lr(self, factor: float) -> None:
        for o in self.all:
            for group in o.param_groups:
                group["lr"] *= factor


def touched_rows(model: nn.Module, ad: torch.Tensor, elem: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rows of each sparse id table that steps on these (ad, elem) inputs can move (a
    sparse step moves no other row): for ``Snapshot``. Knows the reward model's tables."""
    rows: dict[str, torch.Tensor] = {}
    for name, index in (("appeal", ad), ("id_main", elem), ("id_ffm", elem), ("id3", elem)):
        table = getattr(model, name, None)
        if isinstance(table, nn.Embedding) and table.sparse:
            rows[f"{name}.weight"] = index.unique()
    return rows


class Snapshot:
    """A copy of a model's parameters, taken and restored in place (buffers allocated once,
    not a deepcopy of the state dict each time): every dense parameter whole and, of a sparse
    table named in ``rows``, only those rows. Buffers are not copied: a fit does not change
    them. Memory at 100k ads (4M element rows): a whole copy of the id tables is 0.58 GiB."""

    def __init__(self, model: nn.Module, rows: dict[str, torch.Tensor] | None = None) -> None:
        self.rows = rows or {}
        self.saved: dict[str, torch.Tensor] = {}
        self.take(model)

    @torch.no_grad()
    def take(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            r = self.rows.get(name)
            src = p if r is None else p.index_select(0, r)
            if name in self.saved:
                self.saved[name].copy_(src)
            else:
                self.saved[name] = src.detach().clone()

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            r = self.rows.get(name)
            if r is None:
                p.copy_(self.saved[name])
            else:
                p.index_copy_(0, r, self.saved[name])
