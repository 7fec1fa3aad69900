"""Who decides what runs next: the host side of continuous batching. No device code here.

The engine has a fixed set of sequence slots: `replicas x microbatches x rows` (dp x M x mb),
each with its own KV rows on the device. The scheduler

- keeps the waiting queue (first come, first served) and admits a request into a free slot the
  moment one exists, balancing replicas and micro-batches and filling rows from the lowest, so
  that the decode width (the rows a micro-batch computes) stays small when few slots are busy;
- cuts each admitted prompt into chunks of at most `chunk` tokens and hands them to its replica's
  chunk lane, one chunk per tick, in admission order (`ChunkPlan` rows of the next call);
- reads each call's log: appends every sampled token to its request (found by its tag), applies
  the same stop rule as the device (stop token after min_tokens, token budget), checks stop
  strings (a callback: only the engine has the tokenizer), and frees the slot;
- hands back each finished request at once.

Calls overlap with the host's work (engine.py dispatches call n+1 before it reads call n's log),
so the scheduler plans call n+1 knowing the results of call n-1 only. That is safe by
construction: a slot the host believes busy may have finished on the device already (it idles,
then is refilled a call later), and a slot the host frees has finished on the device. A request
the host stops itself (a stop string) is withdrawn by tagging its slot -1; the slot is reused
only after the first call that carried the withdrawal has come back, when nothing of the old
request can still be riding the ring.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from jaxpp.config import SamplingParams
from jaxpp.sampling import SamplerMode, host_sampler_rows, set_sampler_row, stop_token_ids

GREEDY = SamplerMode(full_vocab=False, penalties=False, logprobs=0)


@dataclasses.dataclass
class Request:
    """One sequence to prefill and (unless `score`) decode."""

    tag: int  # the engine's serial number for it; names it in the device log
    prompt: list[int]
    params: SamplingParams  # max_tokens already capped so that it fits max_model_len
    seed: int
    arrival: float  # time.perf_counter() when it was added
    score: bool = False  # LLM.logits: prefill only, keep the logits of every position
    slot: int | None = None
    planned: int = 0  # prompt tokens handed to the chunk lane so far
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top: list[tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)
    logits: list[np.ndarray] = dataclasses.field(default_factory=list)  # score: per chunk
    admitted: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    stopped_by_string: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_time is not None


@dataclasses.dataclass(frozen=True)
class SlotLayout:
    """Slot g of replica d, micro-batch m, row r is g = (d * M + m) * mb + r: the slot arrays
    are split over replicas in contiguous blocks (the "data" mesh axis) and a micro-batch's
    rows are contiguous, so the device reads them as one slice."""

    replicas: int
    microbatches: int
    rows: int

    @property
    def slots(self) -> int:
        return self.replicas * self.microbatches * self.rows

    def locate(self, slot: int) -> tuple[int, int, int]:
        block, row = divmod(slot, self.rows)
        replica, microbatch = divmod(block, self.microbatches)
        return replica, microbatch, row

    def slot(self, replica: int, microbatch: int, row: int) -> int:
        return (replica * self.microbatches + microbatch) * self.rows + row


@dataclasses.dataclass(frozen=True)
class StepKind:
    """The static facts a compiled step program depends on (a fixed, small set)."""

    width: int  # decode rows computed per micro-batch (0 = prompts only)
    mode: SamplerMode
    collect: bool  # keep the logits of every prompt position (LLM.logits)


@dataclasses.dataclass
class Step:
    """The inputs of one ring call, as the scheduler planned them."""

    call: int
    ticks: int  # ticks to run (at most the log's size)
    kind: StepKind
    tags: np.ndarray | None  # i32 [slots] when the slot control changed since the last call
    plan_tokens: np.ndarray  # i32 [replicas, K, C]
    plan_meta: np.ndarray  # i32 [replicas, K, 4]: row, start, length, last
    waiting: bool  # the queue held requests when this call was planned
    held: int  # slots holding a request


@dataclasses.dataclass
class RunStats:
    """Counted from the calls' logs: the schedule as it ran, and how full it was."""

    stages: int
    microbatches: int
    replicas: int
    rows: int
    ticks: int = 0
    busy: int = 0  # stage-ticks that did work, summed over stages and replicas
    chunk_ticks: int = 0  # stage-ticks that carried a prompt chunk
    tokens: int = 0  # tokens sampled (decode rows and first tokens)
    prompt_tokens: int = 0  # prompt tokens that entered the ring in chunks
    slot_ticks_held: int = 0  # sum over ticks of the slots holding a request
    queued_ticks: int = 0  # ticks run while requests were waiting for a slot
    queued_tokens: int = 0  # tokens sampled during those ticks
    queued_slot_ticks_held: int = 0
    calls: int = 0
    start_tick: int = 0  # the ring's tick when counting began (micro-batch ids follow it)
    schedule: list[list[int]] = dataclasses.field(default_factory=list)
    chunk_schedule: list[list[int]] = dataclasses.field(default_factory=list)

    TRACE = 64  # ticks recorded: micro-batch per stage (-1 idle), and 1 where a chunk rode

    def as_dict(self) -> dict:
        per_tick = self.replicas * self.rows  # decode rows leaving the last stage per tick
        slots = per_tick * self.microbatches
        return {
            "stages": self.stages,
            "microbatches": self.microbatches,
            "calls": self.calls,
            "start_tick": self.start_tick,
            "ticks": self.ticks,
            "busy_stage_ticks": self.busy / self.replicas,
            "bubble_fraction": 1 - self.busy / (self.ticks * self.stages * self.replicas)
            if self.ticks
            else 0.0,
            "chunk_stage_ticks": self.chunk_ticks / self.replicas,
            "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens,
            # decode rows that produced a token / decode rows that left the last stage
            "occupancy": self.tokens / (self.ticks * per_tick) if self.ticks else 0.0,
            "slots_held": self.slot_ticks_held / (self.ticks * slots) if self.ticks else 0.0,
            "queued_ticks": self.queued_ticks,
            "queued_occupancy": self.queued_tokens / (self.queued_ticks * per_tick)
            if self.queued_ticks
            else None,
            "queued_slots_held": self.queued_slot_ticks_held / (self.queued_ticks * slots)
            if self.queued_ticks
            else None,
            "schedule": self.schedule,
            "chunk_schedule": self.chunk_schedule,
        }


