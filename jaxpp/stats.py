"""Run statistics: the schedule as it ran, counted from the calls' logs and plans."""

from __future__ import annotations

import dataclasses

import numpy as np

TRACE = 64  # ticks recorded: micro-batch per stage (-1 idle), its tokens, prompt tokens


@dataclasses.dataclass
class RunStats:
    """Counted from the calls' logs and plans: the schedule as it ran, and how full it was."""

    stages: int
    microbatches: int
    replicas: int
    rows: int
    kv_blocks_total: int
    ticks: int = 0
    busy: int = 0  # stage-ticks that did work, summed over stages and replicas
    work: int = 0  # tokens computed over those stage-ticks
    tokens: int = 0  # rows sampled (a decode token or a first token each)
    # Speculative decoding (vLLM's spec_decode counters): rows verified with drafts, their
    # drafts, the drafts accepted, and accepted by draft position.
    spec_drafts: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_accepted_per_position: list[int] = dataclasses.field(default_factory=list)
    prompt_tokens: int = 0  # prompt tokens admitted (recomputed ones included)
    prefix_cache_hit_tokens: int = 0  # of those, found in the prefix cache (not computed)
    prefix_cache_evictions: int = 0  # cached pages given to other sequences
    peak_running: int = 0  # most rows decoding at once
    kv_blocks_peak: int = 0  # most KV pages in use at once
    preemptions: int = 0
    rows_computed: int = 0  # rows a tick could sample (decode slots and prompts ending)
    slots_computed: int = 0  # token slots the programs ran, real or padding
    slot_ticks_held: int = 0  # sum over ticks of the rows holding a request
    queued_ticks: int = 0  # ticks run while requests were waiting
    queued_tokens: int = 0  # tokens sampled during those ticks
    queued_rows: int = 0  # rows computed during those ticks
    calls: int = 0
    start_tick: int = 0  # the ring's tick when counting began (micro-batch ids follow it)
    buckets: dict[int, int] = dataclasses.field(default_factory=dict)  # ticks per bucket
    schedule: list[list[int]] = dataclasses.field(default_factory=list)
    work_schedule: list[list[int]] = dataclasses.field(default_factory=list)
    prompt_schedule: list[list[int]] = dataclasses.field(default_factory=list)

    def count(self, call, log, entering: dict[int, int]) -> None:
        """Add a finished call (scheduler.Call) and its log (host arrays of pipeline.StepLog,
        the call's ticks first); `entering`: prompt tokens entering stage 0 per ring tick."""
        K = call.ticks
        tags = log.tags[:K]
        per_stage = log.work[:K].sum(axis=1)  # [K, stages], over replicas
        sampled = int(np.sum(tags >= 0))
        self.calls += 1
        self.ticks += K
        self.busy += int(np.sum(log.work[:K] > 0))
        self.work += int(np.sum(log.work[:K]))
        self.tokens += sampled
        self._count_drafts(log, tags >= 0)
        self.peak_running = max(self.peak_running, int(log.live[:K].sum(axis=1).max(initial=0)))
        rows = sum(call.candidates[k % len(call.candidates)] for k in range(K))
        self.rows_computed += rows
        self.slots_computed += sum(call.buckets[:K]) * self.replicas
        for bucket in call.buckets[:K]:
            self.buckets[bucket] = self.buckets.get(bucket, 0) + 1
        self.slot_ticks_held += call.held * K
        if call.waiting:
            self.queued_ticks += K
            self.queued_tokens += sampled
            self.queued_rows += rows
        M = self.microbatches
        for k in range(min(K, TRACE - len(self.schedule))):
            t = call.start_tick + k
            stages = range(self.stages)
            self.schedule.append([(t - q) % M if per_stage[k, q] else -1 for q in stages])
            self.work_schedule.append([int(per_stage[k, q]) for q in stages])
            self.prompt_schedule.append([entering.get(t - q, 0) for q in stages])

    def _count_drafts(self, log, sampled: np.ndarray) -> None:
        """Add the drafts verified in a call's log (none when the engine does not speculate)."""
        drafts = log.drafts[: len(sampled)]
        if drafts.shape[-1] == 0:
            return
        proposed = np.where(sampled, (drafts >= 0).sum(-1), 0)
        accepted = np.where(sampled, log.accepted[: len(sampled)], 0)
        self.spec_drafts += int((proposed > 0).sum())
        self.spec_draft_tokens += int(proposed.sum())
        self.spec_accepted_tokens += int(accepted.sum())
        width = drafts.shape[-1]
        if not self.spec_accepted_per_position:
            self.spec_accepted_per_position = [0] * width
        for j in range(width):
            self.spec_accepted_per_position[j] += int((accepted > j).sum())

    def spec_decode(self) -> dict | None:
        """Speculation's figures (None when nothing was drafted): vLLM's acceptance rate
        (accepted / drafted tokens) and mean acceptance length (1 + accepted / drafts)."""
        if not self.spec_draft_tokens:
            return None
        return {
            "num_drafts": self.spec_drafts,
            "num_draft_tokens": self.spec_draft_tokens,
            "num_accepted_tokens": self.spec_accepted_tokens,
            "accepted_per_position": self.spec_accepted_per_position,
            "acceptance_rate": self.spec_accepted_tokens / self.spec_draft_tokens,
            "mean_acceptance_length": 1 + self.spec_accepted_tokens / self.spec_drafts,
            "draft_tokens_per_tick": self.spec_draft_tokens / self.ticks if self.ticks else 0.0,
        }

    def as_dict(self) -> dict:
        slots = self.replicas * self.rows * self.microbatches
        stage_ticks = self.ticks * self.stages * self.replicas
        return {
            "stages": self.stages,
            "microbatches": self.microbatches,
            "calls": self.calls,
            "start_tick": self.start_tick,
            "ticks": self.ticks,
            "busy_stage_ticks": self.busy / self.replicas,
            "bubble_fraction": 1 - self.busy / stage_ticks if self.ticks else 0.0,
            "tokens_per_busy_stage_tick": self.work / self.busy if self.busy else 0.0,
            "tokens": self.tokens + self.spec_accepted_tokens,
            "prompt_tokens": self.prompt_tokens,
            "prefix_cache_hit_tokens": self.prefix_cache_hit_tokens,
            "prefix_cache_hit_rate": (
                self.prefix_cache_hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
            ),
            "prefix_cache_evictions": self.prefix_cache_evictions,
            "peak_running": self.peak_running,
            "kv_blocks_total": self.kv_blocks_total,
            "kv_blocks_peak": self.kv_blocks_peak,
            "preemptions": self.preemptions,
            # rows that produced a token / rows a tick could sample
            "occupancy": self.tokens / self.rows_computed if self.rows_computed else 0.0,
            # real tokens / token slots computed (the rest is bucket padding and idle stages)
            "slot_fill": self.work / (self.slots_computed * self.stages)
            if self.slots_computed
            else 0.0,
            "slots_held": self.slot_ticks_held / (self.ticks * slots) if self.ticks else 0.0,
            "queued_ticks": self.queued_ticks,
            "queued_occupancy": self.queued_tokens / self.queued_rows if self.queued_rows else None,
            "buckets": dict(sorted(self.buckets.items())),
            "schedule": self.schedule,
            "work_schedule": self.work_schedule,
            "prompt_schedule": self.prompt_schedule,
            "spec_decode": self.spec_decode(),
        }
