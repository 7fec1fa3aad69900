"""The server's Prometheus metrics, with vLLM's names, labels and buckets (vLLM 0.11's
`v1/metrics/loggers.py`), so that dashboards built for `vllm serve` read them: gauges read off
the engine at scrape time, counters of the scheduler's totals, histograms of each request's
latencies and token counts. Every series carries `model_name` and `engine` ("0": one engine).

No `*_created` series: prometheus_client's creation timestamps are switched off for the
process (the dashboards read none, and they double the text of every counter and histogram).
"""

from __future__ import annotations

import numpy as np
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LABELS = ("model_name", "engine")
ENGINE = "0"
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
_TOKEN_GAP_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                      5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
_ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_N_BUCKETS = (1, 2, 5, 10, 20)


def buckets_1_2_5(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `limit`: vLLM's token-count buckets."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


class _EngineCollector:
    """Read at each scrape (plain integers the engine thread updates: no lock needed)."""

    def __init__(self, llm, model_name: str):
        self.llm = llm
        self.labels = [model_name, ENGINE]

    def collect(self):
        llm, scheduler = self.llm, self.llm.scheduler
        pool, stats = scheduler.pool, scheduler.stats
        gauge, counter = GaugeMetricFamily, CounterMetricFamily
        values = [
            (gauge, "vllm:num_requests_running", "Requests admitted and unfinished.",
             len(scheduler.running)),
            (gauge, "vllm:num_requests_waiting", "Requests waiting for a row and pages.",
             len(scheduler.waiting)),
            (gauge, "vllm:kv_cache_usage_perc", "Share of KV pages held by requests (0-1).",
             pool.in_use / pool.total),
            (counter, "vllm:prompt_tokens", "Prompt tokens admitted.", stats.prompt_tokens),
            (counter, "vllm:generation_tokens", "Tokens generated.",
             stats.tokens + stats.spec_accepted_tokens),
            (counter, "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix "
             "cache.", stats.prompt_tokens),
            (counter, "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
             stats.prefix_cache_hit_tokens),
            (counter, "vllm:num_preemptions", "Requests preempted.", stats.preemptions),
            # jaxpp's own: programs compiled so far (all of them at start-up, LLM.warmup; a
            # rarer mode, such as logprobs or prompt_logprobs, compiles when first met).
            (gauge, "jaxpp:step_programs", "Step programs compiled so far.",
             llm.compiled_programs),
        ]  # fmt: skip
        if llm.shape.drafts:  # speculative decoding: vLLM's spec_decode counters
            values += [
                (counter, "vllm:spec_decode_num_drafts", "Rows verified with drafts.",
                 stats.spec_drafts),
                (counter, "vllm:spec_decode_num_draft_tokens", "Draft tokens verified.",
                 stats.spec_draft_tokens),
                (counter, "vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                 stats.spec_accepted_tokens),
            ]  # fmt: skip
        for kind, name, doc, value in values:
            metric = kind(name, doc, labels=LABELS)
            metric.add_metric(self.labels, value)
            yield metric
        if llm.shape.drafts:
            per = counter("vllm:spec_decode_num_accepted_tokens_per_pos",
                          "Draft tokens accepted, by their position among the drafts.",
                          labels=[*LABELS, "position"])  # fmt: skip
            accepted = stats.spec_accepted_per_position or [0] * llm.shape.drafts
            for position, value in enumerate(accepted):
                per.add_metric([*self.labels, str(position)], value)
            yield per
        config = {
            "block_size": llm.block_size,
            "num_gpu_blocks": pool.total,
            "enable_prefix_caching": llm.enable_prefix_caching,
            "cache_dtype": np.dtype(llm.dtype).name,
        }
        info = gauge("vllm:cache_config_info", "The KV cache's configuration (in its labels).",
                     labels=[*LABELS, *config])  # fmt: skip
        info.add_metric([*self.labels, *map(str, config.values())], 1)
        yield info


class Metrics:
    def __init__(self, llm, model_name: str):
        prometheus_client.disable_created_metrics()
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(llm, model_name))
        self.llm = llm
        self.labels = (model_name, ENGINE)
        tokens = buckets_1_2_5(llm.max_model_len)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, LABELS, buckets=buckets, registry=self.registry)

        self._histograms = {
            "ttft": histogram("vllm:time_to_first_token_seconds", "Time to first token.",
                              _TTFT_BUCKETS),
            "inter_token": histogram("vllm:inter_token_latency_seconds", "Time between tokens.",
                                     _TOKEN_GAP_BUCKETS),
            # vLLM 0.11's older name of the same figure (its dashboard of that version reads it)
            "inter_token_0_11": histogram("vllm:time_per_output_token_seconds",
                                          "Time between tokens (older name).",
                                          _TOKEN_GAP_BUCKETS),
            "tpot": histogram("vllm:request_time_per_output_token_seconds",
                              "Per request: decode time / (its tokens - 1).", _TOKEN_GAP_BUCKETS),
            "e2e": histogram("vllm:e2e_request_latency_seconds", "Arrival to last token.",
                             _REQUEST_BUCKETS),
            "queue": histogram("vllm:request_queue_time_seconds", "Arrival to admission.",
                               _REQUEST_BUCKETS),
            "inference": histogram("vllm:request_inference_time_seconds",
                                   "Admission to last token.", _REQUEST_BUCKETS),
            "prefill": histogram("vllm:request_prefill_time_seconds",
                                 "Admission to first token.", _REQUEST_BUCKETS),
            "decode": histogram("vllm:request_decode_time_seconds",
                                "First token to last token.", _REQUEST_BUCKETS),
            "prompt_tokens": histogram("vllm:request_prompt_tokens", "Prompt tokens per request.",
                                       tokens),
            "generation_tokens": histogram("vllm:request_generation_tokens",
                                           "Tokens generated per request.", tokens),
            "max_generation_tokens": histogram("vllm:request_max_num_generation_tokens",
                                               "Most tokens generated by one of a request's n "
                                               "sequences.", tokens),
            "max_tokens": histogram("vllm:request_params_max_tokens",
                                    "The max_tokens requests ask for.", tokens),
            "n": histogram("vllm:request_params_n", "The n requests ask for.", _N_BUCKETS),
            "iteration": histogram("vllm:iteration_tokens_total",
                                   "Tokens (prompt and generated) per engine step.",
                                   _ITERATION_BUCKETS),
        }  # fmt: skip
        self._success = Counter(
            "vllm:request_success", "Requests finished.", [*LABELS, "finished_reason"],
            registry=self.registry,
        )  # fmt: skip
        self._totals = 0  # the scheduler's prompt + generated tokens at the last step

    def _observe(self, name: str, value: float) -> None:
        self._histograms[name].labels(*self.labels).observe(value)

    def observe(self, name: str, value) -> None:
        """The engine loop's report: a gap between two tokens ("inter_token", seconds) or a
        step done ("step": its tokens are read off the scheduler's totals)."""
        if name == "inter_token":
            self._observe("inter_token", value)
            self._observe("inter_token_0_11", value)
        elif name == "step":
            stats = self.llm.scheduler.stats
            totals = stats.prompt_tokens + stats.tokens
            if totals > self._totals:
                self._observe("iteration", totals - self._totals)
            self._totals = totals

    def sequence_done(self, completion, m, prompt_tokens: int, max_tokens: int) -> None:
        """One sequence finished: its latencies (jaxpp RequestMetrics), tokens and reason."""
        admitted = m.first_scheduled_time or m.arrival_time
        generated = len(completion.token_ids)
        self._observe("ttft", m.time_to_first_token)
        self._observe("e2e", m.finished_time - m.arrival_time)
        self._observe("queue", admitted - m.arrival_time)
        self._observe("inference", m.finished_time - admitted)
        self._observe("prefill", m.first_token_time - admitted)
        self._observe("decode", m.decode_time)
        if generated > 1:
            self._observe("tpot", m.decode_time / (generated - 1))
        self._observe("prompt_tokens", prompt_tokens)
        self._observe("generation_tokens", generated)
        self._observe("max_tokens", max_tokens)
        self._success.labels(*self.labels, str(completion.finish_reason)).inc()

    def request_done(self, n: int, generated: list[int]) -> None:
        """A request's n sequences (of one prompt) all finished, with these token counts."""
        self._observe("n", n)
        self._observe("max_generation_tokens", max(generated))

    def text(self) -> bytes:
        return generate_latest(self.registry)