class Scheduler:
    def __init__(
        self,
        layout: SlotLayout,
        chunk: int,
        stages: int,
        max_rounds: int,
        eos_token_ids: tuple[int, ...],
        stop_check: Callable[[Request], bool] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        """`clock` stamps admission, first-token and finish times: the engine's wall clock,
        or the modelled time of `jaxpp plan`'s trace replay."""
        self.layout = layout
        self.chunk = chunk
        self.stages = stages
        self.max_rounds = max_rounds
        self.max_ticks = max_rounds * layout.microbatches
        self.eos_token_ids = eos_token_ids
        self.stop_check = stop_check
        self.clock = clock
        self.waiting: deque[Request] = deque()
        self.prefill: list[deque[Request]] = [deque() for _ in range(layout.replicas)]
        self.occupant: list[Request | None] = [None] * layout.slots
        self.releasing: dict[int, int] = {}  # slot -> call whose log frees it
        self.active: dict[int, Request] = {}  # tag -> admitted, unfinished request
        self.tags = np.full(layout.slots, -1, np.int32)
        self.sampler = host_sampler_rows(layout.slots)
        self.control_changed = True
        self.calls = 0
        self.tick = 0  # the ring's global tick, as far as the logs have told
        self.stats = RunStats(stages, layout.microbatches, layout.replicas, layout.rows)

    # --- requests in -------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def unfinished(self) -> bool:
        return bool(self.waiting or self.active)

    @property
    def decoding(self) -> int:
        """Requests past their first token and not finished (as far as the logs have told)."""
        return sum(r.first_token_time is not None and not r.score for r in self.active.values())

    # --- planning a call ---------------------------------------------------------------------

    def schedule(self) -> Step | None:
        """The next call's inputs, or None when there is nothing to run."""
        self._admit()
        if not self.active and not self.releasing:
            return None
        kind = self._kind()
        # Calls collecting logits run one round (pipeline.py: their log is that long). While
        # requests wait for a slot, which only the end of a call can free, or prompts wait for
        # the chunk lane, a call runs as many rounds as the queued chunks need (at least one):
        # admission stays quick and a stream of short prompts still enters one chunk per tick
        # (one tick per call made 400 one-token requests run 31 ms of host and device overhead
        # each). Once everything is decoding, the longest calls cost the host least.
        M = self.layout.microbatches
        chunks = max(
            (sum(-(-(len(r.prompt) - r.planned) // self.chunk) for r in q) for q in self.prefill),
            default=0,
        )
        if kind.collect:
            rounds = 1
        elif self.waiting or chunks:
            rounds = min(self.max_rounds, max(1, -(-chunks // M)))
        else:
            rounds = self.max_rounds
        ticks = rounds * M
        tokens = np.zeros((self.layout.replicas, self.max_ticks, self.chunk), np.int32)
        meta = np.zeros((self.layout.replicas, self.max_ticks, 4), np.int32)
        for replica, queue in enumerate(self.prefill):
            for k in range(ticks):
                if not queue:
                    break
                request = queue[0]
                start = request.planned
                piece = request.prompt[start : start + self.chunk]
                end = start + len(piece)
                _, microbatch, row = self.layout.locate(request.slot)
                local = microbatch * self.layout.rows + row
                tokens[replica, k, : len(piece)] = piece
                meta[replica, k] = (local, start, len(piece), end == len(request.prompt))
                request.planned = end
                if end == len(request.prompt):
                    queue.popleft()
        held = sum(r is not None for r in self.occupant)
        step = Step(
            call=self.calls,
            ticks=ticks,
            kind=kind,
            tags=self.tags.copy() if self.control_changed else None,
            plan_tokens=tokens,
            plan_meta=meta,
            waiting=bool(self.waiting),
            held=held,
        )
        self.control_changed = False
        self.calls += 1
        return step

    def idle_step(self, kind: StepKind) -> Step:
        """A call that runs no tick: compiling the program of `kind` is all it does."""
        shape = (self.layout.replicas, self.max_ticks)
        return Step(
            call=-1,
            ticks=0,
            kind=kind,
            tags=None,
            plan_tokens=np.zeros(shape + (self.chunk,), np.int32),
            plan_meta=np.zeros(shape + (4,), np.int32),
            waiting=False,
            held=0,
        )

    def widths(self) -> list[int]:
        """Every decode width a call may use (see _width_bucket)."""
        return sorted(
            {_width_bucket(rows, self.layout.rows) for rows in range(1, self.layout.rows + 1)}
        )

    def _admit(self) -> None:
        now = self.clock()
        while self.waiting:
            slot = self._free_slot()
            if slot is None:
                return
            request = self.waiting.popleft()
            request.slot = slot
            request.admitted = now
            self.occupant[slot] = request
            self.active[request.tag] = request
            self.prefill[self.layout.locate(slot)[0]].append(request)
            self.tags[slot] = request.tag
            params = request.params
            if request.score:  # sample nothing: the first token ends it
                params = dataclasses.replace(params, max_tokens=1, min_tokens=0)
            set_sampler_row(self.sampler, slot, params, request.seed, self.eos_token_ids)
            self.control_changed = True

    def _free_slot(self) -> int | None:
        """The lowest free row of the emptiest micro-batch of the emptiest replica."""
        lay = self.layout
        per_replica = lay.microbatches * lay.rows
        best, best_key = None, None
        for replica in range(lay.replicas):
            base = replica * per_replica
            block = self.occupant[base : base + per_replica]
            replica_free = block.count(None)
            for microbatch in range(lay.microbatches if replica_free else 0):
                rows = block[microbatch * lay.rows : (microbatch + 1) * lay.rows]
                free = rows.count(None)
                if not free:
                    continue
                row = rows.index(None)
                key = (-replica_free, -free, row)
                if best_key is None or key < best_key:
                    best, best_key = base + microbatch * lay.rows + row, key
        return best

    def _kind(self) -> StepKind:
        held = [r for r in self.occupant if r is not None]
        decoding = [r.params for r in held if not r.score]
        rows = [self.layout.locate(r.slot)[2] for r in held if not r.score]
        width = _width_bucket(max(rows) + 1, self.layout.rows) if rows else 0
        mode = SamplerMode.of(decoding) if decoding else GREEDY
        return StepKind(width, mode, collect=any(r.score for r in held))

    # --- reading a call's log ----------------------------------------------------------------

    def update(self, step: Step, log) -> list[Request]:
        """Apply a finished call's log (host numpy arrays of pipeline.StepLog); return the
        requests that finished."""
        now = self.clock()
        finished: list[Request] = []
        ticks = int(log.ticks)
        self._count(step, log, ticks)
        for k, replica, column in zip(*np.nonzero(log.tags[:ticks] >= 0), strict=True):
            request = self.active.get(int(log.tags[k, replica, column]))
            if request is None or request.score:
                continue
            self._append(request, log, k, replica, column, now)
            if request.finished:
                finished.append(request)
        if step.kind.collect:
            for k, replica in zip(*np.nonzero(log.logit_meta[:ticks, :, 3] > 0), strict=True):
                tag, _, start, length, _ = (int(v) for v in log.logit_meta[k, replica])
                request = self.active.get(tag)
                if request is None:
                    continue
                request.logits.append(np.asarray(log.logits[k, replica, :length]))
                if start + length == len(request.prompt):
                    request.first_token_time = now
                    self._finish(request, now)
                    finished.append(request)
        for slot, call in list(self.releasing.items()):
            if call <= step.call:
                del self.releasing[slot]
                self.occupant[slot] = None
        self.tick += ticks
        return finished

    def _append(self, request: Request, log, k, replica, column, now: float) -> None:
        token = int(log.tokens[k, replica, column])
        request.tokens.append(token)
        if request.params.logprobs is not None:
            request.logprobs.append(float(log.logprob[k, replica, column]))
            request.top.append(
                (log.top_ids[k, replica, column], log.top_logprobs[k, replica, column])
            )
        if request.first_token_time is None:
            request.first_token_time = now
        p = request.params
        n = len(request.tokens)
        stops = stop_token_ids(p, self.eos_token_ids)
        # The device's rule, to the letter: it has stopped the slot on exactly these.
        if (token in stops and n > p.min_tokens) or n >= p.max_tokens:
            self._finish(request, now)
        elif p.stop and self.stop_check is not None and self.stop_check(request):
            request.stopped_by_string = True
            self._finish(request, now, withdraw=True)

    def abort(self, tags: set[int]) -> None:
        """Forget requests (after an error in the caller): drop the queued, withdraw the rest."""
        self.waiting = deque(r for r in self.waiting if r.tag not in tags)
        now = self.clock()
        for tag in tags:
            request = self.active.get(tag)
            if request is not None:
                for queue in self.prefill:
                    if request in queue:
                        queue.remove(request)
                self._finish(request, now, withdraw=True)

    def _finish(self, request: Request, now: float, withdraw: bool = False) -> None:
        request.finish_time = now
        del self.active[request.tag]
        slot = request.slot
        self.tags[slot] = -1
        self.control_changed = True
        if withdraw:  # the device may still run it: free the slot once the withdrawal is seen
            self.releasing[slot] = self.calls
        else:
            self.occupant[slot] = None

    def _count(self, step: Step, log, ticks: int) -> None:
        s = self.stats
        s.calls += 1
        tokens = int(np.sum(log.tags[:ticks] >= 0))
        s.ticks += ticks
        s.busy += int(np.sum(log.busy[:ticks]))
        s.chunk_ticks += int(np.sum(log.chunks[:ticks]))
        s.tokens += tokens
        s.prompt_tokens += int(np.sum(step.plan_meta[:, :ticks, 2]))
        s.slot_ticks_held += step.held * ticks
        if step.waiting:
            s.queued_ticks += ticks
            s.queued_tokens += tokens
            s.queued_slot_ticks_held += step.held * ticks
        for k in range(min(ticks, RunStats.TRACE - len(s.schedule))):
            t = self.tick + k
            s.schedule.append(
                [
                    (t - stage) % self.layout.microbatches if log.busy[k, stage] else -1
                    for stage in range(self.stages)
                ]
            )
            s.chunk_schedule.append([int(c > 0) for c in log.chunks[k]])

    def reset_stats(self) -> None:
        self.stats = RunStats(
            self.stages,
            self.layout.microbatches,
            self.layout.replicas,
            self.layout.rows,
            start_tick=self.tick,
        )


def _width_bucket(rows: int, limit: int) -> int:
    """Decode rows to compute: the next power of two (a handful of compiled programs)."""
    width = 1
    while width < rows:
        width *= 2
    return min(width, limit)
