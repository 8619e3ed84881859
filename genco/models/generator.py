"""Autoregressive pointer generator: one element per component, in catalog order.

    s_0     = tanh(ad(a) + W_x x)                       # context encoder
    p(e_k)  = softmax_{legal e} ( <q_k(s_k), c(e)> / sqrt(H) )   # pointer over candidates
    s_{k+1} = GRU(c(e_k), s_k)                          # state sees the picks so far

c(e) is an id embedding plus a projection of the element's features plus its component's
embedding, so new elements get sensible candidates vectors. Illegal candidates (not the ad's,
or forbidden given earlier picks) are masked out and never chosen.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from genco.data.contract import Catalog, Constraints
from genco.models.chunk_tables import PolicyFold
from genco.models.legal import LegalMasks
from genco.models.optim import Optimizers, set_sparse
from genco.models.policy_tables import PolicyTables, no_legal_element
from genco.models.tables import TableCache
from genco.models.vocab import (
    Vocab,
    check_catalog,
    fit_scalers,
    id_map,
    register_vocab_buffers,
)

CREDITS = ("combination", "element", "counterfactual")


@dataclass(frozen=True)
class GeneratorConfig:
    hidden: int = field(default=64, metadata={"help": "State and candidate vector size."})
    rl_steps: int = field(default=300, metadata={"help": "Policy-gradient updates."})
    prompts: int = field(default=32, metadata={"help": "(ad, context) prompts per update."})
    group_size: int = field(default=32, metadata={"help": "Samples per prompt (group baseline)."})
    lr: float = field(default=3e-3, metadata={"help": "Adam learning rate."})
    entropy: float = field(default=0.01, metadata={"help": "Entropy bonus weight."})
    credit: str = field(
        default="combination",
        metadata={
            "help": "'combination': one group-normalised advantage per sample; "
            "'element': per-step advantage from the reward model's Shapley credits "
            "(reward-to-go); 'counterfactual': per-step advantage = reward minus the "
            "policy-expected reward of swapping that step's element, others fixed."
        },
    )
    warm_start_steps: int = field(
        default=0, metadata={"help": "Behaviour-cloning steps on clicked logs before RL."}
    )
    beam_width: int = field(default=32, metadata={"help": "Beams kept while decoding."})
    explore: float = field(
        default=0.1,
        metadata={
            "help": "Share of sampled (mode 'sample') impressions drawn uniformly over the "
            "ad's legal combinations instead of from the policy: every legal combination "
            "then has a propensity of at least explore / (prod of its candidate counts)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for init and sampling."})

    def __post_init__(self) -> None:
        for name in ("hidden", "prompts", "group_size", "beam_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("rl_steps", "warm_start_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 for a group baseline, got {self.group_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.entropy < 0:
            raise ValueError(f"entropy must be >= 0, got {self.entropy}")
        if self.credit not in CREDITS:
            raise ValueError(f"credit must be one of {', '.join(CREDITS)}, got '{self.credit}'")
        if not 0.0 <= self.explore <= 1.0:
            raise ValueError(f"explore must be in [0, 1], got {self.explore}")


class GeneratorSample(NamedTuple):
    """One legal combination per row, drawn by ``BoundGenerator.sample``."""

    slots: torch.Tensor  # (B, K) chosen candidate slot per component
    log_probs: torch.Tensor  # (B, K): their sum is the exact log propensity of the combination
    entropies: torch.Tensor  # (B, K) per-step entropies
    step_probs: list[torch.Tensor]  # per step k (B, M_k), detached: the full distributions


class Generator(nn.Module):
    """Parameters over the training vocabulary; bind to a catalog to decode."""

    def __init__(self, vocab: Vocab, config: GeneratorConfig) -> None:
        super().__init__()
        self.vocab, self.config = vocab, config
        K, F, C = register_vocab_buffers(self, vocab)
        H = config.hidden
        g = torch.Generator().manual_seed(config.seed)
        self.ad = nn.Embedding(len(vocab.ads) + 1, H, padding_idx=len(vocab.ads))
        self.ctx = nn.Linear(max(C, 1), H)
        self.elem = nn.Embedding(self.n_elements + 1, H, padding_idx=self.n_elements)
        self.feat = nn.Parameter(torch.randn(K, max(F, 1), H, generator=g) / math.sqrt(max(F, 1)))
        self.comp = nn.Embedding(K, H)
        self.query = nn.Linear(H, H)
        self.gru = nn.GRUCell(H, H)
        with torch.no_grad():
            self.elem.weight.normal_(0.0, 0.1, generator=g)
            self.elem.weight[self.n_elements].zero_()
            self.ad.weight.normal_(0.0, 0.1, generator=g)
            self.ad.weight[len(vocab.ads)].zero_()
        self.K, self.F, self.C, self.H = K, F, C, H
        set_sparse(self)  # large ad and element tables: a step updates the rows it drew


class BoundGenerator:
    """A generator bound to a catalog and its constraints: samples and beam-decodes."""

    def __init__(self, model: Generator, catalog: Catalog, constraints: Constraints) -> None:
        vocab = model.vocab
        check_catalog(vocab, catalog, "generator")
        self.model, self.catalog = model, catalog
        self.masks = LegalMasks(catalog, constraints)
        ad_codes = id_map(vocab.ads, catalog.ads)
        self.ad_map = torch.as_tensor(np.where(ad_codes < 0, len(vocab.ads), ad_codes))
        # Per component: (n_ads, M_k) model element index and (n_ads, M_k, F) raw features.
        self.slot_elem, self.slot_feat = [], []
        for k in range(catalog.n_components):
            codes = id_map(vocab.elements[k], catalog.elements[k])
            off = int(model.offsets[k])
            lut = torch.as_tensor(
                np.append(np.where(codes < 0, model.n_elements, off + codes), model.n_elements)
            )
            slots = self.masks.slots[k]  # -1 padding -> last lut entry (unknown, zero)
            self.slot_elem.append(lut[slots])
            feats = torch.as_tensor(catalog.features[k], dtype=torch.float32)
            if feats.shape[1] == 0:
                feats = torch.zeros(len(feats), 1)
            feats = torch.cat([feats, torch.zeros(1, feats.shape[1])])
            self.slot_feat.append(feats[slots])
        self._cache: list[torch.Tensor] | None = None
        self._tables = TableCache()  # per-ad inference tables

    # -- candidate vectors -------------------------------------------------------------
    def candidate_vectors(self) -> list[torch.Tensor]:
        """Per component (n_ads, M_k, H) for every ad; cached while frozen."""
        if not torch.is_grad_enabled():
            if self._cache is not None:
                return self._cache
        else:  # training: parameters move, so cached inference state goes stale
            self.invalidate()
        out = [self._vectors(k, slice(None)) for k in range(self.model.K)]
        if not torch.is_grad_enabled():
            self._cache = out
        return out

    def _vectors(self, k: int, ads) -> torch.Tensor:
        """(B, M_k, H) candidate vectors of component k for ``ads`` (indices or a slice)."""
        m = self.model
        f = self.slot_feat[k][ads]
        if m.F:
            f = (f - m.feat_mean[k]) / m.feat_std[k]
        return m.elem(self.slot_elem[k][ads]) + f @ m.feat[k] + m.comp.weight[k]

    def _batch_vectors(self, a: torch.Tensor) -> list[torch.Tensor]:
        """Per component (B, M_k, H) for the batch's ads: while training, computed for those
        ads alone, so a step costs what its batch touches, not the catalog's size."""
        if torch.is_grad_enabled():
            self.invalidate()  # parameters move, so cached inference state goes stale
            return [self._vectors(k, a) for k in range(self.model.K)]
        return [c[a] for c in self.candidate_vectors()]

    def invalidate(self) -> None:
        self._cache = None
        self._tables.clear()

    def _init_state(self, ads: torch.Tensor, ctx: torch.Tensor | None) -> torch.Tensor:
        m = self.model
        h = m.ad(self.ad_map[ads])
        if m.C and ctx is not None:
            h = h + m.ctx((ctx - m.ctx_mean) / m.ctx_std)
        return torch.tanh(h)

    def _logits(self, k: int, state: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
        # cands (B, M_k, H), state (B, H) -> (B, M_k)
        q = self.model.query(state)
        return torch.einsum("bmh,bh->bm", cands, q) / math.sqrt(self.model.H)

    # -- sampling ----------------------------------------------------------------------
    def sample(
        self,
        ads: np.ndarray,
        ctx: np.ndarray | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> GeneratorSample:
        """Draw one legal combination per row.

        Returns slots (B, K), per-step log-probabilities (B, K) (their sum is the exact log
        propensity of the combination under this policy and temperature), per-step
        entropies (B, K) and each step's distribution (B, M_k), for counterfactual credit.
        """
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        a = torch.as_tensor(ads, dtype=torch.long)
        x = None if ctx is None else torch.as_tensor(np.asarray(ctx, np.float32))
        cands = self._batch_vectors(a)
        state = self._init_state(a, x)
        B = len(a)
        picks = torch.zeros(B, self.model.K, dtype=torch.long)
        logps, ents, probs = [], [], []
        for k in range(self.model.K):
            allowed = self.masks.mask(k, a, picks)
            self._check_alive(allowed, k)
            c = cands[k]
            logits = self._logits(k, state, c).masked_fill(~allowed, float("-inf")) / temperature
            logp = torch.log_softmax(logits, -1)
            probs.append(logp.detach().exp())
            choice = torch.multinomial(logp.exp(), 1, generator=generator)[:, 0]
            picks[:, k] = choice
            logps.append(logp.gather(1, choice[:, None])[:, 0])
            p = logp.exp()
            ents.append(-(p * logp.masked_fill(~allowed, 0.0)).sum(-1))
            state = self.model.gru(c[torch.arange(B), choice], state)
        return GeneratorSample(picks, torch.stack(logps, 1), torch.stack(ents, 1), probs)

    def log_prob(
        self, ads: np.ndarray, ctx: np.ndarray | None, slots: torch.Tensor
    ) -> torch.Tensor:
        """Per-step log-probabilities (B, K) of given legal combinations (teacher forcing)."""
        a = torch.as_tensor(ads, dtype=torch.long)
        x = None if ctx is None else torch.as_tensor(np.asarray(ctx, np.float32))
        cands = self._batch_vectors(a)
        state = self._init_state(a, x)
        B = len(a)
        out = []
        for k in range(self.model.K):
            allowed = self.masks.mask(k, a, slots)
            c = cands[k]
            logits = self._logits(k, state, c).masked_fill(~allowed, float("-inf"))
            out.append(torch.log_softmax(logits, -1).gather(1, slots[:, k : k + 1])[:, 0])
            state = self.model.gru(c[torch.arange(B), slots[:, k]], state)
        return torch.stack(out, 1)

    @staticmethod
    def _check_alive(allowed: torch.Tensor, k: int) -> None:
        dead = ~allowed.any(-1)
        if dead.any():
            raise ValueError(no_legal_element(k))

    # -- inference on per-ad tables ----------------------------------------------------
    @torch.inference_mode()
    def tables(self, ad: int) -> PolicyTables:
        """The policy folded for one ad (numpy; see ``genco.models.tables``), cached per ad."""
        cached = self._tables.get(ad)
        if cached is not None:
            return cached
        m = self.model
        cands = [c[ad] for c in self.candidate_vectors()]  # (M_k, H)
        scale = math.sqrt(m.H)
        wq, bq = m.query.weight, m.query.bias  # q = state @ wq.T + bq
        has_ctx = bool(m.C)
        tables = PolicyTables(
            masks=self.masks.for_ad(ad),
            init=m.ad.weight[self.ad_map[ad]].numpy().copy(),
            ctx_w=m.ctx.weight.T.numpy().copy() if has_ctx else None,
            ctx_b=m.ctx.bias.numpy().copy() if has_ctx else None,
            ctx_mean=m.ctx_mean.numpy().copy(),
            ctx_std=m.ctx_std.numpy().copy(),
            A=[(wq.T @ c.T / scale).numpy() for c in cands],
            b=[(c @ bq / scale).numpy() for c in cands],
            gi=[(c @ m.gru.weight_ih.T + m.gru.bias_ih).numpy() for c in cands],
            w_hh=m.gru.weight_hh.T.numpy().copy(),
            b_hh=m.gru.bias_hh.numpy().copy(),
        )
        self._tables.put(ad, tables, tables.nbytes)
        return tables

    @torch.inference_mode()
    def fold(self, ads: np.ndarray) -> PolicyFold:
        """``tables`` for a chunk of U ads at once (each component padded to M_k)."""
        m = self.model
        a = torch.as_tensor(ads)
        cands = [c[a] for c in self.candidate_vectors()]  # (U, M_k, H)
        scale = math.sqrt(m.H)
        wq, bq = m.query.weight, m.query.bias
        has_ctx = bool(m.C)
        return PolicyFold(
            init=m.ad.weight[self.ad_map[a]].numpy(),
            ctx_w=m.ctx.weight.T.numpy().copy() if has_ctx else None,
            ctx_b=m.ctx.bias.numpy().copy() if has_ctx else None,
            ctx_mean=m.ctx_mean.numpy().copy(),
            ctx_std=m.ctx_std.numpy().copy(),
            A=[(wq.T @ c.transpose(1, 2) / scale).numpy() for c in cands],
            b=[(c @ bq / scale).numpy() for c in cands],
            # the beam's GRU never reads the last component's
            gi=[(c @ m.gru.weight_ih.T + m.gru.bias_ih).numpy() for c in cands[:-1]],
            w_hh=m.gru.weight_hh.T.numpy().copy(),
            b_hh=m.gru.bias_hh.numpy().copy(),
        )

    def beam(
        self, ad: int, ctx: np.ndarray | None = None, width: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``width`` distinct legal combinations of one ad, best log-probability first.

        Returns catalog element codes (W, K) and their log-probabilities (W,).
        """
        tables = self.tables(ad)
        x = None if ctx is None else np.asarray(ctx, np.float32).reshape(-1)
        slots, score = tables.beam(x, width or self.model.config.beam_width)
        return tables.masks.to_codes(slots), score


@dataclass
class GeneratorReport:
    steps: int
    seconds: float
    history: list[dict]


def _group_norm(r: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, ...) rewards -> advantages normalised within each group of consecutive rows."""
    g = r.reshape(groups, -1, *r.shape[1:])
    adv = (g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-6)
    return adv.reshape(r.shape)


def _counterfactual_advantage(
    reward,
    bound: BoundGenerator,
    ads: np.ndarray,
    ctx: np.ndarray | None,
    slots: torch.Tensor,
    r: torch.Tensor,
    probs: list[torch.Tensor],
) -> torch.Tensor:
    """(B, K): r minus E_{e ~ pi_k}[ r(combination with step k's element swapped for e) ].

    Each step is judged against what the policy would have got there on average with the
    other picks held fixed: a per-element baseline scored by the reward model.
    """
    B, K = slots.shape
    a = torch.as_tensor(ads)
    out = torch.zeros(B, K)
    for k in range(K):
        M = probs[k].shape[1]
        alt = slots[:, None, :].repeat(1, M, 1)  # (B, M, K)
        alt[:, :, k] = torch.arange(M)[None, :]
        flat = alt.reshape(B * M, K)
        a_rep = a.repeat_interleave(M)
        valid = bound.masks.valid[k][a_rep, flat[:, k]]
        flat[~valid, k] = 0  # padding slots: scored as slot 0, then weighted by p = 0
        codes = bound.masks.to_codes(a_rep, flat)
        x = None if ctx is None else np.repeat(ctx, M, 0)
        _, cr = reward.credit(a_rep.numpy(), codes, x)
        r_alt = torch.as_tensor(cr.sum(1), dtype=torch.float32).reshape(B, M)
        out[:, k] = r - (probs[k] * r_alt).sum(1)
    return out


def train_generator(
    reward,
    catalog: Catalog,
    constraints: Constraints,
    contexts: np.ndarray | None = None,
    config: GeneratorConfig | None = None,
    clicked: tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray] | None = None,
    init: Generator | None = None,
    progress: bool = False,
) -> tuple[Generator, GeneratorReport]:
    """Policy gradient against a frozen reward model (a ``BoundModel`` on the same catalog).

    Each step draws ``config.prompts`` ads and computes candidate vectors for those ads
    alone, with sparse updates of large ad and element tables: its cost does not grow with
    the catalog.

    contexts: (N, C) pool of logged contexts to draw prompts from (None without context).
    clicked: (ads, combos, ctx, weights) of clicked impressions for the warm start.
    init: a previous generator with the same vocabulary (e.g. production) to start from.
    """
    config = config or GeneratorConfig()
    C = 0 if contexts is None else contexts.shape[1]
    ctx_cols = reward.model.vocab.context_columns
    if len(ctx_cols) != C:
        raise ValueError(f"contexts have {C} columns, the reward model {len(ctx_cols)}")
    vocab = Vocab.from_catalog(catalog, ctx_cols)
    torch.manual_seed(config.seed)
    model = Generator(vocab, config)
    if init is not None:
        model.load_state_dict(init.state_dict())
    fit_scalers(model, catalog, contexts)
    bound = BoundGenerator(model, catalog, constraints)
    opt = Optimizers(model, config.lr)
    rng = np.random.default_rng(config.seed)
    tg = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    t0 = time.perf_counter()
    from tqdm import tqdm

    if clicked is not None and config.warm_start_steps:
        ads_c, combos_c, ctx_c, w_c = clicked
        slots_c = bound.masks.to_slots(ads_c, combos_c)
        w_t = torch.as_tensor(w_c / w_c.mean(), dtype=torch.float32)
        for _ in range(config.warm_start_steps):
            idx = rng.integers(len(ads_c), size=config.prompts * config.group_size)
            lp = bound.log_prob(ads_c[idx], None if ctx_c is None else ctx_c[idx], slots_c[idx])
            loss = -(lp.sum(1) * w_t[idx]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    G, P = config.group_size, config.prompts
    bar = tqdm(range(config.rl_steps), desc="generator RL", unit="step", disable=not progress)
    for step in bar:
        ads = np.repeat(rng.integers(catalog.n_ads, size=P), G)
        ctx = None if not C else np.repeat(contexts[rng.integers(len(contexts), size=P)], G, 0)
        slots, logp, ent, step_probs = bound.sample(ads, ctx, generator=tg)
        codes = bound.masks.to_codes(torch.as_tensor(ads), slots)
        _, credit = reward.credit(ads, codes, ctx)  # (B, K) Shapley credit, logit scale
        credit = torch.as_tensor(credit, dtype=torch.float32)
        r = credit.sum(1)
        if config.credit == "element":
            to_go = credit.flip(1).cumsum(1).flip(1)  # (B, K): credit of step k and later
            pg = -(_group_norm(to_go, P) * logp).sum(1).mean()
        elif config.credit == "counterfactual":
            adv = _counterfactual_advantage(reward, bound, ads, ctx, slots, r, step_probs)
            scale = r.reshape(P, G).std(1, keepdim=True).repeat_interleave(G, 0) + 1e-6
            pg = -((adv / scale) * logp).sum(1).mean()
        else:
            pg = -(_group_norm(r, P) * logp.sum(1)).mean()
        loss = pg - config.entropy * ent.sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec = {
            "step": step + 1,
            "reward": float(r.mean()),
            "entropy": float(ent.detach().sum(1).mean()),
        }
        history.append(rec)
        if step % 20 == 0:
            bar.set_postfix(reward=round(rec["reward"], 4), entropy=round(rec["entropy"], 3))
    bar.close()
    model.eval()
    return model, GeneratorReport(config.rl_steps, time.perf_counter() - t0, history)
