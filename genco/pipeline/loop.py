"""The closed loop: serve with exploration, log, retrain on the policy's own logs, repeat.

``genco loop`` runs the whole platform against a world with ground truth. Round 0 is served
uniformly (no model yet). After each round the served log and its clicks file (the REST
response's log fields, ``genco.data.served``) are joined and validated; the retraining
pipeline (``pipelines/retraining.py``, the same function a cluster runs, under the KFP local
runner) retrains on every round's log so far, each row with the propensity of the policy
that served it, warm-started from production, and deploys through the gate into a local
store. The next round is served in-process by the store's production bundle
(``Predictor.draw``: by default the greedy pick mixed with the exploration draw, or a
generator sample mixed likewise; exact propensities either way).

The canary (``canary`` > 0). A candidate the offline gate refuses is not thrown away: the
next round serves it to a ``canary`` share of requests (chosen at random per request, as
KServe's ``canaryTrafficPercent`` splits traffic), production serves the rest. Each served
row's ``model_version`` names the arm that served it and its ``propensity`` is that arm's own
(the probability that this model showed the combination: what each server's REST response
says), so the off-policy code, which divides by the logged propensity, weighs each row by
the policy that actually chose it (unbiased with several loggers as long as each explores).
After the round the online gate (``genco.evaluation.online.canary_gate``) compares the two
arms' own clicks (``canary_ab`` "triggered": on the requests where their greedy picks
differ): the canary is promoted into the store when the lower bound of its CTR gain clears
the margin, else rolled back; then the next candidate is trained and gated.

Peers (``genco.evaluation.bandits``) are served the same requests, with the same uniform
numbers deciding clicks (common random numbers: a combination shown by two arms to the same
request is clicked by both or neither). Each peer runs twice: updating once per round, after
it, on the same cadence as GenCO's retraining (``element_ts``, ``vw_squarecb``), and online,
after every ``chunks``-th of a round (``element_ts_online``, ``vw_squarecb_online``).
``combo_ts`` (Thompson sampling per legal combination, nothing shared) is the textbook
reference: what a bandit over the whole space learns from the same traffic.

Per round (``OUT/rounds.csv``, ``rounds.json``, ``loop.png``): the true CTR of the served
policy (exploration included), of its greedy pick, of the oracle; expected regret (oracle
CTR minus the shown combination's, summed over impressions) and its running total; the
gate's decision, estimate and interval; the exploration rate and whether the floor held
(every shown combination's propensity at least ``explore / prod(candidates)``); the
true greedy CTR of each gated candidate next to production's (the gate audit).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from genco.data import storage
from genco.data.ingest import VALID_FILE
from genco.data.served import join_served_log
from genco.errors import ConfigError
from genco.evaluation.evaluate import EvalConfig
from genco.evaluation.online import canary_gate, policies_differ
from genco.inference.predictor import Predictor
from genco.models.reward import RewardModelConfig
from genco.pipeline.loop_serve import (
    floor_ratio,
    greedy_ctr,
    make_peers,
    serve,
    serve_split,
    served_frames,
)
from genco.pipeline.runner import LOCAL_RL_STEPS, run_local
from genco.store import bundle_digest, current, current_version, promote
from genco.worlds.traffic import load_traffic

# "_online" peers update ``chunks`` times a round; the others once, after the round, as GenCO
PEERS = (
    "element_ts", "element_ts_online", "vw_squarecb", "vw_squarecb_online", "uniform",
    "combo_ts", "combo_ts_online",
)  # fmt: skip
# LoopConfig fields that `genco loop` exposes as flags (all of them)
LOOP_FLAGS = (
    "world", "rounds", "impressions_per_round", "seed", "explore", "temperature", "rl_steps",
    "reward_epochs", "margin", "tolerance", "peers", "chunks", "eval_rows", "canary",
    "warmup", "canary_checks", "canary_stop_confidence", "thompson", "canary_ab",
)  # fmt: skip


@dataclass(frozen=True)
class LoopConfig:
    world: str = field(default="default", metadata={"help": "World: a preset or 'aes'."})
    rounds: int = field(default=5, metadata={"help": "Rounds of serving and retraining."})
    impressions_per_round: int = field(
        default=100_000, metadata={"help": "Impressions served per round (each arm)."}
    )
    seed: int = field(default=0, metadata={"help": "World, traffic and training seed."})
    # 0.02, not the generator's 0.1 nor the 0.05 measured before: over 3 seeds on each world
    # it lowered GenCO's regret on all three (BENCHMARKS.md, "Closed loop", 2026-11-30 08:10)
    explore: float = field(
        default=0.02,
        metadata={"help": "Exploration share of the served policy in every round: its floor."},
    )
    temperature: float = field(
        default=0.0,
        metadata={
            "help": "Served policy: 0 = the greedy pick (beam top-1) mixed with the "
            "exploration draw; > 0 = a generator sample at this temperature, mixed likewise."
        },
    )
    thompson: bool = field(
        default=False,
        metadata={
            "help": "Served policy: posterior draws of the reward model (Thompson sampling by "
            "probability matching, genco.inference.thompson) mixed with the exploration draw; "
            "overrides temperature."
        },
    )
    rl_steps: int = field(default=LOCAL_RL_STEPS, metadata={"help": "Generator updates."})
    reward_epochs: int = field(
        default=RewardModelConfig.epochs, metadata={"help": "Reward model epochs."}
    )
    margin: float = field(default=EvalConfig.margin, metadata={"help": "Gate margin."})
    tolerance: float = field(
        default=0.01,
        metadata={
            "help": "Gate audit: a deploy whose true greedy CTR is below production's by "
            "more than this share counts as a gate failure."
        },
    )
    peers: str = field(
        default=",".join(PEERS), metadata={"help": "Peers on the same traffic (comma list)."}
    )
    chunks: int = field(default=10, metadata={"help": "Updates per round of _online peers."})
    eval_rows: int = field(
        default=5000, metadata={"help": "Requests per round scored for greedy true CTR."}
    )
    canary: float = field(
        default=0.2,
        metadata={
            "help": "Share of the next round's requests served by a candidate the offline gate "
            "refused, promoted or rolled back on the online A/B; 0 = no canary."
        },
    )
    warmup: int = field(
        default=20_000,
        metadata={
            "help": "Round 0 is served uniformly for this many impressions; the pipeline then "
            "trains the first model on them and it serves the rest of round 0 with its "
            "exploration. 0 or >= impressions-per-round: all of round 0 uniform."
        },
    )
    canary_checks: int = field(
        default=10,
        metadata={
            "help": "A canary round is checked this many times (after each equal part); a "
            "canary clearly worse than production stops there, one clearly better is "
            "promoted there. 1 = no mid-round decision."
        },
    )
    canary_ab: str = field(
        default="triggered",
        metadata={
            "help": "The canary's A/B: 'triggered' counts the requests where the two greedy "
            "picks differ (elsewhere both serve alike), scaled by their share; 'all' every "
            "request. A sampling policy (temperature > 0, thompson) is always 'all'."
        },
    )
    canary_stop_confidence: float = field(
        default=0.99,
        metadata={
            "help": "Confidence needed to stop a canary (worse) or promote it (better) "
            "mid-round, at one of its checks."
        },
    )

    def __post_init__(self) -> None:
        if self.warmup < 0:
            raise ConfigError(f"warmup must be >= 0, got {self.warmup}")
        if not 0.5 < self.canary_stop_confidence < 1.0:
            raise ConfigError(
                f"canary_stop_confidence must be in (0.5, 1), got {self.canary_stop_confidence}"
            )
        for name in ("rounds", "impressions_per_round", "chunks", "eval_rows", "canary_checks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.explore <= 1.0:
            raise ConfigError(f"explore must be in (0, 1], got {self.explore}")
        if not 0.0 <= self.canary < 1.0:
            raise ConfigError(f"canary must be in [0, 1), got {self.canary}")
        if self.canary_ab not in ("triggered", "all"):
            raise ConfigError(f"canary_ab must be 'triggered' or 'all', got '{self.canary_ab}'")
        unknown = [p for p in self.peer_names if p not in PEERS]
        if unknown:
            raise ConfigError(f"unknown peer '{unknown[0]}'; choose from {', '.join(PEERS)}")

    @property
    def triggered(self) -> bool:  # the canary's A/B is: asked for, and the policy is greedy
        return self.canary_ab == "triggered" and not (self.thompson or self.temperature)

    @property
    def peer_names(self) -> tuple[str, ...]:
        return tuple(p for p in self.peers.split(",") if p)


@dataclass
class Arm:
    name: str
    regret: float = 0.0  # expected clicks lost to the oracle so far


def run_loop(
    out_dir: str, config: LoopConfig, progress: Callable[[str], None] | None = None
) -> dict:
    """Run ``config.rounds`` rounds into ``out_dir`` (local); returns the summary it writes."""
    cfg, say = config, progress or (lambda _: None)
    t = load_traffic(cfg.world, cfg.seed)
    world_dir = os.path.join(out_dir, "world")
    storage.makedirs(world_dir)
    catalog_path = os.path.join(world_dir, "catalog.csv")
    storage.write_table(t.catalog.to_arrow(), catalog_path)
    constraints_path = ""
    if len(t.constraints):
        constraints_path = os.path.join(world_dir, "constraints.csv")
        storage.write_table(t.constraints.to_frame(t.catalog), constraints_path)
    store = os.path.join(out_dir, "model_store")
    rng_traffic = np.random.default_rng([cfg.seed, 101])
    rng_serve = np.random.default_rng([cfg.seed, 102])
    peers = make_peers(cfg.peer_names, t)
    peer_rng = {name: np.random.default_rng([cfg.seed, 103, i]) for i, name in enumerate(peers)}
    arms = {"genco": Arm("genco"), **{name: Arm(name) for name in peers}}
    pred: Predictor | None = None
    canary: Predictor | None = None  # served to a ``cfg.canary`` share of the next round
    canary_dir = ""
    logs: list[pd.DataFrame] = []
    rows: list[dict] = []
    try:
        for r in range(cfg.rounds):
            t0 = time.perf_counter()
            n = cfg.impressions_per_round
            ads, ctx = t.requests(n, rng_traffic)
            u = rng_traffic.random(n)  # common random numbers for every arm's clicks
            _, oracle = t.oracle(ads, ctx)
            ev = slice(0, min(cfg.eval_rows, n))
            row: dict = {"round": r, "impressions": n, "oracle_true_ctr": float(oracle.mean())}
            ev_ctx = None if ctx is None else ctx[ev]
            explore = np.full(n, cfg.explore)
            trig = None  # where production and the canary serve differently (cfg.canary_ab)
            if pred is None:
                combos, prop = t.uniform(ads, rng_serve)
                version = np.full(n, "uniform", dtype=object)
                w = cfg.warmup if 0 < cfg.warmup < n else n
                explore[:w] = 1.0
                row["greedy_true_ctr"] = None
                if w < n:  # the first model, trained on the warm-up, serves the rest
                    pred = _warmup(
                        cfg, t, out_dir, r, (ads, ctx, u, combos, prop, version), w, logs,
                        (catalog_path, constraints_path, store), row, ads[ev], ev_ctx,
                    )  # fmt: skip
                    rest = slice(w, n)
                    version[rest] = pred.version
                    combos[rest], prop[rest] = serve(
                        pred, ads[rest], None if ctx is None else ctx[rest], rng_serve,
                        cfg.explore, cfg.temperature, cfg.thompson,
                    )  # fmt: skip
                    row["greedy_true_ctr"] = greedy_ctr(pred, t, ads[ev], ev_ctx)
            else:
                if canary is not None and cfg.triggered:
                    trig = policies_differ(pred, canary, ads, ctx)
                    row["canary_triggered_share"] = float(trig.mean())
                combos, prop, version, stopped, promoted = serve_split(
                    t, pred, canary, ads, ctx, u, rng_serve, cfg.explore, cfg.temperature,
                    cfg.canary, cfg.canary_checks, cfg.canary_stop_confidence, cfg.margin,
                    cfg.thompson, trig,
                )  # fmt: skip
                if canary is not None:
                    row["canary_stopped_at"], row["canary_promoted_at"] = stopped, promoted
                row["greedy_true_ctr"] = greedy_ctr(pred, t, ads[ev], ev_ctx)
            ctr = t.ctr(ads, combos, ctx)
            clicks = (u < ctr).astype(np.int8)
            arms["genco"].regret += float((oracle - ctr).sum())
            shown = pd.DataFrame(combos).assign(ad=ads).drop_duplicates()
            row.update(
                model_version=pred.version if pred is not None else "uniform",
                served_true_ctr=float(ctr.mean()),
                served_clicks=int(clicks.sum()),
                explore=float(explore[-1]),  # production's at the round's end
                floor_ratio_min=floor_ratio(t, ads, prop, explore),
                distinct_shown_per_ad=len(shown) / len(np.unique(ads)),
            )
            row["floor_holds"] = row["floor_ratio_min"] >= 1.0 - 1e-9
            for name, peer in peers.items():
                total = 0.0
                chunks = cfg.chunks if name.endswith("_online") else 1
                for part in np.array_split(np.arange(n), chunks):
                    pc = None if ctx is None else ctx[part]
                    c, p = peer.choose(ads[part], pc, peer_rng[name])
                    pctr = t.ctr(ads[part], c, pc)
                    peer.update(ads[part], pc, c, (u[part] < pctr).astype(float), p)
                    arms[name].regret += float((oracle[part] - pctr).sum())
                    total += float(pctr.sum())
                row[f"{name}_true_ctr"] = total / n
            # The served log and clicks file, joined and validated like production traffic.
            rdir = os.path.join(out_dir, f"round_{r:02d}")
            mode = "thompson" if cfg.thompson else "sample"
            served, clicked = served_frames(
                t, r, ads, ctx, combos, prop, clicks, version, mode=mode
            )
            storage.makedirs(rdir)
            storage.write_table(served, os.path.join(rdir, "served.parquet"))
            storage.write_table(clicked, os.path.join(rdir, "clicks.parquet"))
            joined = join_served_log(
                os.path.join(rdir, "served.parquet"),
                os.path.join(rdir, "clicks.parquet"),
                t.catalog,
                t.constraints,
                os.path.join(rdir, "data"),
            )
            row["rows_valid"] = joined["rows_valid"]
            logs.append(storage.read_table(os.path.join(rdir, "data", VALID_FILE)))
            for name, a in arms.items():
                row[f"{name}_cum_regret"] = a.regret
            if canary is not None:  # decided on the rows up to a mid-round promotion
                upto = slice(0, row["canary_promoted_at"] or n)
                row["canary_true_ctr"] = float(ctr[upto][version[upto] == canary.version].mean())
                pred = _decide_canary(cfg, t, store, pred, canary, canary_dir, version[upto],
                                      clicks[upto], row, ads[ev], ev_ctx,
                                      None if trig is None else trig[upto])  # fmt: skip
                canary = None
            if r < cfg.rounds - 1:
                pred, canary, canary_dir = _retrain(
                    cfg, t, out_dir, r, logs, catalog_path, constraints_path, store, pred, row,
                    ads[ev], ev_ctx,
                )  # fmt: skip
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            _write(out_dir, cfg, rows)
            say(
                f"round {r}: served {row['served_true_ctr']:.4f} greedy "
                f"{row['greedy_true_ctr'] or float('nan'):.4f} oracle {row['oracle_true_ctr']:.4f}"
                f" gate {row.get('gate_passed')} ({row['seconds']:.0f} s)"
            )
    finally:
        for peer in peers.values():
            if hasattr(peer, "close"):
                peer.close()
    return _write(out_dir, cfg, rows, plot=True)


def _warmup(cfg, t, out_dir, r, served, w, logs, paths, row, ev_ads, ev_ctx) -> Predictor:
    """The first ``w`` (uniform) rows of round 0 logged, joined and validated as a round is;
    the pipeline trains the first model on them and deploys it (no production yet)."""
    ads, ctx, u, combos, prop, version = served
    head = slice(0, w)
    clicks = u[head] < t.ctr(ads[head], combos[head], None if ctx is None else ctx[head])
    wdir = os.path.join(out_dir, f"round_{r:02d}", "warmup")
    frames = served_frames(
        t, r, ads[head], None if ctx is None else ctx[head], combos[head], prop[head],
        clicks.astype(np.int8), version[head], 0, len(ads),
    )  # fmt: skip
    storage.makedirs(wdir)
    for frame, name in zip(frames, ("served.parquet", "clicks.parquet"), strict=True):
        storage.write_table(frame, os.path.join(wdir, name))
    join_served_log(
        os.path.join(wdir, "served.parquet"), os.path.join(wdir, "clicks.parquet"), t.catalog,
        t.constraints, os.path.join(wdir, "data"),
    )  # fmt: skip
    logs.append(storage.read_table(os.path.join(wdir, "data", VALID_FILE)))
    audit: dict = {}
    pred, _, _ = _retrain(cfg, t, out_dir, r, logs, *paths, None, audit, ev_ads, ev_ctx,
                          log_dir=wdir)  # fmt: skip
    logs.pop()  # the round's whole log (these rows included) is appended after the round
    row.update({"warmup_impressions": w, **{f"warmup_{k}": v for k, v in audit.items()}})
    if pred is None or not audit.get("deployed"):
        raise ConfigError(f"the warm-up model was not deployed: {audit.get('gate_reason')}")
    return pred


def _decide_canary(cfg, t, store, pred, canary, canary_dir, version, clicks, row, ev_ads,
                   ev_ctx, triggered=None) -> Predictor:  # fmt: skip
    """The online gate on this round's two arms (on the ``triggered`` rows when given):
    promote the canary into the store or roll it back; audit the decision with both models'
    true greedy CTR."""
    early = row.get("canary_promoted_at") is not None  # at the mid-round looks' confidence
    gate = canary_gate(
        version, clicks, canary.version, pred.version, bundle_digest(canary_dir),
        cfg.margin, cfg.canary_stop_confidence if early else 0.95, triggered,
    )  # fmt: skip
    if early and not gate["passed"]:
        # the mid-round look passed this same rule on these same rows: a bug if not
        raise RuntimeError(f"a canary promoted mid-round fails its gate: {gate['reason']}")
    online = gate["online"]
    row.update(
        canary_version=canary.version,
        canary_share=online["canary_n"] / len(version),
        canary_promoted=gate["passed"],
        canary_reason=gate["reason"],
        canary_difference=online["value"],
        canary_difference_lower_bound=online["lower_bound"],
        canary_greedy_true_ctr=greedy_ctr(canary, t, ev_ads, ev_ctx),
        canary_vs_greedy_true_ctr=greedy_ctr(pred, t, ev_ads, ev_ctx),
    )
    worse = row["canary_greedy_true_ctr"] < row["canary_vs_greedy_true_ctr"] * (1 - cfg.tolerance)
    row["canary_shipped_worse"] = bool(gate["passed"] and worse)
    if not gate["passed"]:
        return pred
    result = promote(canary_dir, store, gate=gate)
    if not result.deployed:
        raise ConfigError(f"the store refused the canary: {result.reason}")
    return Predictor.load(current(store))


def _retrain(cfg, t, out_dir, r, logs, catalog_path, constraints_path, store, pred, row,
             ev_ads, ev_ctx, log_dir="",
             ) -> tuple[Predictor | None, Predictor | None, str]:  # fmt: skip
    """Run the retraining pipeline on every round's log so far; audit its gate decision.
    Returns production and the next round's canary (a refused candidate, or None)."""
    log_dir = log_dir or os.path.join(out_dir, f"round_{r:02d}")
    log_path = os.path.join(log_dir, "train_log.parquet")
    storage.write_table(pd.concat(logs, ignore_index=True), log_path)
    before = current_version(store)
    run_dir = run_local(
        {
            "catalog": catalog_path,
            "impressions": log_path,
            "constraints": constraints_path,
            "model_store": store,
            "reward_epochs": cfg.reward_epochs,
            "rl_steps": cfg.rl_steps,
            "seed": cfg.seed + r,
            "margin": cfg.margin,
            "served": "thompson" if cfg.thompson else "greedy",
            "serving": False,
        },
        os.path.join(out_dir, "pipeline_root"),
    )
    gate = storage.read_json(os.path.join(run_dir, "evaluate", "gate"))
    diff = gate.get("difference") or {}
    after = current_version(store)
    row.update(
        gate_passed=bool(gate["passed"]),
        deployed=after != before,
        gate_reason=gate["reason"],
        gate_candidate_value=gate.get("candidate_value"),
        gate_production_value=gate.get("production_value"),
        gate_difference=diff.get("value"),
        gate_difference_lower_bound=diff.get("lower_bound"),
        gate_difference_ci=[diff.get("ci_low"), diff.get("ci_high")] if diff else None,
    )
    candidate = Predictor.load(gate["candidate"]["path"])
    row["candidate_greedy_true_ctr"] = greedy_ctr(candidate, t, ev_ads, ev_ctx)
    if pred is not None:
        row["production_greedy_true_ctr"] = greedy_ctr(pred, t, ev_ads, ev_ctx)
        worse = row["candidate_greedy_true_ctr"] < row["production_greedy_true_ctr"] * (
            1 - cfg.tolerance
        )
        row["gate_shipped_worse"] = bool(row["deployed"] and worse)
    if after != before or pred is None:
        return Predictor.load(current(store)), None, ""
    if cfg.canary > 0 and candidate.version != pred.version:
        return pred, candidate, gate["candidate"]["path"]
    return pred, None, ""


