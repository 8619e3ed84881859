"""Batch recommendation components: plan the shards, recommend one shard, count the rows."""

from kfp import dsl

from components.image import GENCO_IMAGE


@dsl.component(base_image=GENCO_IMAGE, install_kfp_package=False)
def plan_shards(n_shards: int) -> list[int]:
    """Shard numbers ``0 .. n_shards - 1`` for the fan-out (at least one)."""
    from genco.pipeline.recommend import shard_numbers

    return shard_numbers(n_shards)


@dsl.component(base_image=GENCO_IMAGE, install_kfp_package=False)
def recommend_shard(
    model: str,
    out_dir: str,
    shard: int,
    n_shards: int,
    top_k: int = 1,
    contexts: str = "",
    refine: str = "pairs",
) -> int:
    """Recommendations for shard ``shard`` of ``n_shards`` (contiguous blocks of the bundle's
    ads) from the bundle at ``model``, streamed to ``out_dir``/shard-<i>-of-<n>.parquet
    (local or gs://); ``contexts``: ad_id + ctx_* rows (default: every ad). Returns the rows
    written. A retry rewrites the same file."""
    from genco.pipeline.recommend import recommend_step

    return recommend_step(model, out_dir, shard, n_shards, top_k, contexts or None, refine)["rows"]


@dsl.component(base_image=GENCO_IMAGE, install_kfp_package=False)
def count_rows(rows: list[int]) -> int:
    """Total rows over the shards (the fan-in: runs after every shard succeeded)."""
    return int(sum(rows))
