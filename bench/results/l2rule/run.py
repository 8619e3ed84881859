"""GenCO alone (no baselines) on quality worlds at L2_PATH_Z = Z, one JSON line per run with
the L2 path's paired gains. From the repo root, on a snapshot of the commit under test:
    PYTHONPATH=. python bench/results/l2rule/run.py Z aes:500000:0 per_product_3way:500000:1 ...
"""

import json
import sys

sys.path.insert(0, "bench")
import quality

import genco.training.reward_fit as rf

rf.L2_PATH_Z = float(sys.argv[1])
for spec in sys.argv[2:]:
    name, n, seed = spec.split(":")
    r = quality.run_world(name, int(n), int(seed), False, baselines=False)
    t = r["tuning"]
    print(
        json.dumps(
            {
                "z": rf.L2_PATH_Z,
                "world": name,
                "n": int(n),
                "seed": int(seed),
                "gap": r["gap_closed"],
                "l2": t["l2_id"],
                "losses": t["l2_id_val_loss"],
                "gains": t.get("l2_id_gain"),
                "cpu": r["seconds"].get("reward_model_cpu"),
            }
        ),
        flush=True,
    )
