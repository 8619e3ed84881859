"""Candidate vs production on the same logged data: the evaluation gate before deploy.

Both bundles are scored on the same rows. The click model: held-out AUC, log loss and
calibration of each reward model on the latest ``holdout_fraction`` of the log by time (rows
the candidate's reward model did not train on). The policy: the off-policy value of each
served policy by self-normalised IPS, ``V(pi) = sum_i w_i click_i / sum_i w_i``, ``w_i =
pi(logged combo_i | ad_i, ctx_i) / p_i``: pi is the top-1 of ``Predictor.recommend`` (0 or 1,
``served="greedy"``) or the posterior-draw policy's probability (``served="thompson"``,
``genco.inference.thompson``), on those same held-out rows (``value_rows="holdout"``): on rows
it trained on, a candidate whose reward model memorised lucky clicks looks better than it is
(BENCHMARKS.md, "Closed loop"). p_i is the logged ``propensity``, else the per-ad frequency of
the combination (``propensity_source``).

The gate (``rule="bernstein"``, the default) deploys only when the candidate wins by more
than the noise: a one-sided ``confidence`` lower bound of D = V(candidate) - V(production) on
the same rows must lie above ``margin * V(production)``. The bound is the clipped-weight
empirical-Bernstein one (``genco.evaluation.ope.bernstein_difference``), which holds for the
heavy-tailed weights of a policy's own logs (a choice shown only by exploration weighs
1 / (explore / n_combinations)); and where the two policies choose differently the
candidate's matched impressions must reach an effective sample size of ``min_ess``, else the
refusal says there is not enough evidence (the loop then tries the candidate online, as a
canary: ``genco.pipeline.loop``). ``rule="lcb"`` is the older delta-method normal bound of the
paired SNIPS difference (``snips_difference``), far too tight on a handful of huge weights
(BENCHMARKS.md, "Closed loop"); ``rule="point"`` compares point estimates,
``V(candidate) >= V(production) * (1 + margin)``. A negative margin tolerates a
small loss (e.g. to pick up new catalog elements). The gate refuses when either value
cannot be estimated (no logged impression matches its choices) or production cannot be
scored at all (another catalog's components, damaged files): an unknown is never a win.
Only "no production model yet" lets a candidate in unopposed. With a simulated world's
ground truth, true CTRs and the share of the logging-to-oracle gap closed are added for
information; they never decide the gate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from genco.data import storage
from genco.data.ingest import VALID_FILE
from genco.errors import BundleError, CatalogMismatchError, ConfigError, ContractError
from genco.evaluation.heldout import evaluate_reward, holdout_split
from genco.evaluation.ope import Difference, PolicyValue, bernstein_difference
from genco.evaluation.ope import snips as _snips
from genco.evaluation.ope import snips_difference as _snips_difference
from genco.evaluation.truth_eval import row_keys as _keys
from genco.evaluation.truth_eval import true_ctr as _true_ctr
from genco.evaluation.truth_eval import truth_baselines as _truth_baselines
from genco.evaluation.truth_eval import truth_ctx as _truth_ctx
from genco.inference.predictor import Predictor
from genco.inference.thompson import served_shares
from genco.models.reward import BoundModel
from genco.models.vocab import Encoded, encode

if TYPE_CHECKING:
    from google.cloud.storage import Client

    from genco.worlds.simulate import GroundTruth

GATE_FILE = "gate.json"
GATE_RULES = ("bernstein", "lcb", "point")
SERVED = ("greedy", "thompson")


@dataclass(frozen=True)
class EvalConfig:
    margin: float = field(
        default=0.0,
        metadata={
            "help": "Gate: the candidate's value must reach production's x (1 + margin); "
            "negative tolerates a small loss."
        },
    )
    holdout_fraction: float = field(
        default=0.1, metadata={"help": "Latest share of the log (by time) for AUC/log loss."}
    )
    confidence: float = field(default=0.95, metadata={"help": "Confidence of value intervals."})
    max_policy_contexts: int = field(
        default=5000,
        metadata={
            "help": "Most distinct (ad, context) keys to decode per bundle; above it a seeded "
            "random subset of rows is evaluated (continuous contexts make every row a key)."
        },
    )
    n_bins: int = field(default=10, metadata={"help": "Reliability curve bins."})
    value_rows: str = field(default="holdout", metadata={"help": "Values on 'holdout' or 'all'."})
    rule: str = field(
        default="bernstein",
        metadata={
            "help": "Gate: 'bernstein' (clipped empirical-Bernstein bound of the gain), 'lcb' "
            "(normal bound) or 'point'."
        },
    )
    clip: float = field(
        default=10.0, metadata={"help": "'bernstein': cap on the candidate's importance weight."}
    )
    min_ess: float = field(
        default=30.0,
        metadata={
            "help": "'bernstein': least effective sample size of the candidate's matched rows "
            "where its choice differs from production's."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the row subset."})
    served: str = field(
        default="greedy",
        metadata={"help": "Policy judged: 'greedy' (beam top-1) or 'thompson' (posterior draws)."},
    )

    def __post_init__(self) -> None:
        for name, allowed in (("served", SERVED), ("rule", GATE_RULES)):
            if getattr(self, name) not in allowed:
                got = getattr(self, name)
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got '{got}'")
        if not self.margin > -1.0:
            raise ConfigError(f"margin must be > -1, got {self.margin}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ConfigError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if not 0.0 < self.confidence < 1.0:
            raise ConfigError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.max_policy_contexts < 1:
            raise ConfigError(f"max_policy_contexts must be >= 1, got {self.max_policy_contexts}")
        if self.n_bins < 1:
            raise ConfigError(f"n_bins must be >= 1, got {self.n_bins}")
        if self.value_rows not in ("holdout", "all"):
            raise ConfigError(f"value_rows must be 'holdout' or 'all', got '{self.value_rows}'")
        if not self.clip >= 1.0:
            raise ConfigError(f"clip must be >= 1, got {self.clip}")
        if not self.min_ess >= 0.0:
            raise ConfigError(f"min_ess must be >= 0, got {self.min_ess}")


@dataclass
class BundleEval:
    path: str
    version: str
    auc: float | None = None
    log_loss: float | None = None
    ece: float | None = None
    reliability: list[dict] = field(default_factory=list)
    policy: PolicyValue | None = None
    predicted_ctr: float | None = None  # its own reward model's CTR of its own choices
    true_ctr: float | None = None  # simulated worlds only
    gap_closed: float | None = None  # (true - logging) / (oracle - logging)
    error: str | None = None  # why it could not be evaluated on this data

    @property
    def value(self) -> float | None:
        return None if self.policy is None else self.policy.value


@dataclass
class EvalResult:
    passed: bool
    reason: str
    margin: float
    candidate: BundleEval
    production: BundleEval | None
    candidate_digest: str
    production_version: str | None
    holdout_rows: int
    policy_rows: int
    propensity_source: str
    truth: dict | None = None
    seconds: float = 0.0
    difference: Difference | None = None
    rule: str = "point"

    @property
    def candidate_value(self) -> float | None:
        return self.candidate.value

    @property
    def production_value(self) -> float | None:
        return None if self.production is None else self.production.value

    def to_dict(self) -> dict:
        """The gate file: deploy reads ``passed``, ``candidate_digest``, ``production_version``."""
        out = asdict(self)
        out["candidate_value"] = self.candidate_value
        out["production_value"] = self.production_value
        return out

    def metrics(self) -> dict[str, float]:
        """Flat scalars for a KFP ``Metrics`` artifact (missing values left out)."""
        out: dict[str, float] = {"passed": float(self.passed), "margin": self.margin}
        for who, b in (("candidate", self.candidate), ("production", self.production)):
            if b is None:
                continue
            for key in ("auc", "log_loss", "ece", "predicted_ctr", "true_ctr", "gap_closed"):
                v = getattr(b, key)
                if v is not None:
                    out[f"{who}_{key}"] = float(v)
            if b.policy is not None:  # matched 0: no logged row shows its choice, no value
                out[f"{who}_matched"] = float(b.policy.matched)
            if b.policy is not None and b.policy.value is not None:
                out[f"{who}_value"] = b.policy.value
                out[f"{who}_value_ci_low"] = float(b.policy.ci_low)
                out[f"{who}_value_ci_high"] = float(b.policy.ci_high)
        return out


# -------------------------------------------------------------------------- public


def evaluate_bundle(
    candidate_dir: str,
    impressions: str | pd.DataFrame,
    production_dir: str | None = None,
    config: EvalConfig | None = None,
    truth: GroundTruth | None = None,
    production_version: str | None = None,
    client: Client | None = None,
) -> EvalResult:
    """Score candidate and production bundles on the same validated impressions; apply the gate.

    impressions: validated rows (``genco validate``'s impressions.parquet, a pipeline data
    directory, or a DataFrame). Both bundles are decoded over the candidate's catalog and
    constraints: those are what the deployed model will serve.
    truth: a ``genco.worlds.simulate.GroundTruth`` for the simulated-world extras, or None.
    """
    from genco.store import bundle_digest

    t0 = time.perf_counter()
    config = config or EvalConfig()
    frame = _read_impressions(impressions, client)
    cand = Predictor.load(candidate_dir, client=client)
    catalog, constraints = cand.catalog, cand.constraints
    digest = bundle_digest(candidate_dir, client=client)

    enc = encode(frame, catalog)
    _, test_idx = holdout_split(enc, config.holdout_fraction, config.seed)
    rows = _policy_rows(enc, config, test_idx)
    propensity, source = _propensities(enc)
    ctx = _truth_ctx(truth, enc)

    candidate, cand_match = _score(
        cand, candidate_dir, enc, test_idx, rows, propensity, config, truth, ctx
    )
    production = None
    diff = None
    if production_dir is not None:
        try:
            prod = Predictor.load(production_dir, catalog, constraints, client=client)
            production, prod_match = _score(
                prod, production_dir, enc, test_idx, rows, propensity, config, truth, ctx
            )
            if cand_match is not None and prod_match is not None:
                args = (cand_match, prod_match, enc.click[rows], propensity[rows])
                if config.rule == "bernstein":
                    diff = bernstein_difference(*args, config.confidence, config.clip)
                else:
                    diff = _snips_difference(*args, config.confidence)
        except (CatalogMismatchError, BundleError) as exc:
            # Production was trained on other components/features, or its files are damaged:
            # it cannot be compared, so the gate fails closed (see ``gate``). Any other
            # exception is a bug and propagates: it must never read as a win for the candidate.
            production = BundleEval(production_dir, "unknown", error=str(exc))
        production.version = production_version or production.version

    lcb = diff if config.rule != "point" else None
    passed, reason = gate(candidate, production, config.margin, lcb, config.min_ess)
    truth_info = None
    if truth is not None:
        truth_info = _truth_baselines(truth, catalog, constraints, enc, rows, ctx)
        for b in (candidate, production):
            if b is not None and b.true_ctr is not None:
                span = truth_info["oracle_true_ctr"] - truth_info["logging_true_ctr"]
                b.gap_closed = (
                    (b.true_ctr - truth_info["logging_true_ctr"]) / span if span else None
                )
    return EvalResult(
        passed=passed,
        reason=reason,
        margin=config.margin,
        candidate=candidate,
        production=production,
        candidate_digest=digest,
        production_version=production_version,
        holdout_rows=len(test_idx),
        policy_rows=len(rows),
        propensity_source=source,
        truth=truth_info,
        seconds=time.perf_counter() - t0,
        difference=diff,
        rule=config.rule,
    )


def gate(
    candidate: BundleEval,
    production: BundleEval | None,
    margin: float,
    difference: Difference | None = None,
    min_ess: float = 0.0,
) -> tuple[bool, str]:
    """The deploy decision and a sentence saying why (shown in the report and the pointer).

    With ``difference`` (the "bernstein" and "lcb" rules) the candidate must win by more than
    the noise: the lower bound of candidate - production above ``margin`` x production and,
    for "bernstein", the candidate's matched effective sample size where the two choose
    differently at least ``min_ess``; without it, the point estimates are compared."""
    if candidate.error is not None:
        return False, f"the candidate cannot score this data ({candidate.error})"
    if production is None:
        return True, "no production model: first deployment"
    if production.error is not None:
        return False, (
            f"production cannot score the current data ({production.error}); not replacing it "
            "automatically: deploy by hand (genco deploy without --gate-file) if intended"
        )
    c, p = candidate.value, production.value
    if c is None:
        return False, "no logged impression matches the candidate's choices: value unknown"
    if p is None:
        return False, "no logged impression matches production's choices: value unknown"
    if difference is not None:
        need = margin * p
        ok = difference.lower_bound > need
        why = (
            f"candidate - production = {difference.value:+.5f} (candidate {c:.5f}, production "
            f"{p:.5f}); its {difference.confidence:.0%} {difference.method} lower bound "
            f"{difference.lower_bound:+.5f} {'>' if ok else '<='} margin x production = "
            f"{need:+.5f}"
        )
        d = difference
        if d.method == "bernstein" and d.rows_differ and d.ess_differ < min_ess:
            return False, (
                f"not enough evidence where the two differ: they choose differently on "
                f"{d.rows_differ} of {d.rows} rows, where the candidate's choice has an "
                f"effective sample size of {d.ess_differ:.1f} < min_ess {min_ess:g}; {why}"
            )
        return ok, why
    threshold = p * (1.0 + margin)
    # A value exactly at the threshold passes; isclose keeps float rounding of p * (1 + m)
    # from turning such a tie into a refusal.
    ok = c >= threshold or math.isclose(c, threshold, rel_tol=1e-9)
    verdict = ">=" if ok else "<"
    return ok, (
        f"candidate value {c:.5f} {verdict} production {p:.5f} x (1 + {margin:g}) = {threshold:.5f}"
    )


def run_evaluate(
    bundle_dir: str,
    data: str,
    model_store: str | None = None,
    gate_path: str | None = None,
    report_path: str | None = None,
    config: EvalConfig | None = None,
    ground_truth: str | None = None,
    log_metric: Callable[[str, float], None] | None = None,
    client: Client | None = None,
    summary_path: str | None = None,
) -> EvalResult:
    """``genco evaluate`` and the pipeline's evaluate step: against the store's production.

    Writes the gate JSON (read by the deploy step), the HTML report and its Markdown summary
    when paths are given; log_metric(name, value) receives ``EvalResult.metrics()`` (a KFP
    ``Metrics.log_metric``).
    """
    from genco.store import current, current_version

    production_dir = current(model_store, client=client) if model_store else None
    version = current_version(model_store, client=client) if model_store else None
    truth = None
    if ground_truth:
        from genco.worlds.simulate import GroundTruth

        truth = GroundTruth.load(ground_truth, client=client)
    result = evaluate_bundle(bundle_dir, data, production_dir, config, truth, version, client)
    if gate_path:
        storage.write_json(gate_path, result.to_dict(), client=client)
    if report_path:
        from genco.evaluation.report import render_report

        storage.write_text(report_path, render_report(bundle_dir, result, client), client=client)
    if summary_path:
        from genco.evaluation.report import render_summary

        storage.write_text(summary_path, render_summary(result), client=client)
    if log_metric is not None:
        for name, value in result.metrics().items():
            log_metric(name, value)
    return result


# ------------------------------------------------------------------------- private


def _read_impressions(impressions: str | pd.DataFrame, client: Client | None) -> pd.DataFrame:
    if isinstance(impressions, pd.DataFrame):
        frame = impressions
    else:
        path = impressions
        if storage.exists(storage.join(path, VALID_FILE), client=client):
            path = storage.join(path, VALID_FILE)  # a pipeline data directory
        frame = storage.read_table(path, client=client)
    if len(frame) == 0:
        raise ContractError("impressions: no rows to evaluate on")
    return frame


def _policy_rows(enc: Encoded, config: EvalConfig, held_out: np.ndarray) -> np.ndarray:
    """The rows the values are estimated on (all, or the held-out ones: ``value_rows``), or
    a seeded subset of them when decoding every distinct key would take too long."""
    rows = np.sort(held_out) if config.value_rows == "holdout" else np.arange(len(enc))
    keys = _keys(enc, rows)
    if len(np.unique(keys)) <= config.max_policy_contexts:
        return rows
    rng = np.random.default_rng(config.seed)
    return np.sort(rng.choice(rows, size=config.max_policy_contexts, replace=False))


def _propensities(enc: Encoded) -> tuple[np.ndarray, str]:
    if enc.propensity is not None:
        return enc.propensity, "logged"
    # Share of the ad's impressions that showed this exact combination.
    table = pd.DataFrame(enc.combos).assign(ad=enc.ads)
    combo_n = table.groupby([*range(enc.combos.shape[1]), "ad"])["ad"].transform("size")
    ad_n = table.groupby("ad")["ad"].transform("size")
    return (combo_n / ad_n).to_numpy(np.float64), "estimated: per-ad frequency of the combination"


def _choices(pred: Predictor, enc: Encoded, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bundle's top-1 combination (catalog codes, (len(rows), K)) and its predicted CTR."""
    keys = _keys(enc, rows)
    _, first = np.unique(keys, return_index=True)
    catalog = pred.catalog
    K = catalog.n_components
    key_combo = np.zeros((len(first), K), dtype=np.int64)
    key_score = np.zeros(len(first))
    for j, r in enumerate(rows[first]):
        ctx = enc.ctx[r] if enc.ctx.shape[1] else None
        top = pred.recommend(catalog.ads[enc.ads[r]], ctx, top_k=1)[0]
        key_combo[j] = [
            catalog.element_code(k, top.elements[c]) for k, c in enumerate(catalog.components)
        ]
        key_score[j] = top.score
    # np.unique sorts, so key id j is the j-th unique key: index by key id to expand to rows.
    return key_combo[keys], key_score[keys]


