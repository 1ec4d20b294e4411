"""Prometheus metrics of the server (the official `prometheus_client`, imported only when a server starts)."""

from __future__ import annotations

Z_BUCKETS = (-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 10.0)
RAW_BUCKETS = (-40.0, -20.0, -10.0, -5.0, -2.5, 0.0, 2.5, 5.0, 10.0, 20.0, 40.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The server's metrics in a registry of its own (so several apps in one process do not collide)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram("personascope_request_latency_seconds", "Chat completion latency, from the "
                                 "request to its last token.", ["stream", "monitored"], buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.requests = Counter("personascope_requests", "Chat completions finished, by outcome.", ["outcome"],
                                registry=r)
        self.projection = Histogram("personascope_drift_projection", "Raw projections on the unit persona vector "
                                    "per recorded turn (span pre: last token before the turn; response: the turn's "
                                    "mean).", ["vector", "span"], buckets=RAW_BUCKETS, registry=r)
        self.projection_z = Histogram("personascope_drift_projection_z", "The same projections as z-scores against "
                                      "the vector's normal range (calibrated vectors only).", ["vector", "span"],
                                      buckets=Z_BUCKETS, registry=r)
        self.alerts = Counter("personascope_drift_alerts", "Drift alerts raised (first per conversation and "
                              "vector).", ["vector", "reason"], registry=r)
        self.guarded = Counter("personascope_guarded_tokens", "Tokens chosen while a persona guard acted.",
                               ["vector", "source"], registry=r)
        self.auto_guard_turns = Counter("personascope_drift_auto_guard_turns", "Turns generated under an "
                                        "automatic guard.", ["vector", "mode"], registry=r)
        self.records = Counter("personascope_drift_records", "Turns written to the drift database.", registry=r)
        self.record_errors = Counter("personascope_drift_record_errors", "Turns that could not be written.",
                                     registry=r)

    def observe_turn(self, pre: dict, pre_z: dict, response: dict, response_z: dict) -> None:
        for span, raw, z in (("pre", pre, pre_z), ("response", response, response_z)):
            for name, value in raw.items():
                if value is not None:
                    self.projection.labels(name, span).observe(value)
                if z.get(name) is not None:
                    self.projection_z.labels(name, span).observe(z[name])

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
