"""Prometheus metrics for the mount daemon and the node server (`--metrics HOST:PORT`).

Counters that live in the read path are prometheus_client objects updated where the
event happens (fetch latency, per-node errors); everything else is read from the
daemon's or server's own counters at scrape time by a collector, so there is one
source of truth for each number.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily

from .errors import UsageError

FETCH_SECONDS = Histogram("shardfs_fetch_seconds", "Time to fetch, decode and verify one chunk from a node",
                          ["node"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
NODE_ERRORS = Counter("shardfs_node_errors_total", "Failed chunk requests (error, timeout or corrupt copy) by node",
                      ["node"])
NODE_REQUESTS = Counter("shardfs_node_requests_total", "Requests answered by this node server",
                        ["method", "status"])
NODE_BYTES_SENT = Counter("shardfs_node_bytes_sent_total", "Chunk bytes sent by this node server")


class _Collector:
    def __init__(self, fn):
        self.fn = fn

    def collect(self):
        yield from self.fn()


def daemon_metrics(daemon):
    r, c, p = daemon.reader, daemon.cache, daemon.pool
    for name, doc, value in (
            ("shardfs_bytes_served", "Bytes returned to readers by the mount", r.bytes_served),
            ("shardfs_bytes_pushed", "Bytes put into the kernel's page cache ahead of reads", r.bytes_pushed),
            ("shardfs_chunks_fetched", "Chunks fetched from nodes", r.fetched),
            ("shardfs_cache_hits", "Disk cache hits", c.hits),
            ("shardfs_cache_misses", "Disk cache misses", c.misses),
            ("shardfs_cache_evictions", "Chunks evicted from the disk cache", c.evictions),
            ("shardfs_cache_damaged_entries", "Cache entries dropped because their hash did not match", c.corrupt),
            ("shardfs_failovers", "Reads that went on to another replica", p.failovers),
            ("shardfs_hedged_requests", "Slow replicas raced by a request to the next one", p.hedges),
            ("shardfs_corrupt_copies", "Chunk copies on nodes that failed verification", p.corrupt_copies)):
        yield CounterMetricFamily(name, doc, value=value)
    yield GaugeMetricFamily("shardfs_cache_bytes", "Bytes in the disk cache", value=c.used)
    yield GaugeMetricFamily("shardfs_cache_limit_bytes", "Disk cache bound", value=c.limit)
    yield GaugeMetricFamily("shardfs_memory_buffer_bytes", "Bytes in the in-memory chunk buffer", value=r.mem.used)
    yield GaugeMetricFamily("shardfs_index_up", "1 if the Redis index answered the last poll", value=int(daemon.redis_ok))


def node_metrics(server):
    yield GaugeMetricFamily("shardfs_node_used_bytes", "Bytes of chunks held", value=server.used)
    yield GaugeMetricFamily("shardfs_node_chunks", "Chunks held", value=server.chunks)


def serve_metrics(listen: str, collect) -> None:
    """Expose the default registry plus `collect()` on HOST:PORT/metrics, from a thread."""
    from .nodeserver import parse_listen
    host, port = parse_listen(listen, "--metrics")
    REGISTRY.register(_Collector(collect))
    try:
        start_http_server(port, addr=host)
    except (OSError, OverflowError) as e:
        raise UsageError(f"cannot serve metrics on {listen}: {getattr(e, 'strerror', None) or e}") from None
