"""The ``batch-recommend`` pipeline (KFP v2): the catalog's recommendations, fanned out over
ad shards.

    plan_shards -> ParallelFor(shard: recommend_shard) -> count_rows (fan-in)

Each shard is a separate pod (one ``genco recommend --shard i/n``): it loads the bundle, builds
each of its ads' tables once and streams its own Parquet file, so adding shards adds
throughput linearly, with no coordination between them.
"""

from kfp import dsl

from components.recommend import count_rows, plan_shards, recommend_shard

PIPELINE_NAME = "genco-batch-recommend"
# Shards running at once; the rest wait for a slot (a cluster's quota, not the catalog, sets it).
PARALLELISM = 16


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Best combinations for every ad of the catalog, one task per ad shard.",
)
def batch_recommend(
    model: str,
    out_dir: str,
    n_shards: int = 8,
    top_k: int = 1,
    contexts: str = "",
    refine: str = "pairs",
) -> int:
    """Recommend for every ad of the bundle at ``model`` into ``out_dir`` (local or gs://),
    one Parquet file per shard; returns the rows written."""
    shards = plan_shards(n_shards=n_shards)
    shards.set_caching_options(False)
    with dsl.ParallelFor(shards.output, parallelism=PARALLELISM, name="ad-shards") as shard:
        task = recommend_shard(
            model=model,
            out_dir=out_dir,
            shard=shard,
            n_shards=n_shards,
            top_k=top_k,
            contexts=contexts,
            refine=refine,
        )
        task.set_caching_options(False)
        task.set_cpu_request("1").set_memory_request("2G").set_memory_limit("8G")
        task.set_retry(num_retries=2, backoff_duration="30s")
    total = count_rows(rows=dsl.Collected(task.output))
    total.set_caching_options(False)
    return total.output
