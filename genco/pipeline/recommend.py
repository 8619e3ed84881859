"""The ``batch-recommend`` pipeline's step and its local run and compilation
(``pipelines/batch_recommend.py``): the catalog's recommendations fanned out over ad shards
with KFP ``dsl.ParallelFor``, each shard one ``genco.inference.batch.write_recommendations``.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from genco.data import storage
from genco.errors import ConfigError


def shard_numbers(n_shards: int) -> list[int]:
    if n_shards < 1:
        raise ConfigError(f"n_shards must be >= 1, got {n_shards}")
    return list(range(n_shards))


def shard_file(out_dir: str, shard: int, n_shards: int) -> str:
    return storage.join(out_dir, f"shard-{shard:05d}-of-{n_shards:05d}.parquet")


def recommend_step(
    model: str,
    out_dir: str,
    shard: int,
    n_shards: int,
    top_k: int = 1,
    contexts: str | None = None,
    refine: str = "pairs",
) -> dict[str, Any]:
    """One shard: load the bundle, stream its ads' recommendations to ``shard_file``."""
    from genco.inference.batch import write_recommendations
    from genco.inference.predictor import Predictor

    predictor = Predictor.load(model)
    predictor.refine = refine
    frame = storage.read_table(contexts, dtype={"ad_id": str}) if contexts else None
    if not storage.is_remote(out_dir):
        os.makedirs(out_dir, exist_ok=True)
    out = shard_file(out_dir, shard, n_shards)
    s = write_recommendations(predictor, out, top_k, (shard, n_shards), frame)
    return {"out": out, "inputs": s.inputs, "ads": s.ads, "rows": s.rows, "seconds": s.seconds}


def _module() -> ModuleType:
    from genco.pipeline.runner import pipeline_module

    return pipeline_module("batch_recommend")


def compile_recommend(out_path: str, image: str | None = None, local: bool = False) -> str:
    """Write the batch-recommend pipeline's YAML (KFP IR); the image rule is
    ``genco.pipeline.runner.compile_pipeline``'s (one is required unless ``local``)."""
    from kfp import compiler

    from genco.pipeline.runner import _set_image, require_image

    image = require_image(image, local)
    compiler.Compiler().compile(_module().batch_recommend, package_path=out_path)
    if image is not None:
        _set_image(out_path, image)
    return out_path


@contextlib.contextmanager
def _process_output_kept() -> Iterator[None]:
    """``print`` and the root logger's handlers and level as they were before, whatever
    happens inside. kfp's local runner swaps them (an indenting ``builtins.print``, a stdout
    log handler at INFO) in contexts per task, and ParallelFor enters those contexts from
    concurrent threads: the one that exits last can restore another task's swap, and every
    later print of the process is indented, every log line lands on stdout."""
    root = logging.getLogger()
    handlers, level, print_ = root.handlers[:], root.level, builtins.print
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        builtins.print = print_


def run_recommend_local(
    model: str,
    out_dir: str,
    n_shards: int,
    top_k: int = 1,
    contexts: str = "",
    refine: str = "pairs",
    pipeline_root: str | None = None,
) -> int:
    """Run the pipeline with ``kfp.local.SubprocessRunner`` (its ``ParallelFor`` runs the
    shards as parallel subprocesses of this interpreter); returns the rows written."""
    from kfp import local

    shard_numbers(n_shards)
    root = os.path.abspath(pipeline_root or tempfile.mkdtemp(prefix="genco-recommend-"))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=root)
    with _process_output_kept(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        task = _module().batch_recommend(
            model=model,
            out_dir=out_dir,
            n_shards=n_shards,
            top_k=top_k,
            contexts=contexts,
            refine=refine,
        )
    return int(task.output)
