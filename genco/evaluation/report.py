"""The evaluation report: one self-contained HTML page the Kubeflow UI renders as is.

Plots are PNGs embedded as base64 ``data:`` URIs, because the UI shows an HTML artifact in a
sandboxed frame that cannot fetch neighbouring files. Everything is drawn from files the
bundle already carries (reward_metrics.json, generator_metrics.json,
element_attribution.csv) plus the evaluation result, so a report can be re-rendered for
any stored version without re-running anything.

matplotlib is imported inside the functions: the report is the only place that needs it,
and the object API (``Figure``) keeps it off pyplot's global state and display backends.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from genco.data import storage
from genco.models.checkpoint import ELEMENT_FILE, METRICS_FILE

if TYPE_CHECKING:
    from google.cloud.storage import Client
    from matplotlib.figure import Figure

    from genco.evaluation.evaluate import EvalResult

GENERATOR_METRICS = "generator_metrics.json"
TOP_ELEMENTS = 15


def render_report(
    bundle_dir: str, result: EvalResult | None = None, client: Client | None = None
) -> str:
    """The whole HTML page for a bundle, with the gate's verdict when a result is given."""
    reward = _read_json(storage.join(bundle_dir, METRICS_FILE), client)
    gen = _read_json(storage.join(bundle_dir, GENERATOR_METRICS), client)
    elements_path = storage.join(bundle_dir, ELEMENT_FILE)
    elements = (
        storage.read_table(elements_path, client=client, dtype={"element_id": str})
        if storage.exists(elements_path, client=client)
        else None
    )
    sections = [_verdict(result) if result is not None else ""]
    curves = _reliability_curves(result, reward)
    if curves:
        sections.append(_figure("Reliability (held-out)", plot_reliability(curves)))
    if reward.get("train", {}).get("history") or gen.get("history"):
        sections.append(
            _figure(
                "Learning curves",
                plot_learning_curves(
                    reward.get("train", {}).get("history", []), gen.get("history", [])
                ),
            )
        )
    if elements is not None and len(elements):
        sections.append(_figure("Top elements by attribution", plot_top_elements(elements)))
        sections.append(_figure("Element effect by component", plot_effect_heatmap(elements)))
    title = f"GenCO evaluation: {html.escape(bundle_dir)}"
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{title}</title><style>{_CSS}</style></head><body>"
        f"<h1>{title}</h1>{''.join(sections)}</body></html>"
    )


def render_summary(result: EvalResult) -> str:
    """The gate's verdict as Markdown (the Kubeflow UI renders a ``Markdown`` artifact; a
    reader without the UI opens it as text): decision, reason, and each bundle's figures."""

    def num(value: float | None, digits: int = 5) -> str:
        return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"

    verdict = "PASSED: deploy" if result.passed else "REFUSED: production stays"
    lines = [
        "# GenCO evaluation",
        "",
        f"**{verdict}**: {result.reason}",
        "",
        f"Margin {result.margin:g}; held-out rows {result.holdout_rows}, policy rows "
        f"{result.policy_rows} (propensities: {result.propensity_source}).",
        "",
        "| bundle | version | off-policy CTR (95% CI) | matched | AUC | log loss | ECE |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for who, b in (("candidate", result.candidate), ("production", result.production)):
        if b is None:
            lines.append(f"| {who} | none | | | | | |")
            continue
        p = b.policy
        value = (
            "n/a"
            if p is None or p.value is None
            else f"{num(p.value)} ({num(p.ci_low)} .. {num(p.ci_high)})"
        )
        matched = "" if p is None else str(p.matched)
        lines.append(
            f"| {who} | {b.version} | {value} | {matched} | {num(b.auc, 4)} | "
            f"{num(b.log_loss)} | {num(b.ece, 4)} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------- figures


def plot_reliability(curves: dict[str, list[dict]]) -> Figure:
    """Predicted vs observed CTR in equal-mass bins, one line per model."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.add_subplot()
    top = 0.0
    for name, rows in curves.items():
        p = [r["predicted"] for r in rows]
        o = [r["observed"] for r in rows]
        ax.plot(p, o, marker="o", label=name)
        top = max(top, *p, *o)
    ax.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1, label="perfect")
    ax.set_xlabel("predicted CTR")
    ax.set_ylabel("observed CTR")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_learning_curves(reward_history: list[dict], generator_history: list[dict]) -> Figure:
    """Reward model loss per epoch and the generator's mean reward (logit credit) per step."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    if reward_history:
        epochs = [h["epoch"] for h in reward_history]
        left.plot(epochs, [h["train_loss"] for h in reward_history], marker="o", label="train")
        if all("val_loss" in h for h in reward_history):
            left.plot(epochs, [h["val_loss"] for h in reward_history], marker="o", label="val")
        left.legend()
    left.set(title="reward model", xlabel="epoch", ylabel="log loss")
    if generator_history:
        steps = [h["step"] for h in generator_history]
        right.plot(steps, _smooth([h["reward"] for h in generator_history]), label="reward")
        twin = right.twinx()
        twin.plot(steps, [h["entropy"] for h in generator_history], color="tab:orange", alpha=0.6)
        twin.set_ylabel("entropy (nats)", color="tab:orange")
    right.set(title="generator", xlabel="RL step", ylabel="mean creative logit (smoothed)")
    fig.tight_layout()
    return fig


def plot_top_elements(elements: pd.DataFrame, n: int = TOP_ELEMENTS) -> Figure:
    """The elements with the largest effect on the click logit, with 95% intervals."""
    from matplotlib.figure import Figure

    top = elements.sort_values("effect", ascending=False).head(n).iloc[::-1]
    labels = [f"{c}={e}" for c, e in zip(top["component"], top["element_id"])]
    err = np.nan_to_num(1.96 * top["effect_se"].to_numpy(np.float64), nan=0.0)
    fig = Figure(figsize=(7, 0.3 * len(top) + 1.2))
    ax = fig.add_subplot()
    ax.barh(labels, top["effect"].to_numpy(np.float64), xerr=err, color="tab:blue")
    ax.axvline(0, color="grey", linewidth=1)
    ax.set_xlabel("effect on click logit (centred per component)")
    fig.tight_layout()
    return fig


def plot_effect_heatmap(elements: pd.DataFrame) -> Figure:
    """One row per component, its elements ranked by effect, coloured and labelled."""
    from matplotlib.figure import Figure

    comps = list(dict.fromkeys(elements["component"]))
    ranked = [
        elements[elements["component"] == c].sort_values("effect", ascending=False) for c in comps
    ]
    width = max(len(r) for r in ranked)
    grid = np.full((len(comps), width), np.nan)
    for i, r in enumerate(ranked):
        grid[i, : len(r)] = r["effect"].to_numpy(np.float64)
    bound = float(np.nanmax(np.abs(grid))) or 1.0
    fig = Figure(figsize=(max(6.0, 0.9 * width + 2), 0.7 * len(comps) + 1.5))
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    for i, r in enumerate(ranked):
        for j, (e, v) in enumerate(zip(r["element_id"], r["effect"])):
            ax.text(j, i, f"{e}\n{v:+.2f}", ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(comps)), comps)
    ax.set_xticks(range(width), [str(j + 1) for j in range(width)])
    ax.set_xlabel("rank within component")
    fig.colorbar(image, ax=ax, label="effect on click logit")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------- private

_CSS = (
    "body{font-family:sans-serif;margin:1.5em;max-width:70em}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25em .6em;"
    "text-align:right}th:first-child,td:first-child{text-align:left}"
    ".pass{color:#176117}.fail{color:#a11}img{max-width:100%}"
)


def _read_json(path: str, client: Client | None) -> dict:
    return storage.read_json(path, client=client) if storage.exists(path, client=client) else {}


def _smooth(values: list[float], window: int = 10) -> np.ndarray:
    """Trailing mean: a centred one would bend the ends of the curve towards zero."""
    x = np.asarray(values, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(x)])
    i = np.arange(1, len(x) + 1)
    start = np.maximum(i - window, 0)
    return (c[i] - c[start]) / (i - start)


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(title: str, fig: Figure) -> str:
    return (
        f"<h2>{html.escape(title)}</h2>"
        f"<img alt='{html.escape(title)}' src='data:image/png;base64,{_png(fig)}'>"
    )


