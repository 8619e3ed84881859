"""The main job on the embedded default world: what ``make demo`` runs.

simulate -> retraining pipeline on the local KFP runner (ingest, attribute rewards, train
generator, evaluate, gated deploy into a model store) -> serve the production bundle with a
local TorchServe -> one REST response. No cluster, no cloud.
"""

from __future__ import annotations

from genco.data import storage


def run_demo(out_dir: str, seed: int = 0, serve: bool = True, verbose: bool = False) -> dict:
    """Run the whole loop under out_dir and return what happened at each stage; ``verbose``
    shows the local runner's whole log on stderr (default: one line per task)."""
    from genco.pipeline.runner import LOCAL_RL_STEPS, local_demo
    from genco.store import current

    result: dict = {
        "pipeline": local_demo(out_dir, {"rl_steps": LOCAL_RL_STEPS}, seed=seed, verbose=verbose)
    }
    store = storage.join(out_dir, "model_store")
    production = current(store)
    if serve and production:
        from genco.serving.torchserve import serve as start_torchserve

        handle = start_torchserve(production)
        try:
            result["serving"] = {
                "predictions_url": handle.predictions_url(),
                "key_file": handle.key_file,
                "version": handle.version,
                "request": handle.sample_request,
                "response": handle.sample_response,
            }
        finally:
            handle.stop()
    return result
