"""What a TorchServe worker loads: importing the handler pulls in no training-side code.

import-linter (``make lint``) checks the static import graph; this checks the running process,
which also catches imports done at module level through a third-party package.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LOAD_HANDLER = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("genco_handler", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
assert module.GencoHandler
print(json.dumps(sorted(sys.modules)))
"""

FORBIDDEN_PREFIXES = (
    "genco.training",
    "genco.worlds",
    "genco.data.ingest",
    "genco.pipeline",
    "genco.evaluation",
    "tqdm",
)


LOAD_TORCH = "import json, sys, torch; print(json.dumps(sorted(sys.modules)))"


def _modules(*args: str) -> set[str]:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_serving_handler_loads_no_training_code():
    modules = _modules("-c", LOAD_HANDLER, str(ROOT / "serving" / "handler.py"))
    assert "genco.inference.predictor" in modules  # the handler did load the serving path
    assert "genco.models.checkpoint" in modules
    # torch itself imports tqdm (through torch.hub): only what genco adds on top counts.
    added = modules - _modules("-c", LOAD_TORCH)
    bad = sorted(m for m in added if m.startswith(FORBIDDEN_PREFIXES) or "attribution" in m)
    assert bad == []
    genco_loaded = {m for m in modules if m.startswith("genco")}
    assert not any(m.startswith(FORBIDDEN_PREFIXES) for m in genco_loaded)
