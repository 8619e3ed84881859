"""``loop.png``: the closed loop's rounds at a glance (matplotlib, no display)."""

from __future__ import annotations

import pandas as pd


def plot_rounds(frame: pd.DataFrame, path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    x = frame["round"]
    a.plot(x, frame["oracle_true_ctr"], "k--", label="oracle")
    a.plot(x, frame["served_true_ctr"], "o-", label="GenCO served (with exploration)")
    a.plot(x, frame["greedy_true_ctr"], "s:", label="GenCO greedy pick")
    for col in frame.columns:
        if col.endswith("_true_ctr") and col.split("_true_ctr")[0] not in (
            "oracle", "served", "greedy", "candidate_greedy", "production_greedy",
        ):  # fmt: skip
            a.plot(x, frame[col], ".-", alpha=0.7, label=col.replace("_true_ctr", ""))
    if "deployed" in frame:
        for r in frame.loc[frame["deployed"].fillna(False).astype(bool), "round"]:
            a.axvline(r + 0.5, color="g", lw=0.8, ls=":")  # a deploy serves from round r + 1
    a.set(xlabel="round", ylabel="true CTR", title=f"{title}: true CTR (green: deploys)")
    a.legend(fontsize=7)
    for col in frame.columns:
        if col.endswith("_cum_regret"):
            b.plot(x, frame[col], "o-", label=col.replace("_cum_regret", ""))
    b.set(xlabel="round", ylabel="expected clicks lost", title="cumulative regret")
    b.legend(fontsize=7)
    c.plot(x, frame["explore"], "o-", label="exploration rate")
    c.plot(x, frame["floor_ratio_min"].clip(upper=5), "s:", label="min propensity / floor (cap 5)")
    c.axhline(1.0, color="k", lw=0.5)
    c.set(xlabel="round", title="exploration", yscale="log")
    c.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
