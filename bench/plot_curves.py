"""Learning curves from ``bench/quality.py --learning-curve`` JSON files: gap closed vs log size
per method (mean over seeds, shaded from the min to the max seed). Writes one PNG.

    python bench/plot_curves.py bench/results/quality_curve_aes.json \
        bench/results/quality_curve_per_product_contextual.json --out bench/results/curves.png
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

STYLE = {
    "genco": ("tab:red", "GenCO"),
    "exhaustive": ("tab:orange", "GenCO reward model, exhaustive"),
    "empirical": ("tab:blue", "empirical best"),
    "fm": ("tab:green", "factorization machine"),
    "vw": ("tab:purple", "Vowpal Wabbit"),
    "per_element": ("tab:gray", "per-element picks"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    curves = []
    for path in args.files:
        with open(path) as f:
            curves += json.load(f)["learning_curves"]
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.2), squeeze=False)
    for ax, curve in zip(axes[0], curves, strict=True):
        sizes = [point["impressions"] for point in curve["curve"]]
        for method, (color, label) in STYLE.items():
            if method == "exhaustive" or method not in curve["curve"][0]["gap_closed"]:
                continue
            runs = [[r["gap_closed"][method] for r in point["runs"]] for point in curve["curve"]]
            mean = [sum(v) / len(v) for v in runs]
            ax.plot(sizes, mean, marker="o", color=color, label=label)
            ax.fill_between(
                sizes, [min(v) for v in runs], [max(v) for v in runs], color=color, alpha=0.12
            )
        ax.set_xscale("log")
        ax.set_xlabel("impressions in the log")
        ax.set_ylabel("gap closed (true CTR of the top-1 pick)")
        ax.set_title(f"{curve['world']}: mean over {len(curve['curve'][0]['runs'])} seeds")
        ax.axhline(1.0, color="black", lw=0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
