"""Prometheus metrics of the serving runtime (exposed at /metrics), under xytune's names and under vLLM's.

Dashboards and alerts for LLM servers (vLLM's Grafana example and those built on it) read vLLM's names
(``vllm:time_to_first_token_seconds``, ``vllm:num_requests_running``...) with a ``model_name`` label, so
every measurement vLLM has a name for is exported under that name too. xytune's own names carry what
vLLM has none for: the step time the xy policy paces, the cost model's error and calibration.

Running totals the engine keeps (preemptions, prefix-cache lookups, speculative drafts) are counters,
read from the engine's latest snapshot, so ``rate()`` over them is right.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0,
                   60.0, 120.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

# snapshot key -> (xytune name, vLLM name or None, help); totals become counters (``_total``), levels gauges
SNAPSHOT_COUNTERS = {
    "preemptions": ("xytune_preemptions", "vllm:num_preemptions", "Requests preempted (recomputed later)."),
    "prefix_queried_tokens": ("xytune_prefix_cache_queried_tokens", "vllm:prefix_cache_queries",
                              "Prompt tokens looked up in the prefix cache."),
    "prefix_hit_tokens": ("xytune_prefix_cache_hit_tokens", "vllm:prefix_cache_hits",
                          "Prompt tokens found in the prefix cache."),
    "spec_draft_tokens": ("xytune_spec_draft_tokens", "vllm:spec_decode_num_draft_tokens",
                          "Speculative draft tokens verified."),
    "spec_accepted_tokens": ("xytune_spec_accepted_tokens", "vllm:spec_decode_num_accepted_tokens",
                             "Speculative draft tokens accepted."),
}
SNAPSHOT_GAUGES = {
    "waiting": ("xytune_requests_waiting", "vllm:num_requests_waiting", "Requests waiting for their first step."),
    "running": ("xytune_requests_running", "vllm:num_requests_running", "Requests holding KV blocks."),
    "kv_usage": ("xytune_kv_cache_usage_ratio", "vllm:kv_cache_usage_perc", "Fraction of KV blocks in use (0-1)."),
    "prefix_hit_rate": ("xytune_prefix_cache_hit_rate", None, "Hit tokens / queried tokens, since start."),
    "spec_acceptance_rate": ("xytune_spec_acceptance_rate", None, "Accepted / draft tokens, since start."),
    "spec_tokens_per_step": ("xytune_spec_tokens_per_step", None,
                             "Tokens emitted per verify step of a request (1 = no gain)."),
    "cost_error": ("xytune_cost_model_step_error_ratio", None,
                   "Median absolute relative error of predicted step latency."),
    "cost_scale": ("xytune_cost_model_calibration_scale", None, "Measured / cost-table step time (online "
                   "calibration)."),
}


class _Both:
    """One measurement under xytune's name and vLLM's (the latter with the ``model_name`` label)."""

    def __init__(self, kind, name: str, vllm_name: str, doc: str, model_name: str, registry, labels=(), **kw):
        self.own = kind(name, doc, list(labels), registry=registry, **kw)
        self.vllm = kind(vllm_name, doc, [*labels, "model_name"], registry=registry, **kw)
        self.model_name = model_name

    def _children(self, labels):
        own = self.own.labels(*labels) if labels else self.own
        return own, self.vllm.labels(*labels, self.model_name)

    def observe(self, value: float, *labels: str) -> None:
        for metric in self._children(labels):
            metric.observe(value)

    def inc(self, value: float = 1.0, *labels: str) -> None:
        for metric in self._children(labels):
            metric.inc(value)


class _SnapshotCollector:
    """Exports the engine's latest snapshot (``engine_snapshot``): its totals as counters, its levels as gauges."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.snapshot: dict | None = None

    def collect(self):
        snap = self.snapshot
        if snap is None:
            return
        values = {**snap, "kv_usage": 1 - snap["kv_blocks_free"] / snap["kv_blocks_total"]}
        for table, family in ((SNAPSHOT_COUNTERS, CounterMetricFamily), (SNAPSHOT_GAUGES, GaugeMetricFamily)):
            for key, (name, vllm_name, doc) in table.items():
                if values.get(key) is None:
                    continue
                yield family(name, doc, value=float(values[key]))
                if vllm_name is not None:
                    labelled = family(vllm_name, doc, labels=["model_name"])
                    labelled.add_metric([self.model_name], float(values[key]))
                    yield labelled


