"""``genco train``: validate, fit the reward model, train the generator: one bundle directory.

Bundle layout (every file written atomically; an existing ``manifest.json`` removed first and
the new one written last, naming each file's sha256, so a directory with a manifest is
complete, and every load checks the files against it):

    manifest.json            version, created_at, genco version, files and their sha256
    reward_model.{pt,json}   reward model (config + state_dict + vocabularies + sha256)
    generator.{pt,json}      generator (same form)
    catalog.csv, constraints.csv   the catalog and constraints the models were trained on
    element_attribution.csv, attributions.parquet, reward_metrics.json, generator_metrics.json
"""

from __future__ import annotations

import dataclasses
import hashlib
import time

import numpy as np
import pandas as pd

from genco import __version__
from genco.data import storage
from genco.data.contract import CLICK, Catalog, Constraints
from genco.data.ingest import IngestConfig, validated_inputs
from genco.models.checkpoint import (
    CATALOG,
    CONSTRAINTS,
    MANIFEST,
    load_generator,
    load_reward_model,
    save_generator,
    verify_bundle,
)
from genco.models.generator import Generator, GeneratorConfig, GeneratorReport, train_generator
from genco.models.reward import BoundModel, RewardModelConfig
from genco.models.vocab import Vocab, encode
from genco.training.attribution import fit_and_attribute


def write_manifest(out_dir: str, extra: dict | None = None, client=None) -> dict:
    files = {}
    for name in storage.listdir(out_dir, client=client):
        # Hidden names are atomic writes' temp files (``.x.tmp``), never part of a bundle.
        if name in (MANIFEST, "ingest") or name.endswith("/") or name.startswith("."):
            continue
        path = storage.join(out_dir, name)
        files[name] = hashlib.sha256(storage.read_bytes(path, client=client)).hexdigest()
    manifest = {
        "format": "genco.bundle/1",
        "genco_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
        **(extra or {}),
    }
    storage.write_json(storage.join(out_dir, MANIFEST), manifest, client=client)
    return manifest


def clicked_for_warm_start(enc) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """Clicked impressions weighted by 1/propensity: cloning them aims at high-CTR combos."""
    rows = np.flatnonzero(enc.click > 0)
    w = np.ones(len(rows)) if enc.propensity is None else 1.0 / enc.propensity[rows]
    ctx = enc.ctx[rows] if enc.ctx.shape[1] else None
    return enc.ads[rows], enc.combos[rows], ctx, w


def finish_bundle(
    catalog: Catalog,
    constraints: Constraints,
    impressions: pd.DataFrame,
    out_dir: str,
    generator_config: GeneratorConfig,
    init_gen: Generator | None = None,
    manifest_extra: dict | None = None,
    progress: bool = False,
    client=None,
) -> tuple[GeneratorReport, dict]:
    """Second half of a bundle: out_dir already holds the reward model; train the generator
    against it, write it, the catalog/constraints snapshot and, last, the manifest."""
    reward, _ = load_reward_model(out_dir, client=client)
    enc = encode(impressions, catalog, reward.vocab.context_columns)
    contexts = enc.ctx if enc.ctx.shape[1] else None
    clicked = clicked_for_warm_start(enc) if generator_config.warm_start_steps else None
    gen, report = train_generator(
        BoundModel(reward, catalog),
        catalog,
        constraints,
        contexts,
        generator_config,
        clicked=clicked,
        init=init_gen,
        progress=progress,
    )
    save_generator(gen, out_dir, client=client)
    storage.write_json(
        storage.join(out_dir, "generator_metrics.json"), dataclasses.asdict(report), client=client
    )
    storage.write_table(catalog.to_arrow(), storage.join(out_dir, CATALOG), client=client)
    storage.write_table(
        constraints.to_frame(catalog), storage.join(out_dir, CONSTRAINTS), client=client
    )
    manifest = write_manifest(
        out_dir,
        {
            **(manifest_extra or {}),
            "impressions": len(impressions),
            "clicks": int(impressions[CLICK].sum()),
        },
        client=client,
    )
    return report, manifest


def train_bundle(
    catalog: Catalog,
    constraints: Constraints,
    impressions: pd.DataFrame,
    out_dir: str,
    reward_config: RewardModelConfig | None = None,
    generator_config: GeneratorConfig | None = None,
    warm_start_dir: str | None = None,
    progress: bool = False,
    client=None,
) -> dict:
    """Fit reward model then generator on validated impressions; write a complete bundle.

    warm_start_dir: a previous bundle (e.g. production) whose weights initialise both models
    when its vocabulary matches this catalog; otherwise training starts fresh (reported).
    """
    generator_config = generator_config or GeneratorConfig()
    init_reward = init_gen = None
    warm = "none"
    if warm_start_dir and storage.exists(storage.join(warm_start_dir, MANIFEST), client=client):
        verify_bundle(warm_start_dir, client)
        prev_reward, _ = load_reward_model(warm_start_dir, client=client)
        prev_gen = load_generator(warm_start_dir, client=client)
        ctx_cols = tuple(c for c in impressions.columns if c.startswith("ctx_"))
        if prev_reward.vocab == Vocab.from_catalog(catalog, ctx_cols):
            init_reward, init_gen, warm = prev_reward, prev_gen, warm_start_dir
        else:
            warm = "skipped: vocabulary changed"
    storage.makedirs(out_dir)
    # Retraining over an existing bundle: its manifest goes first, so until the new one is
    # written last the directory reads as incomplete, never as the old version with some
    # new files (which verify_bundle would refuse anyway).
    old_manifest = storage.join(out_dir, MANIFEST)
    if storage.exists(old_manifest, client=client):
        storage.remove(old_manifest, client=client)
    reward_metrics = fit_and_attribute(
        catalog,
        impressions,
        out_dir,
        reward_config,
        init=init_reward,
        progress=progress,
        client=client,
        constraints=constraints,
    )
    report, manifest = finish_bundle(
        catalog,
        constraints,
        impressions,
        out_dir,
        generator_config,
        init_gen,
        {"warm_start": warm},
        progress,
        client,
    )
    return {
        "reward": reward_metrics,
        "generator": {
            "seconds": report.seconds,
            "final_reward": report.history[-1]["reward"] if report.history else None,
        },
        "manifest": manifest,
    }


def run_train(
    catalog_path: str,
    impressions_path: str,
    out_dir: str,
    constraints_path: str | None = None,
    reward_config: RewardModelConfig | None = None,
    generator_config: GeneratorConfig | None = None,
    ingest_config: IngestConfig | None = None,
    warm_start_dir: str | None = None,
    progress: bool = False,
    client=None,
) -> dict:
    """``genco train``: validate the log (into OUT/ingest), then ``train_bundle``."""
    catalog, constraints, summary, valid = validated_inputs(
        catalog_path,
        impressions_path,
        constraints_path,
        storage.join(out_dir, "ingest"),
        ingest_config,
        progress,
        client,
    )
    result = train_bundle(
        catalog,
        constraints,
        valid,
        out_dir,
        reward_config,
        generator_config,
        warm_start_dir,
        progress,
        client,
    )
    return {"ingest": summary.to_dict(), **result}
