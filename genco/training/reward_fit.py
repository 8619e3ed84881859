"""Fitting the reward model: the structure by weighted BCE (identical impressions merged,
early stopping and the id-embedding L2 chosen on the held-out slice), then the combination
residuals (``genco.training.residuals``)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields, replace
from functools import partial

import numpy as np
import pandas as pd
import torch
from torch import nn

from genco.data.contract import Catalog
from genco.errors import ContractError
from genco.models.optim import Optimizers, RowStep, Snapshot, resolve_device, touched_rows
from genco.models.reward import BoundModel, RewardModel, RewardModelConfig
from genco.models.vocab import Encoded, Vocab, encode, fit_scalers
from genco.training.residuals import fit_residuals, merge_impressions
from genco.training.term_choice import choose_terms, paired_gain, val_logits


@dataclass
class TrainReport:
    epochs: int
    best_epoch: int
    train_rows: int
    val_rows: int
    split: str
    seconds: float
    history: list[dict]
    # What was chosen on the held-out slice (l2_id, residual_sd) with the losses behind it.
    tuning: dict = field(default_factory=dict)


def _split(enc: Encoded, config: RewardModelConfig) -> tuple[np.ndarray, np.ndarray, str]:
    n = len(enc)
    n_val = round(config.val_fraction * n)
    if n_val == 0:
        return np.arange(n), np.zeros(0, np.int64), "none"
    if enc.timestamp is not None:
        order = np.argsort(enc.timestamp, kind="stable")
        return order[: n - n_val], order[n - n_val :], "time"
    perm = np.random.default_rng(config.seed).permutation(n)
    return perm[n_val:], perm[:n_val], "random"


def train_reward_model(
    catalog: Catalog,
    impressions: pd.DataFrame | Encoded,
    config: RewardModelConfig | None = None,
    progress: bool = False,
    init: RewardModel | None = None,
) -> tuple[RewardModel, TrainReport]:
    """Fit the reward model: the structure by weighted BCE with early stopping on a held-out
    split, then (``config.residual``) the combination residuals by empirical Bayes.

    init: a previous model to warm start from (same vocabulary), e.g. production.
    """
    config = config or RewardModelConfig()
    enc = impressions if isinstance(impressions, Encoded) else encode(impressions, catalog)
    _check_learnable(enc)
    if config.propensity_weighting and enc.propensity is None:
        raise ContractError("propensity_weighting needs a 'propensity' column")
    torch.manual_seed(config.seed)
    model = RewardModel(Vocab.from_catalog(catalog, enc.context_columns), config)
    if init is not None:
        # Tensors the previous model lacks or left at zero (a three-way term or tower it did
        # not have, or rejected) keep their random start: zeros are a saddle the fit cannot leave.
        state = init.state_dict()
        dropped = ({"id3", "w3"} if not init.d3 else set()) | (
            {"tower"} if not init.tower_on else set()
        )
        state = {k: v for k, v in state.items() if k.split(".")[0] not in dropped}
        model.load_state_dict({**model.state_dict(), **state})
    bound = BoundModel(model, catalog)
    tr, va, split = _split(enc, config)
    weights = _weights(enc, tr, config)
    fit_scalers(model, catalog, enc.ctx[tr])
    with torch.no_grad():
        rate = float(enc.click[tr].mean())
        if init is None:
            model.bias.fill_(math.log(rate / (1 - rate)))
    t0 = time.perf_counter()
    history, best_epoch, tuning = _fit_tuned(model, bound, enc, tr, va, weights, config, progress)
    residual: dict = {}
    if config.residual:
        residual = fit_residuals(model, bound, enc, weights)
    report = TrainReport(
        len(history),
        best_epoch,
        len(tr),
        len(va),
        split,
        time.perf_counter() - t0,
        history,
        {**tuning, **residual},
    )
    return model, report


# Strengths tried for the id embeddings' L2 when the config leaves it at 0, strongest first:
# each fit starts from the previous one's best weights (a regularisation path, as in glmnet).
L2_ID_GRID = (1e-1, 1e-2, 1e-3)
# Warm start each L2 from the previous one's optimum (True) or all from the same start.
L2_WARM_PATH = True
# Plateaus of the held-out loss that end each point of the path (at most config.patience):
# the chosen point then goes on from its best weights for the rest of config.patience, at
# the step it would have reached (halved per plateau). The points not chosen never needed
# their last, smallest steps: they only decided the choice. 1 was too few (measured on
# per_product, 500k, 5 seeds: the first point stopped after one useful epoch, and the next,
# weaker L2 won on that extra training alone: 1e-2 on 3 seeds, 0.820 gap closed vs 0.847).
L2_PATH_PATIENCE = 2
# Above L2_SAMPLE_MIN_ROWS training rows (after merging: what an epoch costs), the path runs
# on a uniform sample of L2_SAMPLE_ROWS training impressions (the held-out slice as always),
# and only the chosen L2 is fitted on every row, from the path's best weights. `large` at 1M
# spent 20 of its 33 epochs on the two L2s not chosen, whose held-out losses were never close
# (BENCHMARKS.md, "the L2 path on a sample"). On the sample each L2 is tried at grid value
# x (training impressions / sampled ones): the penalty is averaged per impression, so the
# same prior on the id vectors is an L2 that falls as 1 / impressions (and the chosen L2 did
# move toward stronger ones on smaller logs: AES, per_product_contextual). Logs at or below
# the threshold (every per-product benchmark at 500k) take the path on all rows as before.
L2_SAMPLE_ROWS = 250_000
L2_SAMPLE_MIN_ROWS = 2 * L2_SAMPLE_ROWS
# A weaker L2 must beat the stronger one's held-out loss by L2_PATH_Z standard errors of the
# paired per-impression differences (``paired_gain``): the one-standard-error rule. "Lower"
# alone flipped a closed-loop retrain on per_product to 1e-2 on 1.1e-4 of loss (~0.9 se) and its
# pick fell from 0.90 to 0.77 of the oracle (BENCHMARKS.md, closed loop, loop19).
L2_PATH_Z = 1.0


def _fit_tuned(model, bound, enc, tr, va, weights, config, progress) -> tuple[list, int, dict]:
    """``_fit_structure`` once with ``config.l2_id``, or (l2_id = 0) along L2_ID_GRID,
    strongest first. Along the path each fit starts where the previous, more regularised,
    one ended and stops at its first L2_PATH_PATIENCE plateaus; the path moves on to a weaker
    L2 only while it lowers the held-out loss of the L2 kept so far by more than L2_PATH_Z
    standard errors (``paired_gain``), and stops at the first that does not (a weaker L2
    would only fit the noise more); the chosen L2's fit then goes on to
    ``config.patience`` plateaus (``config.epochs`` passes at most in all). Above
    L2_SAMPLE_MIN_ROWS merged training rows the path runs on a sample (``_path_sample``,
    each L2 scaled to its size) and the chosen L2 is then fitted once on every row, from the
    path's best weights at half the step, to ``config.patience`` plateaus (``config.epochs``
    passes on every row at most). The rows are merged and turned into tensors once for all.
    The feature tower (``feature_hidden``) and the three-way term (``dim3``) are chosen on
    the held-out slice at the path's first L2 (``term_choice.choose_terms``), on the sample
    when the path runs on one."""
    train = _rows(bound, enc, tr, weights)
    val = _rows(bound, enc, va, np.ones(len(enc))) if len(va) else None
    rows = touched_rows(model, train.ad, train.elem)
    if config.l2_id > 0 or val is None:
        l2 = config.l2_id if config.l2_id > 0 else L2_ID_GRID[len(L2_ID_GRID) // 2]
        history, best_epoch, three = choose_terms(
            model,
            partial(
                _fit_structure,
                model,
                train,
                val,
                len(tr),
                replace(config, l2_id=l2),
                progress,
                rows,
            ),
            rows,
            val,
        )
        return history, best_epoch, {"l2_id": l2, **three}
    sample = _path_sample(tr, len(train), config.seed)
    if sample is None:
        path_train, path_rows, n_path, scale = train, rows, len(tr), 1.0
    else:
        path_train = _rows(bound, enc, sample, weights)
        path_rows = touched_rows(model, path_train.ad, path_train.elem)
        n_path, scale = len(sample), len(tr) / len(sample)
    # Copies of what the fits can change (every dense parameter, the training rows of the
    # sparse id tables), not deep copies of the state: the start only when the path is not
    # warm (warm, the first fit starts from it and none goes back to it).
    start = None if L2_WARM_PATH else Snapshot(model)
    path_patience = min(L2_PATH_PATIENCE, config.patience)
    best: tuple | None = None
    best_state: Snapshot | None = None
    losses, epochs, gains, three = {}, {}, {}, {}
    z_best = None
    for i, l2 in enumerate(L2_ID_GRID):
        if start is not None:
            start.restore(model)
            if three.get("three_way") is False:  # a cold path, without the terms as chosen
                model.drop_three_way()
            if three.get("feature_tower") is False:
                model.switch_tower(False)
        cfg = replace(config, l2_id=l2 * scale, patience=path_patience)
        fit = partial(_fit_structure, model, path_train, val, n_path, cfg, progress, path_rows)
        if i == 0:  # the path goes on with the three-way term or without, as chosen here
            history, best_epoch, three = choose_terms(model, fit, path_rows, val)
        else:
            history, best_epoch = fit()
        losses[str(l2)] = min(h["val_loss"] for h in history)
        epochs[str(l2)] = len(history)
        z = val_logits(model, val)
        if z_best is not None:
            gain, se = paired_gain(z_best, z, val.y, val.weight)
            gains[str(l2)] = {"gain": gain, "se": se}
            if not gain > L2_PATH_Z * se:
                break  # not clearly better than a stronger L2: weaker ones will not be either
        best, z_best = (losses[str(l2)], l2, history, best_epoch), z
        if best_state is None:
            best_state = Snapshot(model, path_rows)
        else:
            best_state.take(model)
    loss, l2, history, best_epoch = best
    best_state.restore(model)
    tuning = {"l2_id": l2, "l2_id_val_loss": losses, "l2_id_epochs": epochs}
    tuning.update(l2_id_gain=gains, l2_id_z=L2_PATH_Z)
    if sample is not None:
        # Every training row at the chosen L2, from the sample's best weights at half the
        # step and full patience, as the streamed fit goes on from its sample's fit.
        cfg = replace(config, l2_id=l2, lr=config.lr / 2)
        history, best_epoch = _fit_structure(
            model, train, val, len(tr), cfg, progress, rows, start_loss=loss
        )
        tuning["l2_id_sample_rows"] = len(sample)
        tuning["l2_id_final_epochs"] = len(history)
        tuning["val_loss"] = min([loss] + [h["val_loss"] for h in history])
    elif config.patience > path_patience and len(history) < config.epochs:
        cfg = replace(
            config,
            l2_id=l2,
            epochs=config.epochs - len(history),  # the chosen fit's passes stay <= epochs
            patience=config.patience - path_patience,
            lr=config.lr * 0.5**path_patience,
        )
        more, more_best = _fit_structure(
            model, train, val, len(tr), cfg, progress, rows, start_loss=loss
        )
        history = history + [{**h, "epoch": h["epoch"] + len(history)} for h in more]
        best_epoch = best_epoch if more_best == 0 else len(history) - len(more) + more_best
        tuning["l2_id_final_epochs"] = len(more)
        tuning["val_loss"] = min(h["val_loss"] for h in history)
    return history, best_epoch, {**tuning, **three}


def _path_sample(tr: np.ndarray, n_rows: int, seed: int) -> np.ndarray | None:
    """The training impressions the L2 path runs on: a uniform sample of L2_SAMPLE_ROWS of
    ``tr`` (sorted) when the merged training rows ``n_rows`` exceed L2_SAMPLE_MIN_ROWS, else
    None (all of them)."""
    if n_rows <= L2_SAMPLE_MIN_ROWS or len(tr) <= L2_SAMPLE_ROWS:
        return None
    rng = np.random.default_rng([seed, 7])
    return np.sort(rng.choice(tr, L2_SAMPLE_ROWS, replace=False))


def _check_learnable(enc: Encoded) -> None:
    if len(enc) == 0:
        raise ContractError("impressions: no rows to learn from")
    if enc.click.sum() == 0:
        raise ContractError("impressions: no clicks at all; a click model cannot be learned")
    if enc.click.sum() == len(enc):
        raise ContractError(
            "impressions: every impression was clicked; a click model cannot be learned"
        )


def _weights(enc: Encoded, tr: np.ndarray, config: RewardModelConfig) -> np.ndarray:
    """(n,) impression weights: 1, or 1/propensity normalised to mean 1 on the training rows
    and clipped."""
    if not config.propensity_weighting:
        return np.ones(len(enc))
    w = 1.0 / enc.propensity
    return np.minimum(w / w[tr].mean(), config.max_weight)


@dataclass
class _Rows:
    """Impressions as model inputs, identical ones merged: ``weight`` sums their weights and
    ``y`` is their weighted click rate (the same BCE, fewer rows)."""

    ad: torch.Tensor
    elem: torch.Tensor
    feats: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    weight: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, b: torch.Tensor) -> tuple:
        # index_select, not t[b]: the same rows at a third of the CPU (1.22 against 0.38 ms
        # a step of 4,096 on `large`, whose steps spent 11% of the fit here under t[b])
        return tuple(
            t.index_select(0, b)
            for t in (self.ad, self.elem, self.feats, self.x, self.y, self.weight)
        )

    def to(self, device: torch.device) -> _Rows:
        return _Rows(*(getattr(self, f.name).to(device) for f in fields(self)))


def _rows(bound: BoundModel, enc: Encoded, idx: np.ndarray, weights: np.ndarray) -> _Rows:
    idx, w, y = merge_impressions(enc, idx, weights)
    ad, elem, feats, x = bound._inputs(enc.ads[idx], enc.combos[idx], enc.ctx[idx])
    return _Rows(
        ad,
        elem,
        feats,
        x,
        torch.as_tensor(y, dtype=torch.float32),
        torch.as_tensor(w, dtype=torch.float32),
    )


def l2_penalty(model: RewardModel, ad, elem, config: RewardModelConfig) -> torch.Tensor:
    """The L2 terms of a step (in memory and streamed): the id rows the batch touched, per
    impression, and the dense feature maps."""
    out = torch.zeros((), device=elem.device)
    if config.l2_id:
        out = out + config.l2_id * (
            model.lookup("id_main", elem).pow(2).sum()
            + model.lookup("id_ffm", elem).pow(2).sum()
            + model.lookup("appeal", ad).pow(2).sum()
            + (model.lookup("id3", elem).pow(2).sum() if model.d3 else 0.0)
        ) / len(elem)
    if config.l2_dense:
        out = out + config.l2_dense * (
            model.w_main.pow(2).sum()
            + model.w_ffm.pow(2).sum()
            + (
                sum(p.pow(2).sum() for t in model.tower for p in t.parameters())
                if model.tower_on
                else 0.0
            )
            + (model.w3.pow(2).sum() if model.d3 else 0.0)
        )
    return out


class Plateau:
    """Early stopping shared by the in-memory and streamed fits: keeps the best weights; each
    epoch that does not improve the score goes back to them with half the step (noisy Adam
    steps around the optimum, not the model, were what stopped the improvement), and
    ``patience`` such epochs stop the fit. ``start_loss``: the score of the weights the fit
    starts from, kept as the best so far (a warm start); None: no best yet."""

    def __init__(
        self,
        model: RewardModel,
        patience: int,
        start_loss: float | None = None,
        rows: dict[str, torch.Tensor] | None = None,
    ):
        self.patience, self.bad_epochs, self.best_epoch = patience, 0, 0
        self.rows = rows  # of the sparse tables, the only rows the fit can move; None: all
        self.best = None if start_loss is None else Snapshot(model, rows)
        self.best_loss = float("inf") if start_loss is None else start_loss

    def update(self, model: RewardModel, opt, score: float, epoch: int) -> bool:
        """After epoch ``epoch`` (1-based) scored ``score``: True when the fit should stop."""
        if score < self.best_loss - 1e-6:
            if self.best is None:
                self.best = Snapshot(model, self.rows)
            else:
                self.best.take(model)
            self.best_loss, self.best_epoch, self.bad_epochs = score, epoch, 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience:
            return True
        self.best.restore(model)
        opt.scale_lr(0.5)
        return False


def _fit_structure(
    model: RewardModel,
    train: _Rows,
    val: _Rows | None,
    n_train: int,
    config: RewardModelConfig,
    progress: bool,
    rows: dict[str, torch.Tensor] | None = None,
    start_loss: float | None = None,
) -> tuple[list[dict], int]:
    """Adam on weighted BCE; each plateau of the held-out loss goes back to the best weights
    with half the step; stops after ``patience`` plateaus. ``n_train``: training impressions
    before merging. ``start_loss``: the held-out loss of the weights it starts from, kept as
    the best so far (a fit that goes on). Returns (history, best epoch; 0 when no epoch beat
    the start). Trains on ``config.device``; the model comes back on the CPU."""
    device = resolve_device(config.device)
    model.to(device)
    train = train.to(device)
    val = None if val is None else val.to(device)
    with torch.no_grad():
        seen = torch.zeros(model.n_elements + 1, dtype=torch.bool, device=device)
        seen[train.elem.unique()] = True
        seen[model.n_elements] = False
        model.seen.copy_(seen)
    # As many steps per epoch as unmerged rows would take; merged rows make each step smaller.
    steps = max(1, math.ceil(n_train / config.batch_size))
    per_step = min(config.batch_size, max(64, math.ceil(len(train) / steps)))
    opt = Optimizers(model, config.lr)
    bce = nn.BCEWithLogitsLoss(reduction="none")
    g = torch.Generator().manual_seed(config.seed)
    if rows is None:
        rows = touched_rows(model, train.ad, train.elem)
    rows = {k: r.to(device) for k, r in rows.items()}
    plateau = Plateau(model, config.patience, start_loss, rows)
    history: list[dict] = []
    from tqdm import tqdm

    bar = tqdm(range(config.epochs), desc="reward model", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        reps = math.ceil(steps * per_step / len(train))
        perm = torch.cat([torch.randperm(len(train), generator=g) for _ in range(reps)])
        perm = perm.to(device)
        total, seen_w = 0.0, 0.0
        for s in range(0, min(len(perm), steps * per_step), per_step):
            ad, elem, feats, x, y, w = train.batch(perm[s : s + per_step])
            with RowStep(model, ad, elem) as rows:
                raw = (bce(model(rows.ad, rows.elem, feats, x), y) * w).sum()
                total, seen_w = total + float(raw.detach()), seen_w + float(w.sum())
                loss = raw / w.sum()
                loss = loss + l2_penalty(model, rows.ad, rows.elem, config)
                opt.zero_grad()
                loss.backward()
                opt.step(rows)
        record = {"epoch": epoch + 1, "train_loss": total / seen_w}
        if val is not None:
            model.eval()
            with torch.no_grad():
                z = model(val.ad, val.elem, val.feats, val.x)
                record["val_loss"] = float((bce(z, val.y) * val.weight).sum() / val.weight.sum())
        history.append(record)
        bar.set_postfix({k: round(v, 5) for k, v in record.items() if k != "epoch"})
        score = record.get("val_loss", record["train_loss"])
        if plateau.update(model, opt, score, epoch + 1):
            break
    bar.close()
    plateau.best.restore(model)
    with torch.no_grad():
        # Elements never seen in training carry no evidence: score them from features only.
        model.id_main.weight[~model.seen] = 0.0
        model.id_ffm.weight[~model.seen] = 0.0
        if model.d3:
            model.id3.weight[~model.seen] = 0.0
    model.to("cpu")
    model.eval()
    return history, plateau.best_epoch
