"""Serving replayed in modelled time: the engine's own scheduler, a host model of the ring.

`replay(requests, ...)` drives `scheduler.Scheduler` exactly as `LLM.step` does (plan call n+1,
then read call n's log, so the host plans with the results of call n-1), with a simulated clock.
Each call's log (`pipeline.StepLog`'s fields) comes from `RingModel`, which follows the device
program's rules tick by tick: stage s serves the entry of tick t - s, an entry holds the live
decode rows of micro-batch t mod M and the planned prompt blocks, rows are latched when they
enter, a micro-batch's tokens (and the first token of each prompt that ends in it) are sampled
when it leaves the last stage, and a row stops the moment its budget is reached. Every tick of
a call costs the same (`costmodel.CostModel.tick` of the call's shapes). Admission, the token
budget, pages, preemption, call lengths and finishing are the scheduler's, not a copy.

Requests are greedy with `ignore_eos` (as in `jaxpp bench`): each produces exactly its
`output_len` tokens, so no token value matters and the log's tokens are zeros.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from types import SimpleNamespace

import numpy as np

from jaxpp.bench import Request as BenchRequest
from jaxpp.bench import format_interval, latency, prompt_rates, serving_figures
from jaxpp.config import SamplingParams
from jaxpp.costmodel import CostModel
from jaxpp.kv_pages import PagePool
from jaxpp.pipeline import PipelineShape
from jaxpp.scheduler import Request, Scheduler, SlotLayout, Step


@dataclasses.dataclass
class ReplayResult:
    duration: float  # modelled seconds from the first arrival's start to the last token
    ticks: int
    busy_seconds: float  # the device's time in calls
    stats: dict  # scheduler.RunStats.as_dict(): ticks, bubble, occupancy, ...
    latencies: list[dict]  # per request: ttft, tpot, e2e (seconds, from its arrival)
    intervals: list[dict]  # LLMServingSim-style log lines
    compute_seconds: float  # summed over ticks: the slowest stage's layers ...
    head_seconds: float  # ... the LM head and sampling ...
    transfer_seconds: float  # ... the activation hand-off ...
    collective_seconds: float  # ... and the per-tick collectives

    def summary(self, requests: Sequence[BenchRequest]) -> dict:
        d = self.duration
        return {
            **serving_figures(
                len(requests),
                sum(len(r.prompt) for r in requests),
                sum(r.output_len for r in requests),
                d,
                self.latencies,
            ),
            "ticks": self.ticks,
            "tick_s": d / self.ticks if self.ticks else None,  # as jaxpp bench reports it
            "bubble_fraction": self.stats["bubble_fraction"],
            "occupancy": self.stats["occupancy"],
            "device_idle_fraction": 1 - self.busy_seconds / d if d else 0.0,  # as jaxpp bench
            "time_split": {
                "compute": self.compute_seconds,
                "head": self.head_seconds,
                "transfer": self.transfer_seconds,
                "collectives": self.collective_seconds,
            },
        }


class RingModel:
    """The device ring's state and rules on the host; `run(step)` answers one call."""

    def __init__(self, shape: PipelineShape, replicas: int, cost: CostModel):
        self.shape, self.replicas, self.cost = shape, replicas, cost
        S, M, mb = shape.stages, shape.microbatches, shape.rows
        rows = replicas * M * mb
        self.live = np.zeros(rows, bool)
        self.generated = np.zeros(rows, np.int64)
        self.tag = np.full(rows, -1, np.int64)
        self.max_tokens = np.zeros(rows, np.int64)
        self.generated0 = np.zeros(rows, np.int64)
        # The last S entries into stage 0 per replica: decode tags, prompt tokens per row of
        # the micro-batch (0 when none) and prompt tags finishing there.
        self.entry_tags = np.full((S, replicas, mb), -1, np.int64)
        self.entry_prompt = np.zeros((S, replicas), np.int64)
        self.entry_first = np.full((S, replicas, mb), -1, np.int64)
        self.tick = 0
        self.compute = self.head = self.transfer = self.collectives = 0.0

    def run(self, step: Step) -> tuple[SimpleNamespace, float]:
        """The call's log (shaped like pipeline.StepLog) and its modelled seconds."""
        S, M, mb = self.shape.stages, self.shape.microbatches, self.shape.rows
        kind, w = step.kind, step.kind.width
        if step.control is not None:
            self.tag = step.control["tag"].astype(np.int64)
            self.max_tokens = step.control["sampler"]["max_tokens"].astype(np.int64)
            self.generated0 = step.control["generated0"].astype(np.int64)
        self.live &= self.tag >= 0
        K = kind.rounds * M
        tags_log = np.full((K, self.replicas, w), -1, np.int32)
        work = np.zeros((K, S), np.int32)
        live = np.zeros((K, self.replicas), np.int32)
        for k in range(K):
            t = self.tick
            for r in range(self.replicas):
                base = r * M * mb
                entering = base + (t % M) * mb + np.arange(w)
                self.entry_tags[t % S, r] = -1
                self.entry_tags[t % S, r, :w] = np.where(
                    self.live[entering] & (self.tag[entering] >= 0), self.tag[entering], -1
                )
                planned = step.blocks[r, k] if kind.prompt else np.zeros((0, 3), np.int64)
                self.entry_prompt[t % S, r] = int(planned[:, 2].sum())
                self.entry_first[t % S, r] = -1
                if kind.prompt:
                    ends = np.nonzero(step.finish[r, k] >= 0)[0]
                    self.entry_first[t % S, r, ends] = self.tag[base + (t % M) * mb + ends]
                for s in range(S):
                    if t - s >= 0:
                        entry = (t - s) % S
                        work[k, s] += int(np.sum(self.entry_tags[entry, r, :w] >= 0))
                        work[k, s] += int(self.entry_prompt[entry, r])
                if t - S + 1 >= 0:
                    self._leave(r, t, w, k, tags_log)
                live[k, r] = int(self.live[base : base + M * mb].sum())
            self.tick += 1
        cost = self.cost.tick(kind)
        self.compute += K * cost.compute
        self.head += K * cost.head
        self.transfer += K * cost.transfer
        self.collectives += K * cost.collectives
        zeros = np.zeros((K, self.replicas, w), np.float32)
        n_top = kind.mode.logprobs
        log = SimpleNamespace(
            tags=tags_log,
            tokens=np.zeros_like(tags_log),
            logprob=zeros,
            top_ids=np.zeros((K, self.replicas, w, n_top), np.int32),
            top_logprobs=np.zeros((K, self.replicas, w, n_top), np.float32),
            work=work,
            live=live,
            logits=np.zeros((K, self.replicas, 0, 0), np.float32),
            logit_blocks=np.zeros((K, self.replicas, 0, 3), np.int32),
        )
        return log, K * cost.seconds

    def _leave(self, r: int, t: int, w: int, k: int, tags_log: np.ndarray) -> None:
        """Sample what leaves the last stage at tick t: the device's finishing rule."""
        S, M, mb = self.shape.stages, self.shape.microbatches, self.shape.rows
        entry = (t - S + 1) % S
        rows = r * M * mb + ((t - S + 1) % M) * mb + np.arange(w)
        decoding = self.entry_tags[entry, r, :w] >= 0
        first = self.entry_first[entry, r, :w] >= 0
        sampled = decoding | first
        self.generated[rows] = np.where(
            first, self.generated0[rows] + 1, self.generated[rows] + decoding
        )
        done = self.generated[rows] >= self.max_tokens[rows]
        self.live[rows] = np.where(sampled, ~done & (self.tag[rows] >= 0), self.live[rows])
        tags = np.where(first, self.entry_first[entry, r, :w], self.entry_tags[entry, r, :w])
        tags_log[k, r] = np.where(sampled, tags, -1)


