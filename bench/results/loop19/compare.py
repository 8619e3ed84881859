"""BENCHMARKS.md "Closed loop" 2026-11-30 (loop19): the canary's triggered A/B (`triggered/`),
and with the L2 path's one-SE rule too (`l2rule/`: the defaults now), against loop18's plain
A/B (all at explore 0.02) on the same seeds; then each canary round's triggered share and
decision.

    python bench/results/loop19/compare.py [triggered | l2rule]
"""

import importlib.util
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
# loop18's reader and per-run figures, loaded from its file (results folders are no package)
_spec = importlib.util.spec_from_file_location(
    "loop18_compare", os.path.join(HERE, "..", "loop18", "compare.py")
)
loop18 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(loop18)
PEERS, load = loop18.PEERS, loop18.load


def figures(s):
    """loop18's figures plus the canaries run and promoted."""
    rounds = s["rounds"]
    return {
        **loop18.figures(s),
        "promoted": sum(bool(r.get("canary_promoted")) for r in rounds),
        "canaries": sum("canary_promoted" in r for r in rounds),
    }


def table(new, old, label, old_label):
    cols = ["served", "greedy", "regret", *PEERS]
    for world in ("interactions", "per_product", "aes"):
        seeds = sorted(s for w, s in new if w == world)
        if not seeds:
            continue
        print(f"#### {world} ({label}; in brackets {old_label}, same seed)\n")
        print(
            "| seed | served / oracle | greedy / oracle | GenCO regret | / TS | / TS online "
            "| / VW | / VW online | / combo TS | promoted / canaries | shipped worse | floor |"
        )
        print("| --- " * 12 + "|")
        rows = []
        for s in seeds:
            a = figures(new[(world, s)])
            b = figures(old[(world, s)]) if (world, s) in old else {}
            rows.append((a, b))
            cells = []
            for c in cols:
                fmt = (
                    "{:.0f}"
                    if c == "regret"
                    else "{:.3f}"
                    if c in ("served", "greedy")
                    else "{:.2f}"
                )
                v = fmt.format(a[c]) if c in a else "-"
                if c in b:
                    v += " (" + fmt.format(b[c]) + ")"
                cells.append(v)
            promo = f"{a['promoted']} / {a['canaries']}"
            if b:
                promo += f" ({b['promoted']} / {b['canaries']})"
            print(f"| {s} | " + " | ".join(cells) + f" | {promo} | {a['worse']} | {a['floor']} |")
        mean = []
        for c in cols:
            va = [a[c] for a, _ in rows if c in a]
            vb = [b[c] for _, b in rows if c in b]
            f = "{:.0f}" if c == "regret" else "{:.3f}"
            cell = f.format(np.mean(va)) if va else "-"
            if vb:
                cell += " (" + f.format(np.mean(vb)) + ")"
            if len(va) > 1 and c in ("served", "greedy"):
                cell += f", min {np.min(va):.3f}"
            mean.append(cell)
        print("| mean | " + " | ".join(mean) + " | | | |\n")


def canaries(new):
    """Per canary round: the triggered share and the decision, with both models' truth."""
    print(
        "| world | seed | round | triggered share | canary / production greedy (true) | decision |"
    )
    print("| --- " * 6 + "|")
    for (world, s), run in sorted(new.items()):
        for r in run["rounds"]:
            if "canary_promoted" not in r:
                continue
            truth = f"{r['canary_greedy_true_ctr'] / r['canary_vs_greedy_true_ctr']:.3f}"
            when = r.get("canary_promoted_at")
            what = (
                "promoted" + (f" at {when}" if when else "")
                if r["canary_promoted"]
                else "rolled back"
            )
            if r.get("canary_stopped_at"):
                what += f" (stopped at {r['canary_stopped_at']})"
            share = r.get("canary_triggered_share")
            share = "-" if share is None else f"{share:.2f}"
            print(f"| {world} | {s} | {r['round']} | {share} | {truth} | {what} |")


def main():
    which = sys.argv[1] if len(sys.argv) > 1 else "l2rule"
    new = load(os.path.join(HERE, which))
    old = load(os.path.join(HERE, "..", "loop18", "explore002"))
    label = {"triggered": "triggered A/B", "l2rule": "triggered A/B and the L2 one-SE rule"}
    table(new, old, label[which] + ", explore 0.02", "loop18's plain A/B")
    canaries(new)


if __name__ == "__main__":
    main()
