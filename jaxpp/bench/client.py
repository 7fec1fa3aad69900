"""`jaxpp bench --base-url URL`: the serving benchmark as an HTTP client of `jaxpp serve` (or of
any OpenAI-compatible server), reporting what vLLM's `bench serve` reports.

The same requests as the in-process benchmark (random, shared-prefix, Poisson `--request-rate`
or a `--trace` with arrival times) are sent to `/v1/completions` as token-id prompts, greedy with
`ignore_eos`, streamed (`stream_options.include_usage` gives the tokens generated). One thread
per request in flight, at most `--max-concurrency` at once:

    dispatcher ──(arrival time, a free slot)──▶ thread: POST, read the events ──▶ timings
    sampler ──every SCRAPE_S──▶ GET /metrics (the server's running / waiting / KV pages in use)

Per request: TTFT (send to the first event with a choice: `jaxpp serve` sends one for every
engine step that gives the sequence tokens, even while their text is held back), ITL (between
such events), TPOT ((E2E - TTFT) / (tokens - 1)) and E2E (send to [DONE]); latencies are
measured from the moment the request is sent, so time spent queued in the server counts, as
vLLM measures. A warm-up sends requests of the same lengths once, untimed (other token ids: the
timed prompts are not in the server's prefix cache), so that the server has compiled the shapes
they use.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

from jaxpp.bench.serving import percentiles, serving_figures
from jaxpp.bench.workloads import Request

SCRAPE_S = 0.25  # how often /metrics is read during the timed pass
TIMEOUT_S = 600.0  # one request's socket timeout


@dataclasses.dataclass
class Timings:
    """One request as the client saw it; `error` is set when it failed."""

    sent: float
    first_text: float | None = None  # the first event with a choice
    done: float | None = None
    gaps: list[float] = dataclasses.field(default_factory=list)  # between such events, seconds
    output_tokens: int = 0
    events: int = 0
    error: str | None = None


def post_json(url: str, body: dict, timeout: float = TIMEOUT_S):
    """An open HTTP response to a JSON POST (urllib raises HTTPError on 4xx/5xx)."""
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    return urllib.request.urlopen(request, timeout=timeout)


def stream_completion(url: str, body: dict, hang_up_after: int | None = None) -> Timings:
    """POST a streaming completion and read its server-sent events to [DONE] (or hang up after
    `hang_up_after` events): when each text came, and the usage's completion tokens."""
    t = Timings(sent=time.perf_counter())
    try:
        with post_json(url, body) as response:
            last = None
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    t.done = time.perf_counter()
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    t.error = event["error"].get("message", "error event")
                    break
                if event.get("usage"):
                    t.output_tokens = event["usage"]["completion_tokens"]
                if event.get("choices"):  # tokens came (their text may be held back)
                    now = time.perf_counter()
                    if last is None:
                        t.first_text = now
                    else:
                        t.gaps.append(now - last)
                    last = now
                t.events += 1
                if hang_up_after is not None and t.events >= hang_up_after:
                    break
    except (OSError, ValueError) as e:  # HTTPError, a reset connection, a broken event
        body_text = e.read().decode(errors="replace")[:300] if hasattr(e, "read") else ""
        t.error = f"{type(e).__name__}: {e} {body_text}".strip()
    return t


def served_model(base_url: str) -> str:
    with urllib.request.urlopen(base_url + "/v1/models", timeout=30) as r:
        return json.loads(r.read())["data"][0]["id"]


def scrape(base_url: str) -> dict[str, float]:
    """The server's gauges from /metrics (vLLM's names and jaxpp's; the model label dropped)."""
    with urllib.request.urlopen(base_url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith(("vllm:", "jaxpp:")):
            name, value = line.split("{")[0].split(" ")[0], line.rsplit(" ", 1)[1]
            values[name] = values.get(name, 0.0) + float(value)
    return values


def run_requests(
    base_url: str,
    model: str,
    requests: Sequence[Request],
    max_concurrency: int | None,
    honour_arrivals: bool,
) -> tuple[list[Timings], float]:
    """Send every request (at its arrival time if `honour_arrivals`), each on its own thread,
    at most `max_concurrency` in flight; returns their timings and the wall time."""
    url = base_url + "/v1/completions"
    slots = threading.BoundedSemaphore(max_concurrency or len(requests))
    timings: list[Timings | None] = [None] * len(requests)

    def one(i: int, r: Request) -> None:
        try:
            body = {
                "model": model, "prompt": r.prompt, "max_tokens": r.output_len,
                "temperature": 0.0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True},
            }  # fmt: skip
            timings[i] = stream_completion(url, body)
        finally:
            slots.release()

    start = time.perf_counter()
    threads = []
    for i, r in enumerate(requests):
        if honour_arrivals:
            time.sleep(max(0.0, start + r.arrival - time.perf_counter()))
        slots.acquire()
        threads.append(threading.Thread(target=one, args=(i, r), daemon=True))
        threads[-1].start()
    for thread in threads:
        thread.join()
    return timings, time.perf_counter() - start  # type: ignore[return-value]