def replay(
    requests: Sequence[BenchRequest],
    shape: PipelineShape,
    replicas: int,
    cost: CostModel,
    eos_token_ids: tuple[int, ...],
    decode_chunk: int,
    token_budget: int,
    params_gb: float,
    page_gb: float,
    log_interval: float = 5.0,
    log: Callable[[str], None] = lambda line: None,
    prefix_caching: bool = True,
) -> ReplayResult:
    """Serve `requests` (arrivals in seconds) in modelled time; LLM.step's loop, device
    calls priced by `cost`."""
    clock = SimpleNamespace(now=0.0)
    layout = SlotLayout(replicas, shape.microbatches, shape.rows)
    pool = PagePool(
        replicas, shape.pages, shape.block_size, shape.microbatches * shape.rows,
        shape.pages_per_seq, prefix_caching,
    )  # fmt: skip
    scheduler = Scheduler(
        layout, pool, token_budget, shape.stages, decode_chunk, eos_token_ids,
        clock=lambda: clock.now,
    )  # fmt: skip
    ring = RingModel(shape, replicas, cost)
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival)
    added: list[Request] = []
    device_free = busy = 0.0
    in_flight: tuple[Step, SimpleNamespace, float] | None = None
    intervals: list[dict] = []
    mark = {"t": 0.0, "tokens": 0, "prompt_tokens": 0, "hits": 0}

    def interval() -> None:
        stats = scheduler.stats
        span = max(clock.now - mark["t"], 1e-12)
        line = {
            "t": clock.now,
            "step": stats.calls,
            "batch": scheduler.decoding,
            "queue": len(scheduler.waiting),
            **prompt_rates(stats, mark, span),
            "decode_t": (stats.tokens - mark["tokens"]) / span,
            "npu_mem": params_gb
            + page_gb * max(pool.pages - pool.free_pages(r) for r in range(pool.replicas)),
        }
        mark.update(t=clock.now, tokens=stats.tokens)
        intervals.append(line)
        log(format_interval(line))

    # As LLM.generate: until every request has finished (a call dispatched before the last
    # update stays in flight, as it does on the device).
    while len(added) < len(order) or scheduler.unfinished:
        while len(added) < len(order) and requests[order[len(added)]].arrival <= clock.now:
            source = requests[order[len(added)]]
            params = SamplingParams(max_tokens=source.output_len, temperature=0.0, ignore_eos=True)
            request = Request(len(added), source.prompt, params, 0, source.arrival)
            scheduler.add(request)
            added.append(request)
        if not scheduler.unfinished:
            clock.now = requests[order[len(added)]].arrival  # idle until the next arrival
            continue
        step = scheduler.schedule()
        planned = None
        if step is not None:
            call_log, seconds = ring.run(step)
            device_free = max(clock.now, device_free) + seconds
            busy += seconds
            planned = (step, call_log, device_free)
        if in_flight is not None:
            previous, previous_log, done_at = in_flight
            clock.now = max(clock.now, done_at)
            scheduler.update(previous, previous_log)
        in_flight = planned
        if clock.now - mark["t"] >= log_interval:
            interval()
    interval()
    start = min((r.arrival for r in requests), default=0.0)
    latencies = [
        latency(r.arrival, r.first_token_time, r.finish_time, len(r.tokens))
        for r in sorted(added, key=lambda r: r.tag)
    ]
    return ReplayResult(
        duration=clock.now - start,
        ticks=scheduler.stats.ticks,
        busy_seconds=busy,
        stats=scheduler.stats.as_dict(),
        latencies=latencies,
        intervals=intervals,
        compute_seconds=ring.compute,
        head_seconds=ring.head,
        transfer_seconds=ring.transfer,
        collective_seconds=ring.collectives,
    )
