"""Serving replayed in modelled time: the engine's own scheduler, a host model of the ring.

`replay(requests, ...)` drives `scheduler.Scheduler` exactly as `LLM.step` does (plan call n+1,
then read call n's log, so the host plans with the results of call n-1), with a simulated clock.
Each call's log (`pipeline.StepLog`'s fields) comes from `RingModel`, which follows the device
programs' rules tick by tick: stage s serves the entry of tick t - s, an entry holds the decode
slots of rows still live and the planned prompt chunks, rows are latched when they enter, a
micro-batch's tokens (and the first token of each prompt that ends in it) are sampled when it
leaves the last stage, and a row stops the moment its budget is reached. A tick costs
`costmodel.CostModel.tick` of its bucket and the keys its slots read. Admission, the token
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
from jaxpp.scheduler import Call, Request, Scheduler, SlotLayout


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
    """The device ring's state and rules on the host; `run(call)` answers one call."""

    def __init__(self, shape: PipelineShape, replicas: int, cost: CostModel):
        self.shape, self.replicas, self.cost = shape, replicas, cost
        S, M, mb = shape.stages, shape.microbatches, shape.rows
        rows = replicas * M * mb
        self.live = np.zeros(rows, bool)
        self.generated = np.zeros(rows, np.int64)
        self.position = np.zeros(rows, np.int64)
        self.tag = np.full(rows, -1, np.int64)
        self.max_tokens = np.zeros(rows, np.int64)
        self.generated0 = np.zeros(rows, np.int64)
        # The last S entries into stage 0 per replica: per row of the micro-batch the request
        # it samples (-1 none) and whether it ends a prompt; the real tokens of the entry.
        self.entry_tags = np.full((S, replicas, mb), -1, np.int64)
        self.entry_first = np.zeros((S, replicas, mb), bool)
        self.entry_end = np.zeros((S, replicas, mb), np.int64)  # position after the sample
        self.entry_work = np.zeros((S, replicas), np.int64)
        self.tick = 0
        self.compute = self.head = self.transfer = self.collectives = 0.0

    def run(self, call: Call) -> tuple[SimpleNamespace, float]:
        """The call's log (shaped like pipeline.StepLog) and its modelled seconds."""
        S, mb = self.shape.stages, self.shape.rows
        if call.control is not None:
            self.tag = call.control["tag"].astype(np.int64)
            self.max_tokens = call.control["sampler"]["max_tokens"].astype(np.int64)
            self.generated0 = call.control["generated0"].astype(np.int64)
        self.live &= self.tag >= 0
        K = call.ticks
        tags_log = np.full((K, self.replicas, mb), -1, np.int32)
        work = np.zeros((K, self.replicas, S), np.int32)
        live = np.zeros((K, self.replicas), np.int32)
        seconds = 0.0
        for k, batch in enumerate(call.batches):
            t = self.tick
            keys = [self._enter(r, t, batch) for r in range(self.replicas)]
            for r in range(self.replicas):
                for s in range(S):
                    if t - s >= 0:
                        work[k, r, s] = int(self.entry_work[(t - s) % S, r])
                if t - S + 1 >= 0:
                    self._leave(r, t, k, tags_log)
                live[k, r] = int(self.live[self._rows(r)].sum())
            head_rows = batch.token.shape[1] if call.collect else mb
            cost = self.cost.tick(batch.token.shape[1], max(d for d, _ in keys),
                                  max(p for _, p in keys), head_rows)  # fmt: skip
            seconds += cost.seconds
            self.compute += cost.compute
            self.head += cost.head
            self.transfer += cost.transfer
            self.collectives += cost.collectives
            self.tick += 1
        zeros = np.zeros((K, self.replicas, mb), np.float32)
        n_top = call.mode.logprobs
        log = SimpleNamespace(
            tags=tags_log,
            tokens=np.zeros_like(tags_log),
            logprob=zeros,
            top_ids=np.zeros((K, self.replicas, mb, n_top), np.int32),
            top_logprobs=np.zeros((K, self.replicas, mb, n_top), np.float32),
            drafts=np.zeros((K, self.replicas, mb, 0), np.int32),  # the model never speculates
            accepted=np.zeros_like(tags_log),
            work=work,
            live=live,
        )
        return log, seconds

    def _rows(self, r: int) -> slice:
        per_replica = self.shape.microbatches * self.shape.rows
        return slice(r * per_replica, (r + 1) * per_replica)

    def _enter(self, r: int, t: int, batch) -> tuple[int, int]:
        """Record replica r's entry of tick t (the device's `_enter`); returns the keys its
        decode slots and its prompt groups read."""
        S, mb = self.shape.stages, self.shape.rows
        base = self._rows(r).start
        token, row = batch.token[r], batch.row[r]
        decode = (token < 0) & (row >= 0)
        rows = base + np.maximum(row, 0)
        alive = decode & self.live[rows] & (self.tag[rows] >= 0)
        prompt = (token >= 0) & (row >= 0)
        e = t % S
        self.entry_work[e, r] = int(alive.sum() + prompt.sum())
        self.entry_tags[e, r] = -1
        self.entry_first[e, r] = False
        first_row = base + (t % self.shape.microbatches) * mb
        for j, slot in enumerate(batch.sample[r]):
            if slot < 0 or not (alive[slot] or prompt[slot]):
                continue
            self.entry_tags[e, r, j] = self.tag[first_row + j]
            self.entry_first[e, r, j] = bool(prompt[slot])
            end = batch.position[r, slot] if prompt[slot] else self.position[first_row + j]
            self.entry_end[e, r, j] = end + 1
        decode_keys = int(np.sum(self.position[rows][alive] + 1))
        lengths = batch.group_len[r]
        ends = batch.position[r, np.clip(batch.group_start[r] + lengths - 1, 0, None)]
        return decode_keys, int(np.sum((ends + 1)[lengths > 0]))

    def _leave(self, r: int, t: int, k: int, tags_log: np.ndarray) -> None:
        """Sample what leaves the last stage at tick t: the device's finishing rule."""
        S, M, mb = self.shape.stages, self.shape.microbatches, self.shape.rows
        e = (t - S + 1) % S
        rows = self._rows(r).start + ((t - S + 1) % M) * mb + np.arange(mb)
        sampled = self.entry_tags[e, r] >= 0
        first = self.entry_first[e, r]
        self.generated[rows] = np.where(
            first, self.generated0[rows] + 1, self.generated[rows] + sampled
        )
        self.position[rows] = np.where(sampled, self.entry_end[e, r], self.position[rows])
        done = self.generated[rows] >= self.max_tokens[rows]
        self.live[rows] = np.where(sampled, ~done & (self.tag[rows] >= 0), self.live[rows])
        tags_log[k, r] = np.where(sampled, self.entry_tags[e, r], -1)


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
    in_flight: tuple[Call, SimpleNamespace, float] | None = None
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
