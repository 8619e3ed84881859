"""The L2 rule's AES learning curve (z1_aes_curve.jsonl) against the references in
BENCHMARKS.md (quality_aes_500k_30seeds.json, quality_curve_aes.json: older code, every
method), and the same code at z = 0 (z0_*.jsonl). python bench/results/l2rule/aes_compare.py"""

import collections
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def lines(name):
    with open(os.path.join(HERE, name)) as f:
        return [json.loads(line) for line in f]


def walk(o):
    if isinstance(o, dict):
        if "gap_closed" in o and "seed" in o and "impressions" in o:
            yield o
        for v in o.values():
            yield from walk(v)
    elif isinstance(o, list):
        for v in o:
            yield from walk(v)


def main():
    new, z0 = collections.defaultdict(dict), collections.defaultdict(dict)
    for r in lines("z1_aes_curve.jsonl"):
        if r["world"] == "aes":
            new[r["n"]][r["seed"]] = r
    for r in lines("z0_aes_500k.jsonl") + lines("z0_aes_50k_200k.jsonl"):
        z0[r["n"]][r["seed"]] = r
    with open(os.path.join(HERE, "..", "quality_aes_500k_30seeds.json")) as f:
        old = {500_000: {r["seed"]: r for r in json.load(f)["runs"]}}
    with open(os.path.join(HERE, "..", "quality_curve_aes.json")) as f:
        for r in walk(json.load(f)):
            old.setdefault(r["impressions"], {}).setdefault(r["seed"], r)
    for n, runs in sorted(new.items()):
        seeds = sorted(runs)
        g = np.array([runs[s]["gap"]["genco"] for s in seeds])
        ref = old.get(n, {})
        base = {
            m: np.mean([ref[s]["gap_closed"][m] for s in seeds])
            for m in ("empirical", "per_element", "fm", "vw")
            if all(m in ref[s]["gap_closed"] for s in seeds)
        }
        sd = g.std(ddof=1)
        out = f"aes {n}: {len(seeds)} seeds, rule {g.mean():.3f} / {sd:.3f} / {g.min():.3f}"
        out += f"; reference genco {np.mean([ref[s]['gap_closed']['genco'] for s in seeds]):.3f}"
        if set(seeds) <= set(z0.get(n, {})):
            d = g - np.array([z0[n][s]["gap"]["genco"] for s in seeds])
            out += f"; same code at z=0 {np.mean(g - d):.3f}, paired {d.mean():+.3f}"
            se, changed = d.std(ddof=1) / np.sqrt(len(d)), int((np.abs(d) > 1e-9).sum())
            out += f" +- {se:.3f} ({changed} changed)"
        print(out + "; baselines " + " ".join(f"{k} {v:.3f}" for k, v in base.items()))


if __name__ == "__main__":
    main()
