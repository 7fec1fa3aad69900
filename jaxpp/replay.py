"""Serving replayed in modelled time: the engine's own scheduler, a host model of the ring.

`replay(requests, ...)` drives `scheduler.Scheduler` exactly as `LLM.step` does (plan call n+1,
then read call n's log, so the host plans with the results of call n-1), with a simulated clock.
Each call's log (`pipeline.StepLog`'s fields) comes from `RingModel`, which follows the device
program's rules tick by tick — micro-batch (t - s) mod M at stage s, at most one prompt chunk
entering stage 0 per tick, rows latched when they enter, tokens sampled when a micro-batch
leaves the last stage, a row stopping the moment its budget is reached, the call leaving early
when nothing is live, planned or riding — and prices every tick with `costmodel.CostModel`.
Admission, slot choice, chunking, call lengths and finishing are the scheduler's, not a copy.

Requests are greedy with `ignore_eos` (as in `jaxpp bench`): each produces exactly its
`output_len` tokens, so no token value matters and the log's tokens are zeros.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from types import SimpleNamespace

import numpy as np

from jaxpp.bench import Request as BenchRequest
from jaxpp.bench import format_interval, latency, serving_figures
from jaxpp.config import SamplingParams
from jaxpp.costmodel import CostModel
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
        slots = replicas * M * mb
        self.live = np.zeros(slots, bool)
        self.position = np.zeros(slots, np.int64)
        self.generated = np.zeros(slots, np.int64)
        self.tag = np.full(slots, -1, np.int64)
        self.max_tokens = np.zeros(slots, np.int64)
        # The last S entries into stage 0 per replica: row tags [S, replicas, mb] and chunk
        # meta [S, replicas, 5]: tag, row, start, length, last.
        self.entry_tags = np.full((S, replicas, mb), -1, np.int64)
        self.entry_meta = np.zeros((S, replicas, 5), np.int64)
        self.entry_meta[:, :, 0] = -1
        self.tick = 0
        self.compute = self.head = self.transfer = self.collectives = 0.0

    def run(self, step: Step, sampler: dict[str, np.ndarray]) -> tuple[SimpleNamespace, float]:
        """The call's log (shaped like pipeline.StepLog) and its modelled seconds."""
        S, M, mb = self.shape.stages, self.shape.microbatches, self.shape.rows
        per_replica = M * mb
        if step.tags is not None:
            self.tag = step.tags.astype(np.int64)
            self.max_tokens = sampler["max_tokens"].astype(np.int64)
        self.live &= self.tag >= 0
        w = step.kind.width
        K = step.plan_meta.shape[1]
        planned = np.nonzero(step.plan_meta[:, :, 2].max(axis=0) > 0)[0]
        last_planned = int(planned[-1]) if len(planned) else -1
        tags_log = np.full((K, self.replicas, w + 1), -1, np.int32)
        busy = np.zeros((K, S), np.int32)
        chunks = np.zeros((K, S), np.int32)
        seconds = 0.0
        k = 0
        while k < step.ticks and (last_planned >= k or self._pending()):
            t = self.tick
            slowest = 0.0
            for r in range(self.replicas):
                base = r * per_replica
                entering = base + (t % M) * mb + np.arange(w)
                live = self.live[entering] & (self.tag[entering] >= 0)
                self.entry_tags[t % S, r] = -1
                self.entry_tags[t % S, r, :w] = np.where(live, self.tag[entering], -1)
                row, start, length, last = (int(v) for v in step.plan_meta[r, k])
                chunk_tag = int(self.tag[base + row]) if length > 0 else -1
                self.entry_meta[t % S, r] = (chunk_tag, row, start, length, last)
                for s in range(S):
                    slowest = max(slowest, self._stage(r, s, t, w, busy[k], chunks[k]))
                self._leave(r, t, w, k, tags_log)
            cost = self.cost.tick(slowest, w)
            seconds += cost.seconds
            self.compute += cost.compute
            self.head += cost.head
            self.transfer += cost.transfer
            self.collectives += cost.collectives
            self.tick += 1
            k += 1
        zeros = np.zeros((K, self.replicas, w + 1), np.float32)
        n_top = step.kind.mode.logprobs
        log = SimpleNamespace(
            ticks=np.int32(k),
            tags=tags_log,
            tokens=np.zeros_like(tags_log),
            logprob=zeros,
            top_ids=np.zeros((K, self.replicas, w + 1, n_top), np.int32),
            top_logprobs=np.zeros((K, self.replicas, w + 1, n_top), np.float32),
            busy=busy,
            chunks=chunks,
            logits=np.zeros((K, self.replicas, 0, 0), np.float32),
            logit_meta=np.full((K, self.replicas, 5), -1, np.int32),
        )
        return log, seconds

    def _pending(self) -> bool:
        """The device loop's condition beyond the plan: rows live, or entries still riding
        (the last S - 1 entries into stage 0)."""
        recent = np.arange(self.shape.stages) != self.tick % self.shape.stages
        riding = (self.entry_tags.max(axis=2) >= 0) | (self.entry_meta[:, :, 3] > 0)
        return bool(np.any(riding[recent]) or np.any(self.live & (self.tag >= 0)))

    def _stage(self, r: int, s: int, t: int, w: int, busy: np.ndarray, chunks: np.ndarray):
        """Seconds stage s of replica r takes at tick t (0 when it has nothing to do)."""
        S, M, mb = self.shape.stages, self.shape.microbatches, self.shape.rows
        if t - s < 0:
            return 0.0
        tags = self.entry_tags[(t - s) % S, r, :w]
        meta = self.entry_meta[(t - s) % S, r]
        has_chunk = meta[3] > 0
        if not has_chunk and not np.any(tags >= 0):
            return 0.0
        busy[s] += 1
        chunks[s] += has_chunk
        rows = r * M * mb + ((t - s) % M) * mb + np.arange(w)
        keys = tuple(int(p) for p in np.where(tags >= 0, self.position[rows], 0))
        return self.cost.stage_seconds(s, w, keys, int(meta[2]) if has_chunk else None)

    def _leave(self, r: int, t: int, w: int, k: int, tags_log: np.ndarray) -> None:
        """Sample what leaves the last stage at tick t: the device's finishing rule."""
        S, M, mb = self.shape.stages, self.shape.microbatches, self.shape.rows
        if t - (S - 1) < 0:
            return
        tags = self.entry_tags[(t - S + 1) % S, r, :w]
        tag, row, start, length, last = self.entry_meta[(t - S + 1) % S, r]
        rows = r * M * mb + ((t - S + 1) % M) * mb + np.arange(w)
        live = tags >= 0
        sampled = rows[live]
        self.generated[sampled] += 1
        self.position[sampled] += 1
        done = self.generated[sampled] >= self.max_tokens[sampled]
        self.live[sampled] = ~done & (self.tag[sampled] >= 0)
        tags_log[k, r, :w] = np.where(live, tags, -1)
        if length > 0 and last:
            slot = r * M * mb + row
            self.generated[slot] = 1
            self.position[slot] = start + length
            self.live[slot] = self.max_tokens[slot] > 1 and self.tag[slot] >= 0
            tags_log[k, r, w] = tag


