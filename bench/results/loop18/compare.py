"""BENCHMARKS.md "Closed loop" 2026-11-30 (loop18): explore 0.02 against loop17's 0.05 on the
same seeds, and the thompson run. python bench/results/loop18/compare.py"""

import glob
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = ("element_ts", "element_ts_online", "vw_squarecb", "vw_squarecb_online", "combo_ts")


def load(d):
    out = {}
    for f in sorted(glob.glob(os.path.join(d, "*_rounds.json"))):
        world, seed = os.path.basename(f)[: -len("_rounds.json")].rsplit("_s", 1)
        with open(f) as fh:
            out[(world, int(seed))] = json.load(fh)
    return out


def figures(s):
    f, reg = s["final"], s["final"]["cum_regret"]
    worse = sum(
        bool(r.get("gate_shipped_worse")) + bool(r.get("canary_shipped_worse")) for r in s["rounds"]
    )
    return {
        "served": f["served_over_oracle"],
        "greedy": f["greedy_over_oracle"],
        "regret": reg["genco"],
        **{p: reg["genco"] / reg[p] for p in PEERS if reg.get(p)},
        "worse": worse,
        "floor": f["floor_held_every_round"],
    }


def table(new, old, explore):
    cols = ["served", "greedy", "regret", *PEERS]
    for world in ("interactions", "per_product", "aes"):
        seeds = sorted(s for w, s in new if w == world)
        if not seeds:
            continue
        print(f"#### {world} (explore {explore}; in brackets loop17's 0.05, same seed)\n")
        print(
            "| seed | served / oracle | greedy / oracle | GenCO regret | / TS | / TS online "
            "| / VW | / VW online | / combo TS | shipped worse | floor |"
        )
        print("| --- " * 11 + "|")
        rows = []
        for s in seeds:
            a = figures(new[(world, s)])
            b = figures(old[(world, s)]) if (world, s) in old else {}
            rows.append((a, b))
            cells = []
            for c in cols:
                fmt = "{:.2f}"
                if c in ("served", "greedy", "regret"):
                    fmt = "{:.0f}" if c == "regret" else "{:.3f}"
                v = fmt.format(a[c]) if c in a else "-"
                if c in b:
                    v += " (" + fmt.format(b[c]) + ")"
                cells.append(v)
            print(f"| {s} | " + " | ".join(cells) + f" | {a['worse']} | {a['floor']} |")
        mean = []
        for c in cols:
            va = [a[c] for a, _ in rows if c in a]
            vb = [b[c] for _, b in rows if c in b]
            f = "{:.0f}" if c == "regret" else "{:.3f}"
            cell = f.format(np.mean(va)) if va else "-"
            if vb:
                cell += " (" + f.format(np.mean(vb)) + ")"
            if len(va) > 1:
                cell += f", min {np.min(va):.3f}" if c in ("served", "greedy") else ""
            mean.append(cell)
        print("| mean | " + " | ".join(mean) + " | | |\n")


def main():
    old = load(os.path.join(HERE, "..", "loop17"))
    for sub, explore in (("explore002", "0.02"), ("explore001", "0.01")):
        table(load(os.path.join(HERE, sub)), old, explore)
    ts = load(os.path.join(HERE, "thompson"))
    for (world, s), run in sorted(ts.items()):
        a = figures(run)
        print(
            f"thompson {world} seed {s}: "
            + ", ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in a.items()
            )
        )


if __name__ == "__main__":
    main()
