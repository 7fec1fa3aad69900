"""One timed serving pass through the engine (requests admitted at their arrival times), its
interval log, latencies and throughput figures, and a counter of XLA compilations."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

from jaxpp.bench.workloads import Request

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring duration events) while active."""

    _registered = False
    _active: list[CompileCounter] = []

    def __init__(self):
        self.count = 0
        self.names: list[str] = []
        self.seconds = 0.0

    @classmethod
    def _listener(cls, event: str, duration: float, **kwargs) -> None:
        if event != COMPILE_EVENT:
            return
        for counter in cls._active:
            counter.count += 1
            counter.seconds += duration
            counter.names.append(str(kwargs.get("fun_name", "?")))

    def __enter__(self) -> CompileCounter:
        import jax  # noqa: PLC0415

        if not CompileCounter._registered:
            jax.monitoring.register_event_duration_secs_listener(CompileCounter._listener)
            CompileCounter._registered = True
        CompileCounter._active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        CompileCounter._active.remove(self)


# --------------------------------------------------------------------------------------------
# the jaxpp run


def greedy_params(r: Request):
    from jaxpp.config import SamplingParams  # noqa: PLC0415

    return SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True)


@dataclasses.dataclass
class PassResult:
    duration: float
    requests: list[Request]  # every request served, in order: later turns after the first
    outputs: list  # RequestOutput per request, in request order
    latencies: list[dict]  # per request: ttft, tpot, e2e seconds, measured from its arrival
    stats: dict  # the ring's counters over the pass (scheduler.RunStats.as_dict)
    intervals: list[dict]
    compilations: int
    compiled: list[str]
    device_idle_s: float


def run_pass(
    llm,
    requests: list[Request],
    log_interval: float = 5.0,
    log: Callable = print,
    sampling: Callable = greedy_params,
) -> PassResult:
    """Admit each request at its arrival time and step the engine until every one is done,
    logging an interval line every `log_interval` seconds; `sampling(request)` gives its
    SamplingParams (default: greedy, exactly `output_len` tokens). A conversation's next turn is
    admitted as soon as its previous turn is answered. The prefix cache starts empty: a pass
    finds only what it computed itself."""
    llm.reset_prefix_cache()
    served = sorted(requests, key=lambda r: r.arrival)
    outputs: list = [None] * len(served)
    latencies: list = [None] * len(served)
    arrived: list[float] = []  # perf_counter time of each admitted request
    owner: dict[str, int] = {}
    llm.scheduler.reset_stats()
    idle_before = llm.device_idle_s
    intervals: list[dict] = []
    with CompileCounter() as counter:
        start = time.perf_counter()
        mark = {"t": start, "calls": 0, "tokens": 0, "prompt_tokens": 0, "hits": 0}
        while len(arrived) < len(served) or llm.has_unfinished_requests():
            now = time.perf_counter()
            while len(arrived) < len(served) and start + served[len(arrived)].arrival <= now:
                r = served[len(arrived)]
                owner[llm.add_request(r.prompt, sampling(r))] = len(arrived)
                arrived.append(start + r.arrival)
            if not llm.has_unfinished_requests():
                time.sleep(max(0.0, start + served[len(arrived)].arrival - now))
                continue
            for out in llm.step():
                i = owner.pop(out.request_id)
                outputs[i] = out
                m = out.metrics
                answer = list(out.outputs[0].token_ids)
                latencies[i] = latency(arrived[i], m.first_token_time, m.finished_time, len(answer))
                follow = served[i].next_turn(answer, m.finished_time - start)
                if follow is not None:  # arrives now: before any request still to come
                    at = len(arrived)
                    served.insert(at, follow)
                    outputs.insert(at, None)
                    latencies.insert(at, None)
            if time.perf_counter() - mark["t"] >= log_interval:
                intervals.append(_interval(llm, start, mark, log))
        duration = time.perf_counter() - start
    intervals.append(_interval(llm, start, mark, log))
    return PassResult(
        duration,
        served,
        outputs,
        latencies,
        llm.scheduler.stats.as_dict(),
        intervals,
        counter.count,
        counter.names,
        llm.device_idle_s - idle_before,
    )