def _score(
    pred: Predictor,
    path: str,
    enc: Encoded,
    test_idx: np.ndarray,
    rows: np.ndarray,
    propensity: np.ndarray,
    config: EvalConfig,
    truth: GroundTruth | None,
    truth_ctx: np.ndarray | None,
) -> tuple[BundleEval, np.ndarray | None]:
    """The bundle's evaluation and which policy rows its choice matches (None: not scored)."""
    out = BundleEval(path, pred.version)
    catalog = pred.catalog
    if tuple(enc.context_columns) != tuple(pred.context_columns):
        out.error = (
            f"its context columns {list(pred.context_columns)} differ from the log's "
            f"{list(enc.context_columns)}"
        )
        return out, None
    test = enc.take(test_idx)
    if len(test) and 0 < test.click.sum() < len(test):
        bound = BoundModel(pred.reward, catalog, allow_unknown_ads=True)
        m = evaluate_reward(bound, test, n_bins=config.n_bins)
        out.auc, out.log_loss, out.ece = m["auc"], m["log_loss"], m["ece"]
        out.reliability = m["reliability"]
    combos, scores = _choices(pred, enc, rows)
    match = np.all(enc.combos[rows] == combos, axis=1).astype(np.float64)
    if config.served == "thompson":  # the served policy's probability of each logged row
        match = served_shares(pred, enc.ads[rows], enc.ctx[rows], enc.combos[rows])
    out.policy = _snips(match, enc.click[rows], propensity[rows], config.confidence)
    out.predicted_ctr = float(scores.mean())
    if truth is not None:
        out.true_ctr = float(_true_ctr(truth, catalog, enc.ads[rows], combos, truth_ctx).mean())
    return out, match


__all__ = [
    "GATE_FILE",
    "BundleEval",
    "Difference",
    "EvalConfig",
    "EvalResult",
    "PolicyValue",
    "evaluate_bundle",
    "gate",
    "run_evaluate",
]