def _write(out_dir: str, cfg: LoopConfig, rows: list[dict], plot: bool = False) -> dict:
    frame = pd.DataFrame(rows)
    storage.write_table(frame, os.path.join(out_dir, "rounds.csv"))
    last = rows[-1] if rows else {}
    summary = {
        "config": asdict(cfg),
        "rounds": rows,
        "final": {
            "served_over_oracle": last.get("served_true_ctr", 0) / last["oracle_true_ctr"]
            if rows
            else None,
            "greedy_over_oracle": (last.get("greedy_true_ctr") or 0) / last["oracle_true_ctr"]
            if rows
            else None,
            "cum_regret": {
                k[: -len("_cum_regret")]: v for k, v in last.items() if k.endswith("_cum_regret")
            },
            "floor_held_every_round": all(x["floor_holds"] for x in rows),
            "gate_shipped_worse": sum(bool(x.get("gate_shipped_worse")) for x in rows),
            "deploys": sum(bool(x.get("deployed")) for x in rows),
            "canaries": sum("canary_promoted" in x for x in rows),
            "canary_promotions": sum(bool(x.get("canary_promoted")) for x in rows),
            "canary_shipped_worse": sum(bool(x.get("canary_shipped_worse")) for x in rows),
        },
    }
    storage.write_json(os.path.join(out_dir, "rounds.json"), summary)
    if plot and rows:
        from genco.pipeline.loop_plot import plot_rounds

        summary["plot"] = plot_rounds(frame, os.path.join(out_dir, "loop.png"), cfg.world)
    return summary
