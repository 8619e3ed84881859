"""The main job on the embedded default world: what ``make demo`` runs."""

from __future__ import annotations

from genco import storage
from genco.contract import load_catalog, load_constraints
from genco.ingest import ingest
from genco.simulate import simulate, world_summary


def run_demo(out_dir: str, seed: int = 0, progress: bool = True) -> dict:
    """Simulate the default world, validate its log, and return a summary of both."""
    data_dir = storage.join(out_dir, "data")
    sim = simulate("default", seed=seed, out_dir=data_dir)
    catalog = load_catalog(sim.catalog)
    constraints = load_constraints(sim.constraints, catalog)
    summary = ingest(
        sim.impressions, catalog, constraints, storage.join(out_dir, "ingest"), progress=progress
    )
    return {"world": world_summary(sim), "ingest": summary.to_dict()}