def latency(arrival: float, first_token: float, finished: float, tokens: int) -> dict:
    """TTFT, TPOT and end-to-end seconds of one request, measured from its arrival."""
    return {
        "ttft": first_token - arrival,
        "tpot": (finished - first_token) / (tokens - 1) if tokens > 1 else None,
        "e2e": finished - arrival,
    }


def _interval(llm, start: float, mark: dict, log: Callable) -> dict:
    """One line of LLMServingSim's log: calls so far, requests decoding, prompt and decode
    token rates over the interval, the fullest device's parameters and KV pages in use."""
    now = time.perf_counter()
    stats = llm.scheduler.stats
    span = max(now - mark["t"], 1e-9)
    pool = llm.scheduler.pool
    pages = max(pool.pages - pool.free_pages(r) for r in range(pool.replicas))
    params = max(d["params"] for d in llm.device_memory())
    memory = params + pages * llm.kv_bytes_per_page()
    line = {
        "t": now - start,
        "step": stats.calls,
        "batch": llm.scheduler.decoding,
        "queue": len(llm.scheduler.waiting),
        **prompt_rates(stats, mark, span),
        "decode_t": (stats.tokens - mark["tokens"]) / span,
        "npu_mem": memory / 1e9,
    }
    mark.update(t=now, calls=stats.calls, tokens=stats.tokens)
    log(format_interval(line))
    return line


def prompt_rates(stats, mark: dict, span: float) -> dict:
    """Prompt tokens computed per second since `mark` and the share of admitted prompt tokens
    the prefix cache held (None when none was admitted); moves the mark on."""
    admitted = stats.prompt_tokens - mark["prompt_tokens"]
    hits = stats.prefix_cache_hit_tokens - mark["hits"]
    mark.update(prompt_tokens=stats.prompt_tokens, hits=stats.prefix_cache_hit_tokens)
    return {"prompt_t": (admitted - hits) / span, "hit": hits / admitted if admitted else None}


def format_interval(line: dict) -> str:
    """An interval record as LLMServingSim prints it (plus the queue length)."""
    return (
        f"[{line['t']:7.1f}s] step={line['step']} batch={line['batch']} "
        f"prompt_t={line['prompt_t']:.1f} tok/s decode_t={line['decode_t']:.1f} tok/s "
        f"npu_mem={line['npu_mem']:.2f} GB queue={line['queue']}"
        + ("" if line.get("hit") is None else f" prefix_hit={line['hit']:.0%}")
    )


def percentiles(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    a = np.asarray(values, np.float64)
    return {
        "mean": float(a.mean()),
        "p50": float(np.percentile(a, 50)),
        "p99": float(np.percentile(a, 99)),
    }


def serving_figures(
    requests: int, input_tokens: int, output_tokens: int, duration: float, latencies: list[dict]
) -> dict:
    """Throughput and latency percentiles of a run: what `jaxpp bench` and the modelled
    replay of `jaxpp plan` both report."""
    d = duration
    return {
        "duration_s": d,
        "requests_per_s": requests / d,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "input_tokens_per_s": input_tokens / d,
        "output_tokens_per_s": output_tokens / d,
        "total_tokens_per_s": (input_tokens + output_tokens) / d,
        "ttft_s": percentiles([x["ttft"] for x in latencies]),
        "tpot_s": percentiles([x["tpot"] for x in latencies]),
        "e2e_s": percentiles([x["e2e"] for x in latencies]),
    }


def summarize(result: PassResult) -> dict:
    stats = result.stats
    d = result.duration
    requests = result.requests
    return {
        **serving_figures(
            len(requests),
            sum(len(r.prompt) for r in requests),
            sum(len(o.outputs[0].token_ids) for o in result.outputs),
            d,
            result.latencies,
        ),
        "tick_s": d / stats["ticks"] if stats["ticks"] else None,
        "occupancy": stats["occupancy"],
        "queued_occupancy": stats["queued_occupancy"],
        "bubble_fraction": stats["bubble_fraction"],
        "spec_decode": stats["spec_decode"],
        "device_idle_fraction": result.device_idle_s / d,
    }
