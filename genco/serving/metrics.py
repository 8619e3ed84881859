"""The handler's own Prometheus metrics, through TorchServe's metrics API.

TorchServe hands each worker a metrics cache (``context.metrics``); a metric updated there is
one ``[METRICS]`` line on the worker's stdout, which the frontend turns into a Prometheus
series on its metrics port (``metrics_mode=prometheus``; ``model_metrics_auto_detect=true``
registers ours without a metrics file). Per batch:

* ``genco_requests`` (counter): requests by ``protocol`` (rest, v1, v2), ``mode`` (beam,
  sample, invalid) and HTTP ``status``; an envelope counts each of its items;
* ``genco_decode_latency_ms`` (histogram): parse, validate and decode of each answered
  request, by ``mode``;
* ``genco_table_cache`` (counter): lookups of the per-ad tables by ``result`` (hit, miss):
  a miss folds the models for an ad, the slow path of a request.

Lines are aggregated per batch where a counter allows it, so metrics cost a few log lines per
batch, not per request.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from genco.serving.kserve import Reply

REQUESTS = "genco_requests"
DECODE_MS = "genco_decode_latency_ms"
TABLE_CACHE = "genco_table_cache"


class HandlerMetrics:
    """The three metrics, registered once in a TorchServe metrics cache (``context.metrics``,
    a ``ts.metrics.metric_cache_yaml_impl.MetricsCacheYamlImpl``)."""

    def __init__(self, cache: Any, model_name: str) -> None:
        from ts.metrics.metric_type_enum import MetricTypes

        self.model_name = model_name
        self.requests = cache.add_metric_to_cache(
            REQUESTS, "count", ["ModelName", "protocol", "mode", "status"], MetricTypes.COUNTER
        )
        self.decode_ms = cache.add_metric_to_cache(
            DECODE_MS, "ms", ["ModelName", "mode"], MetricTypes.HISTOGRAM
        )
        self.table_cache = cache.add_metric_to_cache(
            TABLE_CACHE, "count", ["ModelName", "result"], MetricTypes.COUNTER
        )

    def record(self, replies: Sequence[Reply], hits: int, misses: int) -> None:
        """One batch: its requests' outcomes and the table-cache lookups it made."""
        counts: Counter[tuple[str, str, int]] = Counter()
        for reply in replies:
            for o in reply.outcomes:
                counts[(o.protocol, o.mode, o.status)] += 1
                if o.decode_ms is not None:
                    self.decode_ms.add_or_update(o.decode_ms, [self.model_name, o.mode])
        for (protocol, mode, status), n in counts.items():
            self.requests.add_or_update(n, [self.model_name, protocol, mode, str(status)])
        for result, n in (("hit", hits), ("miss", misses)):
            if n:
                self.table_cache.add_or_update(n, [self.model_name, result])
