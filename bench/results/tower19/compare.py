"""Per-seed difference of GenCO's gap closed: a run of bench/quality.py (its stderr lines or
--out JSON) against the default's recorded runs (quality_three_way_test_2026-11-30.json).

    python bench/results/tower19/compare.py RUN_LOG_OR_JSON
"""

import json
import sys

import numpy as np

BASE = "bench/results/quality_three_way_test_2026-11-30.json"


def runs_of(path):
    with open(path) as f:
        text = f.read()
    try:
        d = json.loads(text)
        return [r for w in d["results"] for r in w["runs"]]
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.startswith('{"world"')]


base = {}
with open(BASE) as f:
    groups = list(json.load(f)["results"].values())[:2]  # the 2nd: this code's
for group in groups:
    for r in group:
        for y in r.get("runs", [r]):
            base[(y["world"], y["seed"])] = y
new = runs_of(sys.argv[1])
for world in dict.fromkeys(r["world"] for r in new):
    rows = [r for r in new if r["world"] == world]
    d, line = [], []
    for r in rows:
        b = base.get((world, r["seed"]))
        t = r["tuning"]
        g, g0 = r["gap_closed"]["genco"], b["gap_closed"]["genco"] if b else float("nan")
        d.append(g - g0)
        z = t.get("feature_tower_gain", np.nan) / t.get("feature_tower_gain_se", np.nan)
        att = (r.get("attribution") or {}).get("spearman_effect", np.nan)
        att0 = ((b or {}).get("attribution") or {}).get("spearman_effect", np.nan)
        line.append(
            f"  seed {r['seed']}: {g:.4f} vs {g0:.4f} ({g - g0:+.4f})"
            f" tower {t.get('feature_tower')}"
            f" z {z:.2f} three_way {t.get('three_way')} cpu {r['seconds']['reward_model_cpu']}"
            f" (was {(b or {}).get('seconds', {}).get('reward_model_cpu')}) spearman {att:.4f}"
            f" vs {att0:.4f}"
        )
    g = np.array([r["gap_closed"]["genco"] for r in rows])
    sd = g.std(ddof=1) if len(g) > 1 else 0.0
    print(f"{world}: mean {g.mean():.4f} sd {sd:.4f} min {g.min():.4f}; diff {np.mean(d):+.4f}")
    print("\n".join(line))
