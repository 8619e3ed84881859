"""Markdown tables of BENCHMARKS.md "Closed loop" (branch loop17) from the runs' rounds.json.

python bench/results/loop17/table.py bench/results/loop17 [bench/results/loop16]
"""

import glob
import json
import os
import sys

import numpy as np


def load(d):
    out = {}
    for f in sorted(glob.glob(os.path.join(d, "*_rounds.json"))):
        name = os.path.basename(f)[: -len("_rounds.json")]
        world, seed = name.rsplit("_s", 1)
        with open(f) as fh:
            out[(world, int(seed))] = json.load(fh)
    return out


def pct(a, b):
    return f"{a:.4f} vs {b:.4f} ({(a / b - 1) * 100:+.1f}%)"


def ratios(s):
    reg = s["final"]["cum_regret"]
    return {
        k: reg["genco"] / reg[k]
        for k in ("element_ts", "element_ts_online", "vw_squarecb", "vw_squarecb_online")
        if reg.get(k)
    }


def row(seed, s):
    rs, f = s["rounds"], s["final"]
    q = ratios(s)
    off, ab = [], []
    worse = 0
    for r in rs:
        if r.get("production_greedy_true_ctr") and "candidate_greedy_true_ctr" in r:
            verdict = "deployed" if r["deployed"] else "refused"
            off.append(
                f"r{r['round']} {verdict} "
                + pct(r["candidate_greedy_true_ctr"], r["production_greedy_true_ctr"])
            )
        if "canary_promoted" in r:
            stop = r.get("canary_stopped_at")
            verdict = "promoted" if r["canary_promoted"] else "rolled back"
            extra = f", LB {r['canary_difference_lower_bound']:+.4f}"
            if stop is not None:
                extra += f", stopped at {stop / 1000:.0f}k"
            if r.get("canary_promoted_at") is not None:
                extra += f", at {r['canary_promoted_at'] / 1000:.0f}k"
            ab.append(
                f"r{r['round']} {verdict} "
                + pct(r["canary_greedy_true_ctr"], r["canary_vs_greedy_true_ctr"])[:-1]
                + extra
                + ")"
            )
        worse += bool(r.get("gate_shipped_worse")) + bool(r.get("canary_shipped_worse"))
    r0 = rs[0]
    warm = (
        f"{r0['warmup_candidate_greedy_true_ctr'] / r0['oracle_true_ctr']:.3f}"
        if r0.get("warmup_candidate_greedy_true_ctr")
        else "-"
    )
    cells = [
        str(seed),
        f"{f['served_over_oracle']:.4f}",
        f"{f['greedy_over_oracle']:.4f}",
        warm,
        f"{r0['genco_cum_regret']:.0f} / {f['cum_regret']['genco']:.0f}",
        *(
            f"{q.get(k, float('nan')):.2f}"
            for k in ("element_ts", "element_ts_online", "vw_squarecb", "vw_squarecb_online")
        ),
        "; ".join(off),
        "; ".join(ab),
        str(worse),
    ]
    return "| " + " | ".join(cells) + " |", cells


def main():
    new = load(sys.argv[1])
    old = load(sys.argv[2]) if len(sys.argv) > 2 else {}
    for world in ("interactions", "per_product", "aes"):
        seeds = sorted(s for w, s in new if w == world)
        if not seeds:
            continue
        print(f"#### {world}\n")
        print(
            "| seed | served / oracle (round 4) | greedy / oracle | warm-up model greedy / oracle"
            " | GenCO regret round 0 / total | / TS | / TS online | / VW | / VW online"
            " | offline gate (candidate vs production, true greedy CTR)"
            " | canary A/B (canary vs production, true greedy CTR) | shipped worse |"
        )
        print("| --- " * 12 + "|")
        vals = []
        for seed in seeds:
            line, cells = row(seed, new[(world, seed)])
            print(line)
            vals.append(cells)
        cols = [1, 2, 5, 6, 7, 8]
        agg = []
        for c in cols:
            v = np.array([float(x[c]) for x in vals])
            agg.append(f"{v.mean():.3f} / {v.std(ddof=1) if len(v) > 1 else float('nan'):.3f}")
        print(
            f"| mean / sd ({len(seeds)} seeds) | {agg[0]} | {agg[1]} | | | {agg[2]} | {agg[3]} "
            f"| {agg[4]} | {agg[5]} | | | |"
        )
        if old:
            o = [old[(world, s)] for s in seeds if (world, s) in old]
            if o:
                so = np.mean([x["final"]["served_over_oracle"] for x in o])
                ts = np.mean([ratios(x)["element_ts"] for x in o])
                vw = np.mean([ratios(x)["vw_squarecb"] for x in o])
                reg = np.mean([x["final"]["cum_regret"]["genco"] for x in o])
                regn = np.mean([new[(world, s)]["final"]["cum_regret"]["genco"] for s in seeds])
                print(
                    f"\nSame seeds before (loop16, no warm-up): served / oracle {so:.3f}, "
                    f"regret / TS {ts:.2f}, / VW {vw:.2f}; GenCO regret {reg:.0f} -> {regn:.0f}."
                )
        print()


main()