def replay(
    requests: Sequence[BenchRequest],
    shape: PipelineShape,
    replicas: int,
    cost: CostModel,
    eos_token_ids: tuple[int, ...],
    decode_chunk: int,
    memory_gb: float,
    log_interval: float = 5.0,
    log: Callable[[str], None] = lambda line: None,
) -> ReplayResult:
    """Serve `requests` (arrivals in seconds) in modelled time; LLM.step's loop, device
    calls priced by `cost`."""
    clock = SimpleNamespace(now=0.0)
    layout = SlotLayout(replicas, shape.microbatches, shape.rows)
    scheduler = Scheduler(
        layout, shape.chunk, shape.stages, decode_chunk, eos_token_ids, clock=lambda: clock.now
    )
    ring = RingModel(shape, replicas, cost)
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival)
    added: list[Request] = []
    device_free = busy = 0.0
    in_flight: tuple[Step, SimpleNamespace, float] | None = None
    intervals: list[dict] = []
    mark = {"t": 0.0, "tokens": 0, "prompt_tokens": 0}

    def interval() -> None:
        stats = scheduler.stats
        span = max(clock.now - mark["t"], 1e-12)
        line = {
            "t": clock.now,
            "step": stats.calls,
            "batch": scheduler.decoding,
            "queue": len(scheduler.waiting),
            "prompt_t": (stats.prompt_tokens - mark["prompt_tokens"]) / span,
            "decode_t": (stats.tokens - mark["tokens"]) / span,
            "npu_mem": memory_gb,
        }
        mark.update(t=clock.now, tokens=stats.tokens, prompt_tokens=stats.prompt_tokens)
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
            call_log, seconds = ring.run(step, scheduler.sampler)
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