class ServingMetrics:
    """One registry per server, so several servers (and tests) in one process do not collide."""

    def __init__(self, model_name: str = "unknown"):
        r = self.registry = CollectorRegistry()
        both = dict(model_name=model_name, registry=r)
        self.ttft = _Both(Histogram, "xytune_time_to_first_token_seconds", "vllm:time_to_first_token_seconds",
                          "Arrival to first token.", buckets=LATENCY_BUCKETS, **both)
        self.tpot = _Both(Histogram, "xytune_time_per_output_token_seconds", "vllm:time_per_output_token_seconds",
                          "Mean time per token after the first, per request.", buckets=LATENCY_BUCKETS, **both)
        self.e2e = _Both(Histogram, "xytune_e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds",
                         "Arrival to last token.", buckets=LATENCY_BUCKETS, **both)
        self.queue = _Both(Histogram, "xytune_request_queue_time_seconds", "vllm:request_queue_time_seconds",
                           "Arrival to the request's (last) admission into a step.", buckets=LATENCY_BUCKETS, **both)
        self.step_tokens = _Both(Histogram, "xytune_step_tokens", "vllm:iteration_tokens_total",
                                 "Tokens per engine step (what the xy policy sizes).", buckets=TOKEN_BUCKETS, **both)
        self.request_prompt_tokens = _Both(Histogram, "xytune_request_prompt_tokens", "vllm:request_prompt_tokens",
                                           "Prompt tokens per finished request.", buckets=TOKEN_BUCKETS, **both)
        self.request_output_tokens = _Both(Histogram, "xytune_request_generation_tokens",
                                           "vllm:request_generation_tokens", "Generated tokens per finished request.",
                                           buckets=TOKEN_BUCKETS, **both)
        self.requests = _Both(Counter, "xytune_requests", "vllm:request_success", "Finished requests.",
                              labels=("finished_reason",), **both)
        self.prompt_tokens = _Both(Counter, "xytune_prompt_tokens", "vllm:prompt_tokens",
                                   "Prompt tokens of finished requests.", **both)
        self.generated_tokens = _Both(Counter, "xytune_generated_tokens", "vllm:generation_tokens",
                                      "Generated tokens of finished requests.", **both)
        self.step = Histogram("xytune_step_seconds", "Wall time of one engine step.", buckets=LATENCY_BUCKETS,
                              registry=r)
        self._snapshot = _SnapshotCollector(model_name)
        r.register(self._snapshot)

    def on_step(self, seconds: float, num_tokens: int) -> None:
        self.step.observe(seconds)
        self.step_tokens.observe(num_tokens)

    def on_finish(self, rec) -> None:
        """``rec``: a FinishRecord (the engine may run in another process)."""
        self.requests.inc(1, rec.finish_reason or "unknown")
        self.prompt_tokens.inc(rec.num_prompt_tokens)
        self.generated_tokens.inc(rec.num_output_tokens)
        self.request_prompt_tokens.observe(rec.num_prompt_tokens)
        self.request_output_tokens.observe(rec.num_output_tokens)
        if rec.scheduled_time is not None:
            self.queue.observe(rec.scheduled_time - rec.arrival)
        if rec.finish_time is not None:
            self.e2e.observe(rec.finish_time - rec.arrival)
        if rec.first_token_time is not None:
            self.ttft.observe(rec.first_token_time - rec.arrival)
            if rec.num_output_tokens > 1 and rec.finish_time is not None:
                self.tpot.observe((rec.finish_time - rec.first_token_time) / (rec.num_output_tokens - 1))

    def render(self, snap: dict | None) -> bytes:
        """The exposition text, with the gauges and totals of ``snap`` (an engine snapshot)."""
        self._snapshot.snapshot = snap
        return generate_latest(self.registry)
