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
``rnndeploy_rejected_requests_total{limit=...}`` (refused by a `Limits`
field). Values are read from the server's counters when the page is scraped.
"""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

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

    def request(self) -> RequestTiming:
        """Times one inference request of a front end (HTTP or gRPC) and counts it when it ends::

            with core.stats.request() as timing:
                ...read the request...
                timing.input()  # decoding starts (optional: default, at arrival)
                ...decode it...
                timing.decoded()
                outputs = await core.infer(decoded)
                timing.inferred()
                ...encode the response...

        A `RequestError` counts as a failure (and as a rejection by its
        ``limit``), any other exception as a failure; both propagate. A cancelled request counts as
        neither."""
        return RequestTiming(self)


class RequestTiming:
    """The clock marks of one request (see `RequestStats.request`)."""

    __slots__ = ("stats", "began", "input_began", "decoded_at", "inferred_at")

    def __init__(self, stats: RequestStats) -> None:
        self.stats = stats

    def __enter__(self) -> RequestTiming:
        self.began = self.input_began = time.perf_counter()
        return self

    def input(self) -> None:
        self.input_began = time.perf_counter()

    def decoded(self) -> None:
        self.decoded_at = time.perf_counter()

    def inferred(self) -> None:
        self.inferred_at = time.perf_counter()

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            done = time.perf_counter()
            self.stats.succeeded(
                done - self.began, self.decoded_at - self.input_began, done - self.inferred_at
            )
        elif issubclass(kind, Exception):  # a cancelled request (the client went away) is neither
            self.stats.failed(getattr(error, "limit", None))


def _counter(name: str, documentation: str) -> Metric:
    """A counter whose ``# TYPE`` line and samples carry one name, ``name`` (Triton's ``nv_*`` have no
    ``_total``; ours end in ``_total``)."""
    return Metric(name, documentation, "counter")


class _Collector:
    """The metrics of one or more servers (a model repository: one per model version), labelled by each."""

    def __init__(self, servers) -> None:
        self.servers = servers

    def collect(self):
        names = ["model", "version"]
        counters = {
            name: _counter(name, documentation)
            for name, documentation in (
                ("nv_inference_request_success", "Successful inference requests"),
                ("nv_inference_request_failure", "Failed inference requests"),
                ("nv_inference_count", "Inferences performed (batch rows)"),
                ("nv_inference_exec_count", "Model executions (batches)"),
                ("nv_inference_request_duration_us", "Cumulative duration of successful requests (us)"),
                ("nv_inference_queue_duration_us", "Cumulative time requests waited in the queue (us)"),
                (
                    "nv_inference_compute_input_duration_us",
                    "Cumulative input decoding and checking time (us)",
                ),
                (
                    "nv_inference_compute_infer_duration_us",
                    "Cumulative model run time of each request's batch (us)",
                ),
                ("nv_inference_compute_output_duration_us", "Cumulative output encoding time (us)"),
            )
        }
        pending = GaugeMetricFamily(
            "nv_inference_pending_request_count", "Requests queued, not executing yet", labels=names
        )
        live = GaugeMetricFamily("rnndeploy_live_sequences", "Live sequences", labels=names)
        sequences = {
            what: _counter(f"rnndeploy_sequences_{what}_total", f"Sequences {what}")
            for what in ("started", "ended", "evicted")
        }
        histogram = HistogramMetricFamily("rnndeploy_batch_size", "Steps per batch", labels=names)
        rejected = _counter("rnndeploy_rejected_requests_total", "Requests refused by a limit")
        us = 1e6
        for server in self.servers:
            batcher, stats = server.batcher, server.stats
            values = [server.model_name, server.model_version]
            labels = dict(zip(names, values))
            for name, value in (
                ("nv_inference_request_success", stats.success),
                ("nv_inference_request_failure", stats.failure),
                ("nv_inference_count", batcher.rows_run),
                ("nv_inference_exec_count", batcher.batches_run),
                ("nv_inference_request_duration_us", int(stats.request_s * us)),
                ("nv_inference_queue_duration_us", int(batcher.queue_s * us)),
                ("nv_inference_compute_input_duration_us", int(stats.input_s * us)),
                ("nv_inference_compute_infer_duration_us", int(batcher.compute_s * us)),
                ("nv_inference_compute_output_duration_us", int(stats.output_s * us)),
            ):
                counters[name].add_sample(name, labels, value)
            pending.add_metric(values, batcher.pending)
            live.add_metric(values, len(batcher.live))
            for what, value in (
                ("started", batcher.started),
                ("ended", batcher.ended),
                ("evicted", batcher.evicted),
            ):
                sequences[what].add_sample(sequences[what].name, labels, value)
            buckets = []
            for bound in BATCH_BUCKETS:
                buckets.append(
                    (str(bound), sum(n for size, n in batcher.batch_sizes.items() if size <= bound))
                )
            buckets.append(("+Inf", sum(batcher.batch_sizes.values())))
            total = sum(size * n for size, n in batcher.batch_sizes.items())
            histogram.add_metric(values, buckets, total)
            for limit, value in sorted(stats.rejected.items()):
                rejected.add_sample(rejected.name, {**labels, "limit": limit}, value)
        order = ["nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
                 "nv_inference_exec_count"]  # fmt: skip
        yield from (counters[name] for name in order)
        yield pending
        yield from (counters[name] for name in counters if name not in order)
        yield live
        yield from sequences.values()
        yield histogram
        yield rejected


def start_metrics_server(registry: CollectorRegistry, host: str, port: int) -> ThreadingHTTPServer:
    """``/metrics`` of ``registry`` on a port of its own, served from a daemon thread; ``shutdown()`` stops it."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = render(registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            """Scrapes are not logged (the HTTP port's access log is off by default too)."""

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        daemon_threads = True

    server = Server((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def registry_for(*servers) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one) holding the metrics of ``servers``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(servers))
    return registry


def _escape(text: str, quote: bool = False) -> str:
    text = text.replace("\\", r"\\").replace("\n", r"\n")
    return text.replace('"', r"\"") if quote else text


def _sample_line(sample) -> str:
    labels = ",".join(f'{k}="{_escape(v, quote=True)}"' for k, v in sorted(sample.labels.items()))
    name = f"{sample.name}{{{labels}}}" if labels else sample.name
    return f"{name} {floatToGoString(sample.value)}"


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition (version 0.0.4) as Triton writes it: each family's ``# TYPE`` line
    names its samples. (prometheus_client's ``generate_latest`` writes ``_total`` into a counter's TYPE line
    whatever its samples are called, and Prometheus then files Triton's ``nv_*`` counters as untyped.)"""
    lines = []
    for metric in registry.collect():
        lines.append(f"# HELP {metric.name} {_escape(metric.documentation)}")
        lines.append(f"# TYPE {metric.name} {metric.type}")
        lines += [_sample_line(sample) for sample in metric.samples]
    return ("\n".join(lines) + "\n").encode()
