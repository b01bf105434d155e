"""Prometheus metrics of the serving runtime (exposed at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)


class ServingMetrics:
    """One registry per server, so several servers (and tests) in one process do not collide."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("xytune_time_to_first_token_seconds", "Arrival to first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("xytune_time_per_output_token_seconds", "Mean time per token after the first.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.step = Histogram("xytune_step_seconds", "Wall time of one engine step.", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.requests = Counter("xytune_requests", "Finished requests.", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("xytune_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generated_tokens = Counter("xytune_generated_tokens", "Generated tokens.", registry=r)
        self.waiting = Gauge("xytune_requests_waiting", "Requests waiting for their first step.", registry=r)
        self.running = Gauge("xytune_requests_running", "Requests holding KV blocks.", registry=r)
        self.kv_usage = Gauge("xytune_kv_cache_usage_ratio", "Fraction of KV blocks in use.", registry=r)
        self.preemptions = Gauge("xytune_preemptions", "Requests preempted so far (recomputed).", registry=r)
        self.prefix_queried = Gauge("xytune_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix "
                                    "cache.", registry=r)
        self.prefix_hits = Gauge("xytune_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache.",
                                 registry=r)
        self.prefix_hit_rate = Gauge("xytune_prefix_cache_hit_rate", "Hit tokens / queried tokens.", registry=r)
        self.spec_draft = Gauge("xytune_spec_draft_tokens", "Speculative draft tokens verified.", registry=r)
        self.spec_accepted = Gauge("xytune_spec_accepted_tokens", "Speculative draft tokens accepted.", registry=r)
        self.spec_acceptance = Gauge("xytune_spec_acceptance_rate", "Accepted / draft tokens.", registry=r)
        self.spec_tokens_per_step = Gauge("xytune_spec_tokens_per_step",
                                          "Tokens emitted per verify step of a request (1 = no gain).", registry=r)
        self.cost_error = Gauge("xytune_cost_model_step_error_ratio",
                                "Median absolute relative error of predicted step latency.", registry=r)
        self.cost_scale = Gauge("xytune_cost_model_calibration_scale",
                                "Measured / cost-table step time (online calibration).", registry=r)

    def on_step(self, seconds: float) -> None:
        self.step.observe(seconds)

    def on_finish(self, rec) -> None:
        """``rec``: a FinishRecord (the engine may run in another process)."""
        self.requests.labels(rec.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(rec.num_prompt_tokens)
        self.generated_tokens.inc(rec.num_output_tokens)
        if rec.first_token_time is not None:
            self.ttft.observe(rec.first_token_time - rec.arrival)
            if rec.num_output_tokens > 1 and rec.finish_time is not None:
                self.tpot.observe((rec.finish_time - rec.first_token_time) / (rec.num_output_tokens - 1))

    def render(self, snap: dict) -> bytes:
        """Refresh the gauges from an engine snapshot (``engine_snapshot``) and return the exposition text."""
        self.waiting.set(snap["waiting"])
        self.running.set(snap["running"])
        self.kv_usage.set(1 - snap["kv_blocks_free"] / snap["kv_blocks_total"])
        self.preemptions.set(snap["preemptions"])
        self.prefix_queried.set(snap["prefix_queried_tokens"])
        self.prefix_hits.set(snap["prefix_hit_tokens"])
        self.prefix_hit_rate.set(snap["prefix_hit_rate"])
        self.spec_draft.set(snap["spec_draft_tokens"])
        self.spec_accepted.set(snap["spec_accepted_tokens"])
        self.spec_acceptance.set(snap["spec_acceptance_rate"])
        self.spec_tokens_per_step.set(snap["spec_tokens_per_step"])
        if snap["cost_error"] is not None:
            self.cost_error.set(snap["cost_error"])
        if snap["cost_scale"] is not None:
            self.cost_scale.set(snap["cost_scale"])
        return generate_latest(self.registry)
