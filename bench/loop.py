"""The closed loop against its targets, over worlds and seeds. Prints JSON.

Each run is ``genco loop`` (``genco.pipeline.loop.run_loop``): round 0 uniform, then the real
retraining pipeline (KFP local runner) and gate every round, production served with its
exploration, peers (per-element Thompson sampling, VW SquareCB, uniform) on the same
requests. Targets (issue 12), checked per run and summarised per world:

  served_within_5pct   the last round's served true CTR (exploration included) >= 0.95 x oracle
  regret_vs_ts         GenCO's cumulative regret <= 0.5 x per-element Thompson sampling's
  regret_vs_vw         GenCO's cumulative regret <= 0.8 x VW's
  floor                the exploration floor held in every round
  gate                 no deploy (offline gate or canary promotion) whose true greedy CTR is
                       below production's by > tolerance

    python bench/loop.py --worlds interactions per_product aes --seeds 0 1 2 \\
        --rounds 5 --impressions 100000 --out bench/results/loop
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from genco.pipeline.loop import LoopConfig, run_loop


def targets(final: dict, rounds: list[dict]) -> dict:
    reg = final["cum_regret"]
    out = {
        "served_over_oracle": final["served_over_oracle"],
        "greedy_over_oracle": final["greedy_over_oracle"],
        "served_within_5pct": final["served_over_oracle"] >= 0.95,
        "floor": final["floor_held_every_round"],
        "gate_shipped_worse": final["gate_shipped_worse"],
        "canary_shipped_worse": final.get("canary_shipped_worse", 0),
        "gate": final["gate_shipped_worse"] + final.get("canary_shipped_worse", 0) == 0,
        "deploys": final["deploys"],
        "canaries": final.get("canaries", 0),
        "canary_promotions": final.get("canary_promotions", 0),
    }
    for peer, bound, key in (
        ("element_ts", 0.5, "regret_vs_ts"),
        ("element_ts_online", 0.5, "regret_vs_ts_online"),
        ("vw_squarecb", 0.8, "regret_vs_vw"),
        ("vw_squarecb_online", 0.8, "regret_vs_vw_online"),
        ("combo_ts", None, "regret_vs_combo_ts"),  # a reference, no target
        ("combo_ts_online", None, "regret_vs_combo_ts_online"),
    ):
        if peer in reg and reg[peer] > 0:
            out[f"{key}_ratio"] = reg["genco"] / reg[peer]
            if bound is not None:
                out[key] = out[f"{key}_ratio"] <= bound
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", nargs="+", default=["interactions", "per_product", "aes"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--impressions", type=int, default=100_000)
    p.add_argument("--explore", type=float, default=LoopConfig.explore)
    p.add_argument("--rl-steps", type=int, default=LoopConfig.rl_steps)
    p.add_argument("--reward-epochs", type=int, default=LoopConfig.reward_epochs)
    p.add_argument("--canary", type=float, default=LoopConfig.canary)
    p.add_argument("--warmup", type=int, default=LoopConfig.warmup)
    p.add_argument("--canary-checks", type=int, default=LoopConfig.canary_checks)
    p.add_argument("--canary-ab", choices=("triggered", "all"), default=LoopConfig.canary_ab)
    p.add_argument(
        "--thompson",
        action=argparse.BooleanOptionalAction,
        default=LoopConfig.thompson,
        help="serve the reward model's posterior draws (LoopConfig.thompson)",
    )
    p.add_argument("--out", default="bench/results/loop")
    p.add_argument(
        "--summarize", action="store_true", help="only summarise OUT/runs.jsonl (runs so far)"
    )
    args = p.parse_args(argv)
    if args.summarize:
        with open(os.path.join(args.out, "runs.jsonl")) as f:
            return summarize([json.loads(line) for line in f], args)
    runs = []
    os.makedirs(args.out, exist_ok=True)
    for seed in args.seeds:  # seed-major: a cut-short grid still covers every world
        for world in args.worlds:
            cfg = LoopConfig(
                world=world,
                rounds=args.rounds,
                impressions_per_round=args.impressions,
                seed=seed,
                explore=args.explore,
                rl_steps=args.rl_steps,
                reward_epochs=args.reward_epochs,
                canary=args.canary,
                warmup=args.warmup,
                canary_checks=args.canary_checks,
                canary_ab=args.canary_ab,
                thompson=args.thompson,
            )
            t0 = time.perf_counter()
            out_dir = os.path.join(args.out, f"{world}_s{seed}")
            summary = run_loop(out_dir, cfg, progress=lambda m: print(m, file=sys.stderr))
            run = {
                "world": world,
                "seed": seed,
                "seconds": round(time.perf_counter() - t0, 1),
                "out": out_dir,
                **targets(summary["final"], summary["rounds"]),
                "per_round": [
                    {
                        k: r.get(k)
                        for k in (
                            "round",
                            "served_true_ctr",
                            "greedy_true_ctr",
                            "oracle_true_ctr",
                            "genco_cum_regret",
                            "element_ts_cum_regret",
                            "element_ts_online_cum_regret",
                            "vw_squarecb_cum_regret",
                            "vw_squarecb_online_cum_regret",
                            "uniform_cum_regret",
                            "combo_ts_cum_regret",
                            "combo_ts_online_cum_regret",
                            "gate_passed",
                            "deployed",
                            "gate_reason",
                            "candidate_greedy_true_ctr",
                            "production_greedy_true_ctr",
                            "gate_shipped_worse",
                            "canary_version",
                            "canary_true_ctr",
                            "canary_promoted",
                            "canary_reason",
                            "canary_greedy_true_ctr",
                            "canary_vs_greedy_true_ctr",
                            "canary_shipped_worse",
                            "canary_stopped_at",
                            "warmup_impressions",
                            "warmup_candidate_greedy_true_ctr",
                            "floor_ratio_min",
                        )
                    }
                    for r in summary["rounds"]
                ],
            }
            runs.append(run)
            with open(os.path.join(args.out, "runs.jsonl"), "a") as f:
                f.write(json.dumps(run) + "\n")
            print(json.dumps({k: v for k, v in run.items() if k != "per_round"}), file=sys.stderr)
    return summarize(runs, args)


def summarize(runs: list[dict], args: argparse.Namespace) -> dict:
    by_world = {}
    for world in dict.fromkeys(r["world"] for r in runs):
        rs = [r for r in runs if r["world"] == world]
        agg = {"seeds": [r["seed"] for r in rs]}
        for key in (
            "served_over_oracle",
            "greedy_over_oracle",
            "regret_vs_ts_ratio",
            "regret_vs_ts_online_ratio",
            "regret_vs_vw_ratio",
            "regret_vs_vw_online_ratio",
            "regret_vs_combo_ts_ratio",
            "regret_vs_combo_ts_online_ratio",
        ):
            vals = [r[key] for r in rs if r.get(key) is not None]
            if vals:
                agg[key] = {
                    "mean": float(np.mean(vals)),
                    "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                    "min": float(np.min(vals)),
                    "max": float(np.max(vals)),
                }
        for key in (
            "served_within_5pct", "regret_vs_ts", "regret_vs_ts_online", "regret_vs_vw",
            "regret_vs_vw_online", "floor", "gate",
        ):  # fmt: skip
            agg[key] = f"{sum(bool(r.get(key)) for r in rs)}/{len(rs)} seeds"
        by_world[world] = agg
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
        "args": vars(args),
        "by_world": by_world,
        "runs": runs,
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
