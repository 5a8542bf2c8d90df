"""Prometheus metrics of one server, in a registry of its own (GET /metrics)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "fms_speech_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "fms_speech_request_seconds",
            "Seconds from a request's arrival to the end of its response, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.audio_seconds = Counter(
            "fms_speech_audio_seconds",
            "Seconds of audio transcribed or translated",
            registry=registry,
        )
        self.batch_windows = Histogram(
            "fms_speech_batch_windows",
            "Windows per model call",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "fms_speech_batch_seconds",
            "Seconds per model call (features, prefill and decode of one batch)",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queued_windows = Gauge(
            "fms_speech_queued_windows",
            "Windows waiting for a model call",
            registry=registry,
        )
        self.requests_in_flight = Gauge(
            "fms_speech_requests_in_flight",
            "Requests admitted to the queue and not finished (the --max-queue count)",
            registry=registry,
        )
        self.dropped_windows = Counter(
            "fms_speech_dropped_windows",
            "Queued windows dropped because their client disconnected",
            registry=registry,
        )
        self.rejected = Counter(
            "fms_speech_rejected_requests",
            "Requests refused with 503 because the queue was full",
            registry=registry,
        )
        self.compiled_graphs = Gauge(
            "fms_speech_compiled_graphs",
            "Graphs torch.compile has built in this process (constant after the warm-up)",
            registry=registry,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
