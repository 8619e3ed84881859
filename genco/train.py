"""``genco train``: validate, fit the reward model, train the generator: one bundle directory.

Bundle layout (every file written atomically; ``manifest.json`` last, naming each file's
sha256, so a directory with a manifest is complete):

    manifest.json            version, created_at, genco version, files and their sha256
    reward_model.{pt,json}   reward model (config + state_dict + vocabularies + sha256)
    generator.{pt,json}      generator (same form)
    catalog.csv, constraints.csv   the catalog and constraints the models were trained on
    element_attribution.csv, attributions.parquet, reward_metrics.json, generator_metrics.json
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import time

import numpy as np
import pandas as pd
import torch

from genco import __version__, storage
from genco.attribution import fit_and_attribute
from genco.bundle import BundleError, load_reward_model
from genco.contract import CLICK, Catalog, Constraints
from genco.generator import Generator, GeneratorConfig, GeneratorReport, train_generator
from genco.ingest import IngestConfig, validated_inputs
from genco.reward import BoundModel, RewardModelConfig, Vocab, encode

GEN_WEIGHTS = "generator.pt"
GEN_META = "generator.json"
GEN_FORMAT = "genco.generator/1"
MANIFEST = "manifest.json"
CATALOG = "catalog.csv"
CONSTRAINTS = "constraints.csv"


def save_generator(model: Generator, out_dir: str, extra: dict | None = None, client=None) -> None:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    data = buf.getvalue()
    storage.write_bytes(storage.join(out_dir, GEN_WEIGHTS), data, client=client)
    storage.write_json(
        storage.join(out_dir, GEN_META),
        {
            "format": GEN_FORMAT,
            "config": dataclasses.asdict(model.config),
            "vocab": model.vocab.to_dict(),
            "sha256": hashlib.sha256(data).hexdigest(),
            **(extra or {}),
        },
        client=client,
    )


def load_generator(model_dir: str, client=None) -> Generator:
    meta_path = storage.join(model_dir, GEN_META)
    try:
        meta = storage.read_json(meta_path, client=client)
        data = storage.read_bytes(storage.join(model_dir, GEN_WEIGHTS), client=client)
    except FileNotFoundError as exc:
        raise BundleError(f"{model_dir}: not a generator directory ({exc})") from exc
    if meta.get("format") != GEN_FORMAT:
        raise BundleError(f"{meta_path}: format '{meta.get('format')}' is not '{GEN_FORMAT}'")
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise BundleError(f"{model_dir}: {GEN_WEIGHTS} sha256 does not match the recorded one")
    model = Generator(Vocab.from_dict(meta["vocab"]), GeneratorConfig(**meta["config"]))
    model.load_state_dict(torch.load(io.BytesIO(data), weights_only=True))
    model.eval()
    return model


def write_manifest(out_dir: str, extra: dict | None = None, client=None) -> dict:
    files = {}
    for name in storage.listdir(out_dir, client=client):
        if name in (MANIFEST, "ingest") or name.endswith("/"):
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
    storage.write_table(catalog.to_frame(), storage.join(out_dir, CATALOG), client=client)
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
        prev_reward, _ = load_reward_model(warm_start_dir, client=client)
        prev_gen = load_generator(warm_start_dir, client=client)
        ctx_cols = tuple(c for c in impressions.columns if c.startswith("ctx_"))
        if prev_reward.vocab == Vocab.from_catalog(catalog, ctx_cols):
            init_reward, init_gen, warm = prev_reward, prev_gen, warm_start_dir
        else:
            warm = "skipped: vocabulary changed"
    storage.makedirs(out_dir)
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
