"""The handler's own Prometheus metrics, through TorchServe's metrics API.

TorchServe hands each worker a metrics cache (``context.metrics``); a metric updated there is
one ``[METRICS]`` line on the worker's stdout, which the frontend turns into a Prometheus
series on its metrics port (``metrics_mode=prometheus``; ``model_metrics_auto_detect=true``
registers ours without a metrics file). All counters:

* ``genco_requests``: requests by ``protocol`` (rest, v1, v2), ``mode`` (beam, sample,
  invalid) and HTTP ``status``; an envelope counts each of its items;
* ``genco_decode_latency_ms_bucket`` (``le``), ``_sum``, ``_count``, by ``mode``: parse,
  validate and decode of each answered request, as a Prometheus histogram's series
  (``histogram_quantile(0.99, rate(genco_decode_latency_ms_bucket[5m]))``);
* ``genco_table_cache``: lookups of the per-ad tables by ``result`` (hit, miss): a miss folds
  the models for an ad, the slow path of a request.

Each line is a write to a pipe the frontend must read and parse: one line per request and
metric cost more than the model itself (bench/serving.py: 5 lines per request took ~1.4 ms
of the worker's time on a busy 2-core box). So requests only add to counts in memory, and
``flush`` writes what changed, at most once per ``FLUSH_S`` (from the next batch, or from a
daemon thread when the worker is idle): a few lines per second whatever the request rate.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from genco.serving.kserve import Reply

REQUESTS = "genco_requests"
DECODE_MS = "genco_decode_latency_ms"
TABLE_CACHE = "genco_table_cache"
BUCKETS_MS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0)  # upper bounds; +Inf last
FLUSH_S = 1.0


class HandlerMetrics:
    """Counts kept in memory and written to a TorchServe metrics cache (``context.metrics``,
    a ``ts.metrics.metric_cache_yaml_impl.MetricsCacheYamlImpl``) by ``flush``.

    background: flush from a daemon thread every ``interval_s`` too, so counts of the last
    batch before an idle spell reach the scrape (the worker's own handler does; tests call
    ``flush`` themselves).
    """

    def __init__(
        self, cache: Any, model_name: str, interval_s: float = FLUSH_S, background: bool = False
    ) -> None:
        from ts.metrics.metric_type_enum import MetricTypes

        def counter(name: str, unit: str, dims: list[str]) -> Any:
            return cache.add_metric_to_cache(name, unit, ["ModelName", *dims], MetricTypes.COUNTER)

        self.model_name = model_name
        self.interval_s = interval_s
        self._requests = counter(REQUESTS, "count", ["protocol", "mode", "status"])
        self._bucket = counter(f"{DECODE_MS}_bucket", "count", ["mode", "le"])
        self._sum = counter(f"{DECODE_MS}_sum", "ms", ["mode"])
        self._count = counter(f"{DECODE_MS}_count", "count", ["mode"])
        self._cache = counter(TABLE_CACHE, "count", ["result"])
        self._lock = threading.Lock()
        self._pending: Counter[tuple[str, tuple[str, ...]]] = Counter()
        self._sums: Counter[str] = Counter()
        self._last = time.monotonic()
        if background:
            threading.Thread(target=self._loop, name="genco-metrics", daemon=True).start()

    def record(self, replies: Sequence[Reply], hits: int, misses: int) -> None:
        """Add one batch: its requests' outcomes and the table-cache lookups it made; flush
        if the last flush is ``interval_s`` old."""
        with self._lock:
            pending = self._pending
            for reply in replies:
                for o in reply.outcomes:
                    pending[("requests", (o.protocol, o.mode, str(o.status)))] += 1
                    if o.decode_ms is not None:
                        first = bisect.bisect_left(BUCKETS_MS, o.decode_ms)
                        for le in (*BUCKETS_MS[first:], None):  # cumulative, as Prometheus's
                            pending[("bucket", (o.mode, "+Inf" if le is None else f"{le:g}"))] += 1
                        pending[("count", (o.mode,))] += 1
                        self._sums[o.mode] += o.decode_ms
            if hits:
                pending[("cache", ("hit",))] += hits
            if misses:
                pending[("cache", ("miss",))] += misses
        if time.monotonic() - self._last >= self.interval_s:
            self.flush()

    def flush(self) -> int:
        """Write every count that changed since the last flush; the number of lines."""
        with self._lock:
            pending, self._pending = self._pending, Counter()
            sums, self._sums = self._sums, Counter()
            self._last = time.monotonic()
        metrics = {
            "requests": self._requests,
            "bucket": self._bucket,
            "count": self._count,
            "cache": self._cache,
        }
        for (kind, labels), n in pending.items():
            metrics[kind].add_or_update(n, [self.model_name, *labels])
        for mode, total in sums.items():
            self._sum.add_or_update(round(total, 6), [self.model_name, mode])
        return len(pending) + len(sums)

    def _loop(self) -> None:
        while True:
            time.sleep(self.interval_s)
            if time.monotonic() - self._last >= self.interval_s:
                self.flush()


def _not_per_batch(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Backend received inference at")


def quiet_worker_log() -> None:
    """Drop the line TorchServe's worker logs on its root logger for every batch ("Backend
    received inference at"): a pipe write and a frontend parse per batch that tell nothing
    the metrics do not. Idempotent."""
    root = logging.getLogger()
    if _not_per_batch not in root.filters:
        root.addFilter(_not_per_batch)
