"""Prometheus metrics with Triton Inference Server's names and labels (``model``, ``version``), plus ours.

Triton's (counters without a ``_total`` suffix, as Triton writes them, so existing dashboards work):
``nv_inference_request_success`` / ``_failure`` (inference requests to the model, over HTTP and gRPC; a
request for an unknown model is not counted), ``nv_inference_count`` (batch rows inferred),
``nv_inference_exec_count`` (model executions: batches), ``nv_inference_pending_request_count`` (gauge: steps
queued), and cumulative microseconds ``nv_inference_request_duration_us`` (successful requests, arrival to
response), ``nv_inference_queue_duration_us`` (queued to batch start), ``nv_inference_compute_input_duration_us``
(decoding and checks), ``nv_inference_compute_infer_duration_us`` (each request's batch run) and
``nv_inference_compute_output_duration_us`` (encoding the response).

Ours: ``rnndeploy_live_sequences``, ``rnndeploy_sequences_started_total`` / ``_ended_total`` /
``_evicted_total``, ``rnndeploy_batch_size`` (histogram of steps per batch) and
``rnndeploy_rejected_requests_total{limit=...}`` (refused by a :class:`~rnndeploy.server.protocol.Limits`
field). Values are read from the server's counters when the page is scraped.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class RequestStats:
    """Per-request counts and durations (seconds), recorded by the HTTP and gRPC front ends."""

    def __init__(self) -> None:
        self.success = self.failure = 0
        self.request_s = self.input_s = self.output_s = 0.0
        self.rejected: dict[str, int] = {}

    def succeeded(self, request_s: float, input_s: float, output_s: float) -> None:
        self.success += 1
        self.request_s += request_s
        self.input_s += input_s
        self.output_s += output_s

    def failed(self, limit: str | None = None) -> None:
        self.failure += 1
        if limit is not None:
            self.rejected[limit] = self.rejected.get(limit, 0) + 1


def _counter(name: str, documentation: str, labels: dict, value: float) -> Metric:
    """A counter sampled under its own name (Triton's style: no ``_total``)."""
    family = Metric(name, documentation, "counter")
    family.add_sample(name, labels, value)
    return family


class _Collector:
    def __init__(self, server) -> None:
        self.server = server

    def collect(self):
        server, batcher = self.server, self.server.batcher
        stats: RequestStats = server.stats
        labels = {"model": server.model_name, "version": server.model_version}
        us = 1e6
        yield _counter("nv_inference_request_success", "Successful inference requests", labels, stats.success)
        yield _counter("nv_inference_request_failure", "Failed inference requests", labels, stats.failure)
        yield _counter("nv_inference_count", "Inferences performed (batch rows)", labels, batcher.rows_run)
        yield _counter("nv_inference_exec_count", "Model executions (batches)", labels, batcher.batches_run)
        pending = GaugeMetricFamily(
            "nv_inference_pending_request_count", "Requests queued, not executing yet", labels=list(labels)
        )
        pending.add_metric(list(labels.values()), batcher.pending)
        yield pending
        for name, documentation, seconds in (
            ("request", "Cumulative duration of successful requests (us)", stats.request_s),
            ("queue", "Cumulative time requests waited in the queue (us)", batcher.queue_s),
            ("compute_input", "Cumulative input decoding and checking time (us)", stats.input_s),
            ("compute_infer", "Cumulative model run time of each request's batch (us)", batcher.compute_s),
            ("compute_output", "Cumulative output encoding time (us)", stats.output_s),
        ):
            yield _counter(f"nv_inference_{name}_duration_us", documentation, labels, int(seconds * us))
        live = GaugeMetricFamily("rnndeploy_live_sequences", "Live sequences", labels=list(labels))
        live.add_metric(list(labels.values()), len(batcher.live))
        yield live
        for what, value in (
            ("started", batcher.started),
            ("ended", batcher.ended),
            ("evicted", batcher.evicted),
        ):
            family = CounterMetricFamily(
                f"rnndeploy_sequences_{what}", f"Sequences {what}", labels=list(labels)
            )
            family.add_metric(list(labels.values()), value)
            yield family
        buckets, total, count = [], 0, 0
        for bound in BATCH_BUCKETS:
            count = sum(n for size, n in batcher.batch_sizes.items() if size <= bound)
            buckets.append((str(bound), count))
        count = sum(batcher.batch_sizes.values())
        total = sum(size * n for size, n in batcher.batch_sizes.items())
        buckets.append(("+Inf", count))
        histogram = HistogramMetricFamily("rnndeploy_batch_size", "Steps per batch", labels=list(labels))
        histogram.add_metric(list(labels.values()), buckets, total)
        yield histogram
        rejected = CounterMetricFamily(
            "rnndeploy_rejected_requests", "Requests refused by a limit", labels=[*labels, "limit"]
        )
        for limit, value in sorted(stats.rejected.items()):
            rejected.add_metric([*labels.values(), limit], value)
        yield rejected


def registry_for(server) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one) holding ``server``'s metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(server))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