def _reliability_curves(result: EvalResult | None, reward: dict) -> dict[str, list[dict]]:
    curves: dict[str, list[dict]] = {}
    if result is not None:
        for name, b in (("candidate", result.candidate), ("production", result.production)):
            if b is not None and b.reliability:
                curves[name] = b.reliability
    if not curves and reward.get("test", {}).get("reliability"):
        curves["candidate"] = reward["test"]["reliability"]
    return curves


def _fmt(v: float | None, digits: int = 5) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


def _verdict(result: EvalResult) -> str:
    cls = "pass" if result.passed else "fail"
    word = "PASSED: deploy" if result.passed else "REFUSED: production stays"
    rows = []
    for label, get in (
        ("held-out AUC", lambda b: _fmt(b.auc, 4)),
        ("held-out log loss", lambda b: _fmt(b.log_loss)),
        ("held-out ECE", lambda b: _fmt(b.ece)),
        ("policy value (SNIPS CTR)", lambda b: _fmt(b.value)),
        (
            "confidence interval",
            lambda b: (
                "-"
                if b.policy is None or b.policy.value is None
                else f"{_fmt(b.policy.ci_low)} .. {_fmt(b.policy.ci_high)}"
            ),
        ),
        ("matched impressions", lambda b: "-" if b.policy is None else str(b.policy.matched)),
        ("own predicted CTR of choices", lambda b: _fmt(b.predicted_ctr)),
        ("true CTR (simulation)", lambda b: _fmt(b.true_ctr)),
        ("gap closed (simulation)", lambda b: _fmt(b.gap_closed, 3)),
    ):
        prod = "-" if result.production is None else get(result.production)
        rows.append(f"<tr><td>{label}</td><td>{get(result.candidate)}</td><td>{prod}</td></tr>")
    prod_name = "none" if result.production is None else html.escape(result.production.version)
    notes = [
        f"margin {result.margin:g}; {result.policy_rows} rows for the policy value "
        f"(propensities {html.escape(result.propensity_source)}), "
        f"{result.holdout_rows} held-out rows for AUC/log loss"
    ]
    if result.production is not None and result.production.error:
        notes.append(f"production could not be scored: {html.escape(result.production.error)}")
    if result.truth:
        notes.append(
            f"logging policy true CTR {_fmt(result.truth['logging_true_ctr'])}, "
            f"oracle {_fmt(result.truth['oracle_true_ctr'])}"
        )
    return (
        f"<h2 class='{cls}'>{word}</h2><p>{html.escape(result.reason)}</p>"
        f"<table><tr><th></th><th>candidate</th><th>production ({prod_name})</th></tr>"
        f"{''.join(rows)}</table><p>{'<br>'.join(notes)}</p>"
    )
