"""Distributed reward-model fitting with PyTorch DDP, one process per worker, under torchrun:

    torchrun --nproc-per-node 2 -m genco.training.distributed \\
        --catalog catalog.csv --impressions impressions.parquet --out MODEL_DIR

gloo on CPU, NCCL on GPU (``--device``; NCCL all-reduces dense gradients only, so there the
id tables train dense). Every process streams the log (``genco.training.stream_fit``) and
trains on its stride of rows; DDP averages the gradients, so all ranks hold the same model
and the global batch is ``--batch-size`` as in one process. Rank 0 writes the reward model
and ``reward_metrics.json`` (the training report) to ``--out``. On a cluster the same
command is what the Kubeflow TrainJob runs (``genco.pipeline.trainjob``); torchrun reads the
node count, rank and master address from the environment the Trainer sets.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import torch
import torch.distributed as dist

from genco.data import storage
from genco.data.contract import load_catalog
from genco.models.checkpoint import METRICS_FILE, save_reward_model
from genco.models.optim import resolve_device
from genco.models.reward import RewardModelConfig
from genco.training.stream_fit import (
    CHUNK_ROWS,
    SAMPLE_ROWS,
    SHUFFLE_ROWS,
    train_reward_model_stream,
)

# Flags: the RewardModelConfig fields a distributed run may set (defaults from the dataclass).
FIELDS = (
    "epochs", "batch_size", "lr", "seed", "device", "l2_id", "val_fraction", "residual_sd",
    "patience",
)  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m genco.training.distributed", description=__doc__)
    p.add_argument("--catalog", required=True)
    p.add_argument("--impressions", required=True, help="Parquet file or directory")
    p.add_argument("--out", required=True, help="where rank 0 writes the reward model")
    fields = {f.name: f for f in dataclasses.fields(RewardModelConfig)}
    for name in FIELDS:
        f = fields[name]
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=type(f.default),
            default=f.default,
            help=f.metadata.get("help", "").replace("%", "%%"),
        )
    p.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS)
    p.add_argument("--sample-rows", type=int, default=SAMPLE_ROWS)
    p.add_argument("--shuffle-rows", type=int, default=SHUFFLE_ROWS)
    return p


def run(args: argparse.Namespace) -> dict:
    """One worker's part of the job; returns the training report (every rank's is equal)."""
    config = RewardModelConfig(**{name: getattr(args, name) for name in FIELDS})
    device = resolve_device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        catalog = load_catalog(args.catalog)
        model, report = train_reward_model_stream(
            catalog,
            args.impressions,
            config,
            chunk_rows=args.chunk_rows,
            sample_rows=args.sample_rows,
            shuffle_rows=args.shuffle_rows,
            rank=rank,
            world=world,
        )
        metrics = {"train": dataclasses.asdict(report), "workers": world}
        if rank == 0:
            storage.makedirs(args.out)
            save_reward_model(model, args.out)
            storage.write_json(storage.join(args.out, METRICS_FILE), metrics)
        dist.barrier()
        return metrics
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