def run_client(
    base_url: str,
    requests: Sequence[Request],
    warm_up: Sequence[Request],
    max_concurrency: int | None,
    log: Callable[..., None],
) -> dict:
    """The warm-up (`warm_up`: requests of the same lengths and other tokens, so that the
    server's prefix cache holds none of the timed prompts), the timed pass with /metrics
    sampled, and the report's figures."""
    base_url = base_url.rstrip("/").removesuffix("/v1")
    model = served_model(base_url)
    log(f"server {base_url}: model {model!r}; warm-up pass ({len(warm_up)} requests)")
    warm, warm_s = run_requests(base_url, model, warm_up, max_concurrency, False)
    failed = [t.error for t in warm if t.error]
    if failed:
        raise RuntimeError(f"{len(failed)} warm-up requests failed; the first: {failed[0]}")
    log(f"warm-up: {warm_s:.1f}s; timed pass")
    samples: list[dict[str, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(SCRAPE_S):
            try:
                samples.append(scrape(base_url))
            except OSError:
                pass  # a missed sample, not a failed run

    sampler = threading.Thread(target=sample, daemon=True)
    before = scrape(base_url)
    sampler.start()
    timings, duration = run_requests(base_url, model, requests, max_concurrency, True)
    stop.set()
    sampler.join()
    after = scrape(base_url)
    return client_figures(requests, timings, duration, samples, before, after, model)


def client_figures(requests, timings, duration, samples, before, after, model) -> dict:
    ok = [(r, t) for r, t in zip(requests, timings, strict=True) if t.error is None and t.done]
    latencies = [
        {
            "ttft": (t.first_text or t.done) - t.sent,
            "tpot": (t.done - t.first_text) / (t.output_tokens - 1)
            if t.first_text and t.output_tokens > 1
            else None,
            "e2e": t.done - t.sent,
        }
        for _, t in ok
    ]
    figures = serving_figures(
        len(ok),
        sum(len(r.prompt) for r, _ in ok),
        sum(t.output_tokens for _, t in ok),
        duration,
        latencies,
    )

    def series(name: str) -> list[float]:
        return [s.get(name, 0.0) for s in samples] or [0.0]

    running, waiting = series("vllm:num_requests_running"), series("vllm:num_requests_waiting")
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    queries = delta.get("vllm:prefix_cache_queries_total", 0.0)
    return {
        "engine": "jaxpp bench --base-url",
        "model": model,
        "num_prompts": len(requests),
        "failed": len(requests) - len(ok),
        "errors": [t.error for t in timings if t.error][:5],
        **figures,
        "itl_s": percentiles([g for _, t in ok for g in t.gaps]),
        "server": {
            "samples": len(samples),
            "running_mean": sum(running) / len(running),
            "running_max": max(running),
            "waiting_max": max(waiting),
            "kv_cache_usage_max": max(series("vllm:kv_cache_usage_perc")),
            "preemptions": delta.get("vllm:num_preemptions_total", 0.0),
            "step_programs_compiled": delta.get("jaxpp:step_programs", 0.0),
            "prefix_cache_hit_rate": delta.get("vllm:prefix_cache_hits_total", 0.0) / queries
            if queries
            else None,
        },
    }


def print_client_report(r: dict) -> None:
    def ms(x):
        return "n/a" if x is None else f"{1e3 * x:.2f}"

    print(f"\n==== jaxpp bench --base-url ({r['num_prompts']} requests, model {r['model']}) ====")
    print(f"successful requests    {r['num_prompts'] - r['failed']} (failed {r['failed']})")
    for error in r["errors"]:
        print(f"  error: {error}")
    print(f"duration               {r['duration_s']:.3f} s")
    print(f"requests/s             {r['requests_per_s']:.2f}")
    print(f"input tokens/s         {r['input_tokens_per_s']:.1f}  ({r['input_tokens']} tokens)")
    print(f"output tokens/s        {r['output_tokens_per_s']:.1f}  ({r['output_tokens']} tokens)")
    print(f"total tokens/s         {r['total_tokens_per_s']:.1f}")
    for key, name in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL "), ("e2e_s", "E2E ")):
        s = r[key]
        print(f"{name} ms mean/p50/p99  {ms(s['mean'])} / {ms(s['p50'])} / {ms(s['p99'])}")
    s = r["server"]
    hit = s["prefix_cache_hit_rate"]
    print(
        f"server (/metrics, {s['samples']} samples): running mean {s['running_mean']:.1f} max "
        f"{s['running_max']:.0f}, waiting max {s['waiting_max']:.0f}, KV pages in use max "
        f"{100 * s['kv_cache_usage_max']:.1f}%, preemptions {s['preemptions']:.0f}, prefix "
        f"cache hit rate {'n/a' if hit is None else f'{hit:.1%}'}, step programs compiled "
        f"{s['step_programs_compiled']:.0f}"
    )
