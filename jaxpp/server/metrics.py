"""The server's Prometheus metrics, with vLLM's names (so that dashboards built for `vllm serve`
read them): gauges read off the engine at scrape time, counters of the scheduler's totals,
histograms of each request's latencies."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip


class _EngineCollector:
    """Read at each scrape (plain integers the engine thread updates: no lock needed)."""

    def __init__(self, llm, model_name: str):
        self.llm = llm
        self.labels = {"model_name": model_name}

    def collect(self):
        scheduler = self.llm.scheduler
        pool, stats = scheduler.pool, scheduler.stats

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc, labels=list(self.labels))
            g.add_metric(list(self.labels.values()), value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc, labels=list(self.labels))
            c.add_metric(list(self.labels.values()), value)
            return c

        yield gauge("vllm:num_requests_running", "Requests admitted and unfinished.",
                    len(scheduler.running))  # fmt: skip
        yield gauge("vllm:num_requests_waiting", "Requests waiting for a row and pages.",
                    len(scheduler.waiting))  # fmt: skip
        yield gauge("vllm:kv_cache_usage_perc", "Share of KV pages held by requests (0-1).",
                    pool.in_use / pool.total)  # fmt: skip
        yield counter("vllm:prompt_tokens", "Prompt tokens admitted.", stats.prompt_tokens)
        yield counter("vllm:generation_tokens", "Tokens generated.", stats.tokens)
        yield counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      stats.prompt_tokens)  # fmt: skip
        yield counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                      stats.prefix_cache_hit_tokens)  # fmt: skip
        yield counter("vllm:num_preemptions", "Requests preempted.", stats.preemptions)
        # jaxpp's own: programs compiled so far (all of them at start-up, LLM.warmup; a rarer
        # sampler mode, such as logprobs, compiles when first met).
        yield gauge("jaxpp:step_programs", "Step programs compiled so far.",
                    self.llm.compiled_programs)  # fmt: skip


class Metrics:
    def __init__(self, llm, model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(llm, model_name))
        labels = ["model_name"]
        self._name = model_name
        self._histograms = {
            "ttft": Histogram("vllm:time_to_first_token_seconds", "Time to first token.",
                              labels, buckets=_LATENCY_BUCKETS, registry=self.registry),
            "inter_token": Histogram("vllm:inter_token_latency_seconds", "Time between tokens.",
                                     labels, buckets=_LATENCY_BUCKETS, registry=self.registry),
            "e2e": Histogram("vllm:e2e_request_latency_seconds", "Arrival to last token.",
                             labels, buckets=_LATENCY_BUCKETS, registry=self.registry),
        }  # fmt: skip
        self._success = Counter(
            "vllm:request_success", "Requests finished.", labels + ["finished_reason"],
            registry=self.registry,
        )  # fmt: skip

    def observe(self, name: str, value) -> None:
        """The engine loop's report of one latency, or of a finish reason ("finished")."""
        if name == "finished":
            self._success.labels(self._name, str(value)).inc()
        else:
            self._histograms[name].labels(self._name).observe(value)

    def text(self) -> bytes:
        return generate_latest(self.registry)
