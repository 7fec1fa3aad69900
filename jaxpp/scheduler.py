"""Who decides what runs next: the host side of continuous batching. No device code here.

Each pipeline replica has `microbatches x rows` sequence rows and a pool of KV pages
(kv_pages.py). Rows are cheap (a few numbers each on the device); memory is pages. Every call
the scheduler

- grows the pages of the running requests for the tokens the call (and the next one) may
  write, oldest first; when a replica's pool runs out it preempts its newest running request
  (its pages go back, it returns to the head of the queue and is recomputed from its prompt
  plus what it had generated when it is admitted again, as vLLM does);
- fills each tick's token budget (`max_num_batched_tokens`) for the micro-batch entering at
  that tick: its decode rows first, then the unfinished prompts (oldest first), then new
  requests from the queue (first come, first served) into that micro-batch's free rows, as long
  as their pages fit. An admitted request first takes the cached pages of its longest prefix
  (kv_pages.py: the prefix cache) and plans only the rest; the pages of every prompt planned
  become findable at once, those of an answer when its request finishes. A prompt longer than
  what is left of a tick continues over the next ticks; its LAST chunk waits for its own
  micro-batch's tick (pipeline.py samples the first token there);
- picks the call's static shape from a few buckets (decode width, prompt slots, attention
  items, rounds: `StepKind`), so the compiled programs are a fixed set;
- reads each call's log: appends every sampled token to its request (found by its tag),
  applies the device's stop rule, checks stop strings (a callback: only the engine has the
  tokenizer), frees the rows and pages of finished requests and hands them back at once.

Calls overlap with the host's work (engine.py dispatches call n+1 before it reads call n's
log), so the scheduler plans call n+1 knowing the results of call n-1 only. That is safe by
construction: a request the host believes running may have finished on the device (its pages
are unused until the host learns it), and the pages it grows are bounded by what the device
can write (one position per round per decoding row). A request the host stops itself (stop
string, abort, preemption) is withdrawn by tagging its row -1; its row and pages are reused
only in the call after the one that carried the withdrawal, when nothing of it can still be in
the ring. A request's tag names one admission: a preempted request comes back with a new tag,
so tokens of its old admission still in flight are ignored (they are recomputed, the same).
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from jaxpp.attention import QUERY_BLOCK, items_needed
from jaxpp.config import SamplingParams
from jaxpp.kv_pages import PagePool
from jaxpp.sampling import SamplerMode, host_sampler_rows, set_sampler_row, stop_token_ids

GREEDY = SamplerMode(full_vocab=False, penalties=False, logprobs=0)
MIN_WIDTH = 8  # decode rows a call computes at least (or all of a micro-batch's, if fewer)
MIN_BLOCKS = 4  # prompt query blocks a call with prompts carries at least


@dataclasses.dataclass
class Request:
    """One sequence to prefill and (unless `score`) decode."""

    id: int  # the engine's serial number for it
    prompt: list[int]
    params: SamplingParams  # max_tokens already capped so that it fits max_model_len
    seed: int
    arrival: float  # time.perf_counter() when it was added
    score: bool = False  # LLM.logits: prefill only, keep the logits of every position
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top: list[tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)
    logits: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)  # score: by start
    admitted: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    stopped_by_string: bool = False
    preemptions: int = 0
    # While admitted (one admission):
    tag: int = -1  # names this admission in the device log
    row: int | None = None
    sequence: list[int] = dataclasses.field(default_factory=list)  # prompt + tokens so far
    planned: int = 0  # tokens of `sequence` handed to the ring
    bound: int = 0  # positions it may have written by the end of the latest planned call
    decoding: bool = False  # its prompt has been planned in full: it decodes from now on
    feeds: bool = False  # it feeds a decode token in the call being planned

    @property
    def finished(self) -> bool:
        return self.finish_time is not None

    @property
    def last_position(self) -> int:
        """Positions it can ever write: its last sampled token is never fed back."""
        return len(self.prompt) + (0 if self.score else self.params.max_tokens - 1)


@dataclasses.dataclass(frozen=True)
class SlotLayout:
    """Row g of replica d, micro-batch m, row r is g = (d * M + m) * mb + r: the row arrays
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
    """The static facts a compiled step program depends on (each from a few buckets)."""

    width: int  # decode rows computed per micro-batch (w)
    prompt: int  # prompt-token slots per tick (C; 0 = decode only)
    decode_items: int  # attention items the decode rows of a micro-batch read at most
    prompt_items: int  # attention items a tick's prompt blocks read at most
    rounds: int  # ring rounds of the call: M ticks each (1 whenever prompts ride)
    mode: SamplerMode
    collect: bool  # keep the logits of every prompt position (LLM.logits)

    @property
    def tokens(self) -> int:
        """Tokens a tick runs through the layers, real or padding: w decode rows + C slots."""
        return self.width + self.prompt


@dataclasses.dataclass
class Step:
    """The inputs of one ring call, as the scheduler planned them."""

    call: int
    kind: StepKind
    start_tick: int  # the ring's tick when the call starts
    control: dict[str, np.ndarray] | None  # tag, prompt_len, generated0, sampler: if changed
    tables: np.ndarray | None  # i32 [rows, pages_per_seq]: the block tables, if changed
    tokens: np.ndarray  # i32 [replicas, M, C]: prompt tokens entering at each tick
    blocks: np.ndarray  # i32 [replicas, M, C / QUERY_BLOCK, 3]: row, start, length
    finish: np.ndarray  # i32 [replicas, M, mb]: prompt slot of each row's last prompt token
    waiting: bool  # the queue held requests when this call was planned
    held: int  # rows holding a request
    pages_in_use: int

    def prompt_arrays(self, prompt: int) -> tuple[np.ndarray, np.ndarray]:
        """`tokens` and `blocks` with room for `prompt` slots (a wider program's), the extra
        ones empty, as the planned arrays' own unused slots are."""
        extra = prompt - self.tokens.shape[2]
        if not extra:
            return self.tokens, self.blocks
        return (
            np.pad(self.tokens, ((0, 0), (0, 0), (0, extra))),
            np.pad(self.blocks, ((0, 0), (0, 0), (0, extra // QUERY_BLOCK), (0, 0))),
        )


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
    tokens: int = 0  # tokens sampled (decode tokens and first tokens)
    prompt_tokens: int = 0  # prompt tokens admitted (recomputed ones included)
    prefix_cache_hit_tokens: int = 0  # of those, found in the prefix cache (not computed)
    prefix_cache_evictions: int = 0  # cached pages given to other sequences
    peak_running: int = 0  # most rows decoding at once
    kv_blocks_peak: int = 0  # most KV pages in use at once
    preemptions: int = 0
    rows_computed: int = 0  # decode rows computed at the last stage (w per tick and replica)
    slot_ticks_held: int = 0  # sum over ticks of the rows holding a request
    queued_ticks: int = 0  # ticks run while requests were waiting
    queued_tokens: int = 0  # tokens sampled during those ticks
    queued_rows: int = 0  # rows computed during those ticks
    calls: int = 0
    start_tick: int = 0  # the ring's tick when counting began (micro-batch ids follow it)
    schedule: list[list[int]] = dataclasses.field(default_factory=list)
    work_schedule: list[list[int]] = dataclasses.field(default_factory=list)
    prompt_schedule: list[list[int]] = dataclasses.field(default_factory=list)

    TRACE = 64  # ticks recorded: micro-batch per stage (-1 idle), its tokens, prompt tokens

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
            "tokens": self.tokens,
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
            # rows that produced a token / rows computed at the last stage
            "occupancy": self.tokens / self.rows_computed if self.rows_computed else 0.0,
            "slots_held": self.slot_ticks_held / (self.ticks * slots) if self.ticks else 0.0,
            "queued_ticks": self.queued_ticks,
            "queued_occupancy": self.queued_tokens / self.queued_rows if self.queued_rows else None,
            "schedule": self.schedule,
            "work_schedule": self.work_schedule,
            "prompt_schedule": self.prompt_schedule,
        }


class _Plan:
    """The prompt tokens of one call, filled tick by tick: host arrays of pipeline.PromptPlan
    at their largest (the call keeps the prompt-slot bucket it needs)."""

    def __init__(self, layout: SlotLayout, budget: int):
        lead = (layout.replicas, layout.microbatches)
        self.blocks_max = -(-budget // QUERY_BLOCK)
        self.slots_max = self.blocks_max * QUERY_BLOCK
        self.per_replica = layout.microbatches * layout.rows
        self.tokens = np.zeros(lead + (self.slots_max,), np.int32)
        self.blocks = np.zeros(lead + (self.blocks_max, 3), np.int32)
        self.finish = np.full(lead + (layout.rows,), -1, np.int32)
        self.slots = np.zeros(lead, np.int64)  # prompt slots used per tick (whole blocks)
        self.items = np.zeros(lead, np.int64)  # attention items of those blocks

    def free_slots(self, replica: int, k: int) -> int:
        return self.slots_max - int(self.slots[replica, k])


class Scheduler:
    def __init__(
        self,
        layout: SlotLayout,
        pool: PagePool,
        token_budget: int,
        stages: int,
        max_rounds: int,
        eos_token_ids: tuple[int, ...],
        stop_check: Callable[[Request], bool] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        """`clock` stamps admission, first-token and finish times: the engine's wall clock,
        or the modelled time of `jaxpp plan`'s trace replay."""
        self.layout = layout
        self.pool = pool
        self.budget = token_budget
        self.stages = stages
        self.max_rounds = max_rounds
        self.eos_token_ids = eos_token_ids
        self.stop_check = stop_check
        self.clock = clock
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admitted, in admission order
        self.occupant: list[Request | None] = [None] * layout.slots
        self.releasing: dict[int, int] = {}  # row -> the call that carries its withdrawal
        self.active: dict[int, Request] = {}  # tag -> the admission it names
        self.tags = np.full(layout.slots, -1, np.int32)
        self.prompt_len = np.zeros(layout.slots, np.int32)
        self.generated0 = np.zeros(layout.slots, np.int32)
        self.sampler = host_sampler_rows(layout.slots)
        self.control_changed = True
        self.calls = 0
        self.tick = 0  # the ring's tick at the start of the next call
        self._next_tag = 0
        self._in_flight = (0, 0)  # prompt slots and items of entries still in the ring
        self._tail = False  # the last call may have left tokens in the ring to be sampled
        self._entry_prompt: dict[int, int] = {}  # tick -> prompt tokens entering (the trace)
        self.stats = self._fresh_stats(0)

    # --- requests in -------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def decoding(self) -> int:
        """Requests past their first token and not finished (as far as the logs have told)."""
        return sum(r.first_token_time is not None and not r.score for r in self.running)

    # --- planning a call ---------------------------------------------------------------------

    def schedule(self) -> Step | None:
        """The next call's inputs, or None when there is nothing to run."""
        call = self.calls
        self.pool.planning(call)
        for row, carrier in list(self.releasing.items()):
            if carrier < call:
                del self.releasing[row]
                self.occupant[row] = None
        # Nothing left to write and nothing left in the ring (a request whose last position
        # is planned gets its last token in a call already planned, or, with several stages,
        # in the call after the one that fed it): no call, so that no tick runs idle.
        longest = max((r.last_position - r.bound for r in self.running), default=0)
        if not (longest or self.waiting or self.releasing or self._in_flight[0] or self._tail):
            return None
        lay, M = self.layout, self.layout.microbatches
        collect = any(r.score for r in self.running) or any(r.score for r in self.waiting)
        prefilling = any(not r.decoding for r in self.running)
        # Short calls (one round) while prompts ride or wait, so that the queue is served
        # every round, and when no request has half a long call's rounds left to use.
        mixed = bool(self.waiting or prefilling or self._in_flight[0] or collect)
        rounds = self.max_rounds if not mixed and 2 * longest >= self.max_rounds else 1
        preempted = self._grow_decoding(rounds)

        plan = _Plan(lay, self.budget)
        for k in range(M if mixed else 0):
            microbatch = (self.tick + k) % M
            rooms = [self.budget - self._decode_rows(d, microbatch) for d in range(lay.replicas)]
            for request in [r for r in self.running if not r.decoding]:
                d = self._replica(request)
                rooms[d] = self._plan_chunk(request, plan, k, microbatch, rooms[d])
            if not preempted:
                self._admit(plan, k, microbatch, rooms)

        held = [row for row, r in enumerate(self.occupant) if r is not None]
        slots = max(int(plan.slots.max()), self._in_flight[0])
        items = max(int(plan.items.max()), self._in_flight[1])
        # At least MIN_WIDTH rows and MIN_BLOCKS prompt blocks: a few rows or prompt tokens
        # more cost next to nothing (their GEMMs read the same weights), a new program seconds.
        blocks = _bucket(max(-(-slots // QUERY_BLOCK), MIN_BLOCKS), plan.blocks_max)
        top = max((lay.locate(row)[2] for row in held), default=0) + 1
        width = _bucket(max(top, MIN_WIDTH), lay.rows)
        kind = StepKind(
            width=width,
            prompt=blocks * QUERY_BLOCK if slots else 0,
            # Items in whole multiples of the rows (or blocks) that read them, from the same
            # few buckets: while sequences are short, one per row and no new program.
            decode_items=width * _bucket(-(-self._decode_items() // width), 1 << 30),
            prompt_items=blocks * _bucket(-(-items // blocks), 1 << 30) if slots else 0,
            rounds=rounds,
            mode=self._mode(),
            collect=collect and bool(slots),
        )
        # Entries of the last S - 1 ticks are still in the ring when the next call starts: a
        # request writing in the last round is sampled there, and prompt slots that ride on
        # keep the next call's shapes (the same program, when it needs no more).
        self._tail = self.stages > 1 and longest >= rounds
        tail = slice(M - self.stages + 1, M) if mixed and self.stages > 1 else slice(0, 0)
        riding = bool(plan.slots[:, tail].any())
        self._in_flight = (kind.prompt, kind.prompt_items) if riding else (0, 0)
        control = None
        if self.control_changed:
            control = {
                "tag": self.tags.copy(),
                "prompt_len": self.prompt_len.copy(),
                "generated0": self.generated0.copy(),
                "sampler": {k: v.copy() for k, v in self.sampler.items()},
            }
            self.control_changed = False
        tables = self.pool.tables.copy() if self.pool.changed else None
        self.pool.changed = False
        step = Step(
            call=call,
            kind=kind,
            start_tick=self.tick,
            control=control,
            tables=tables,
            tokens=plan.tokens[:, :, : kind.prompt],
            blocks=plan.blocks[:, :, : kind.prompt // QUERY_BLOCK],
            finish=plan.finish,
            waiting=bool(self.waiting),
            held=len(held),
            pages_in_use=self.pool.in_use,
        )
        self.stats.kv_blocks_peak = max(self.stats.kv_blocks_peak, self.pool.in_use)
        self.stats.prefix_cache_evictions = self.pool.evictions - self._evictions_before
        self.calls += 1
        self.tick += rounds * M
        return step

    def _grow_decoding(self, rounds: int) -> bool:
        """Pages for what each decoding request may write in this call (one position per
        round), and if the pool allows for the next call too, oldest first. A request that
        cannot get this call's pages is preempted; when only the next call's are short, the
        newest requests of its replica are, so that their pages are back in time. Returns
        whether anything was preempted."""
        preempted = False
        for request in list(self.running):
            if not request.decoding or request.row is None:
                continue  # prefilling, or preempted a moment ago
            now = min(request.bound + rounds, request.last_position)
            ahead = min(now + self.max_rounds, request.last_position)
            request.feeds = now > request.bound  # a decode token of it enters in this call
            if self.pool.grow(request.row, ahead):
                request.bound = now
                continue
            if not self.pool.grow(request.row, now):
                self._preempt(request)
                preempted = True
                continue
            request.bound = now
            short = self.pool.pages_for(ahead) - self.pool.pages_of(request.row)
            replica = self._replica(request)
            for victim in list(reversed(self.running)):
                if short <= 0 or victim is request:
                    break
                if self._replica(victim) == replica:
                    short -= self.pool.pages_of(victim.row)
                    self._preempt(victim)
                    preempted = True
        return preempted

    def _plan_chunk(self, request: Request, plan: _Plan, k: int, microbatch: int, room: int):
        """Plan the next chunk of an unfinished prompt at tick k within `room` tokens; returns
        the room left."""
        left = len(request.sequence) - request.planned
        n = min(left, room, plan.free_slots(self._replica(request), k))
        if n == left and self.layout.locate(request.row)[1] != microbatch:
            n -= 1  # its last token rides with its own micro-batch
        end = request.planned + n
        done = end == len(request.sequence)
        ahead = min(end + self.max_rounds, request.last_position) if done else end
        if n <= 0 or not (self.pool.grow(request.row, ahead) or self.pool.grow(request.row, end)):
            return room
        self._place(request, plan, k, n)
        return room - n

    def _admit(self, plan: _Plan, k: int, microbatch: int, rooms: list[int]) -> None:
        """Admit waiting requests, first come first served, while their first chunk and its
        pages fit tick k. Each takes the lowest free row of the emptiest micro-batch of the
        emptiest replica, so that every micro-batch has work; its prompt rides at once, all of
        it when that is the entering micro-batch, else all but its last token (which rides
        at its micro-batch's turn)."""
        while self.waiting:
            row = self._free_row(plan, k, microbatch, rooms)
            if row is None:
                return
            replica, own = self.layout.locate(row)[0], self.layout.locate(row)[1] == microbatch
            request = self.waiting[0]
            sequence = request.prompt + request.tokens
            # Its last token is always computed: the first token is sampled from its logits.
            cached = (
                self.pool.lookup(replica, sequence, len(sequence) - 1) if _reuses(request) else []
            )
            self.pool.share(row, cached)
            done = len(cached) * self.pool.block_size
            n = min(len(sequence) - done, rooms[replica], plan.free_slots(replica, k))
            n -= done + n == len(sequence) and not own
            ahead = min(len(sequence) + self.max_rounds, request.last_position)
            if not self.pool.grow(row, ahead if done + n == len(sequence) else done + n):
                self.pool.release(row)
                return  # the head of the queue waits for pages, and so does the rest
            self.waiting.popleft()
            self._seat(request, row, sequence, done)
            if n:
                self._place(request, plan, k, n)
            rooms[replica] -= n

    def _free_row(self, plan: _Plan, k: int, microbatch: int, rooms: list[int]) -> int | None:
        """The lowest free row of the emptiest micro-batch (the entering one on a tie) of the
        emptiest replica that still has room at tick k."""
        lay = self.layout
        best, best_key = None, None
        for replica in range(lay.replicas):
            if rooms[replica] <= 0 or plan.free_slots(replica, k) <= 0:
                continue
            rows = [
                lay.slot(replica, m, r) for m in range(lay.microbatches) for r in range(lay.rows)
            ]
            held = sum(self.occupant[row] is not None for row in rows)
            for m in range(lay.microbatches):
                block = [lay.slot(replica, m, r) for r in range(lay.rows)]
                free = [row for row in block if self.occupant[row] is None]
                if free:
                    key = (held, len(block) - len(free), m != microbatch, free[0])
                    if best_key is None or key < best_key:
                        best, best_key = free[0], key
        return best

    def _seat(self, request: Request, row: int, sequence: list[int], cached: int) -> None:
        """Seat an admitted request in `row`, whose first `cached` positions hold the KV of a
        cached prefix already."""
        request.tag = self._next_tag
        self._next_tag += 1
        request.row = row
        request.sequence = sequence
        request.planned = request.bound = cached
        self.stats.prompt_tokens += len(sequence)
        self.stats.prefix_cache_hit_tokens += cached
        request.decoding = request.feeds = False
        request.admitted = request.admitted or self.clock()
        self.occupant[row] = request
        self.running.append(request)
        self.active[request.tag] = request
        self.tags[row] = request.tag
        self.prompt_len[row] = len(request.prompt)
        self.generated0[row] = len(request.tokens)
        params = request.params
        if request.score:  # sample nothing: the first token ends it
            params = dataclasses.replace(params, max_tokens=1, min_tokens=0)
        set_sampler_row(self.sampler, row, params, request.seed, self.eos_token_ids)
        self.control_changed = True

    def _place(self, request: Request, plan: _Plan, k: int, n: int) -> None:
        """Put the next n tokens of the request's prompt into tick k's prompt slots, as query
        blocks of one request each."""
        replica, _, local = self.layout.locate(request.row)
        start, slot = request.planned, int(plan.slots[replica, k])
        plan.tokens[replica, k, slot : slot + n] = request.sequence[start : start + n]
        for i in range(0, n, QUERY_BLOCK):
            length = min(QUERY_BLOCK, n - i)
            row = request.row - replica * plan.per_replica
            plan.blocks[replica, k, (slot + i) // QUERY_BLOCK] = (row, start + i, length)
            last = start + i + length - 1
            plan.items[replica, k] += items_needed(0, last, self.pool.block_size, "prompt")
        plan.slots[replica, k] += _padded(n)
        self._entry_prompt[self.tick + k] = self._entry_prompt.get(self.tick + k, 0) + n
        request.planned = request.bound = start + n
        self.pool.publish(request.row, request.sequence, request.planned)
        if request.planned == len(request.sequence):
            plan.finish[replica, k, local] = slot + n - 1
            request.decoding, request.feeds = True, False

    def _decode_rows(self, replica: int, microbatch: int) -> int:
        """Rows of that micro-batch that may feed a decode token at its tick."""
        lay = self.layout
        rows = (self.occupant[lay.slot(replica, microbatch, r)] for r in range(lay.rows))
        return sum(r is not None and r.feeds and r.row is not None for r in rows)

    def _decode_items(self) -> int:
        """Attention items of the decode rows of the busiest micro-batch: each row reads
        positions 0 .. (what it may have written by the end of the call) - 1."""
        per_microbatch: dict[tuple[int, int], int] = {}
        for request in self.running:
            if request.decoding and request.row is not None:
                key = self.layout.locate(request.row)[:2]
                need = items_needed(0, request.bound - 1, self.pool.block_size, "decode")
                per_microbatch[key] = per_microbatch.get(key, 0) + need
        return max(per_microbatch.values(), default=0)

    def _replica(self, request: Request) -> int:
        return self.layout.locate(request.row)[0]

    def _mode(self) -> SamplerMode:
        decoding = [r.params for r in self.running if not r.score]
        return SamplerMode.of(decoding) if decoding else GREEDY

    def idle_step(self, kind: StepKind) -> Step:
        """A call whose shapes are `kind`'s and whose rows are all idle: it compiles the
        program of `kind` and runs its ticks on padding."""
        lay = self.layout
        lead = (lay.replicas, lay.microbatches)
        return Step(
            call=-1,
            kind=kind,
            start_tick=self.tick,
            control=None,
            tables=None,
            tokens=np.zeros(lead + (kind.prompt,), np.int32),
            blocks=np.zeros(lead + (kind.prompt // QUERY_BLOCK, 3), np.int32),
            finish=np.full(lead + (lay.rows,), -1, np.int32),
            waiting=False,
            held=0,
            pages_in_use=self.pool.in_use,
        )

    # --- reading a call's log ----------------------------------------------------------------

    def update(self, step: Step, log) -> list[Request]:
        """Apply a finished call's log (host numpy arrays of pipeline.StepLog); return the
        requests that finished."""
        now = self.clock()
        finished: list[Request] = []
        self._count(step, log)
        for k, replica, column in zip(*np.nonzero(log.tags >= 0), strict=True):
            request = self.active.get(int(log.tags[k, replica, column]))
            if request is None or request.score:
                continue
            self._append(request, log, k, replica, column, now)
            if request.finished:
                finished.append(request)
        if step.kind.collect:
            for k, replica, b in zip(*np.nonzero(log.logit_blocks[..., 2] > 0), strict=True):
                tag, start, length = (int(v) for v in log.logit_blocks[k, replica, b])
                request = self.active.get(tag)
                if request is None or not request.score:
                    continue
                at = b * QUERY_BLOCK
                request.logits[start] = np.asarray(log.logits[k, replica, at : at + length])
                if sum(len(v) for v in request.logits.values()) == len(request.prompt):
                    request.first_token_time = now
                    self._finish(request, now)
                    finished.append(request)
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
        # The device's rule, to the letter: it has stopped the row on exactly these.
        if (token in stops and n > p.min_tokens) or n >= p.max_tokens:
            self._finish(request, now)
        elif p.stop and self.stop_check is not None and self.stop_check(request):
            request.stopped_by_string = True
            self._finish(request, now, withdraw=True)

    def abort(self, ids: set[int]) -> None:
        """Forget requests (after an error in the caller): drop the queued, withdraw the rest."""
        self.waiting = deque(r for r in self.waiting if r.id not in ids)
        now = self.clock()
        for request in [r for r in self.running if r.id in ids]:
            self._finish(request, now, withdraw=True)

    def _finish(self, request: Request, now: float, withdraw: bool = False) -> None:
        request.finish_time = now
        self._unseat(request, withdraw)

    def _preempt(self, request: Request) -> None:
        """Withdraw a running request now and queue it first: it is prefilled again, from its
        prompt and the tokens it has, when pages free up."""
        request.preemptions += 1
        request.logits.clear()
        self.stats.preemptions += 1
        self._unseat(request, withdraw=True)
        self.waiting.appendleft(request)

    def _unseat(self, request: Request, withdraw: bool) -> None:
        self.running.remove(request)
        del self.active[request.tag]
        row = request.row
        request.row = None
        self.tags[row] = -1
        self.control_changed = True
        if withdraw:  # the device may still run it in the call that carries the withdrawal
            self.releasing[row] = self.calls
            self.pool.release(row, after=self.calls)
        else:
            # Finished on the device: every position but the last token's holds its KV.
            sequence = request.prompt + request.tokens
            self.pool.publish(row, sequence, len(sequence) - 1)
            self.occupant[row] = None
            self.pool.release(row)

    def _count(self, step: Step, log) -> None:
        s = self.stats
        s.calls += 1
        K = log.tags.shape[0]
        tokens = int(np.sum(log.tags >= 0))
        s.ticks += K
        s.busy += int(np.sum(log.work > 0))
        s.work += int(np.sum(log.work))
        s.tokens += tokens
        s.peak_running = max(s.peak_running, int(log.live.sum(axis=1).max(initial=0)))
        rows = log.tags.size  # K x replicas x w
        s.rows_computed += rows
        s.slot_ticks_held += step.held * K
        if step.waiting:
            s.queued_ticks += K
            s.queued_tokens += tokens
            s.queued_rows += rows
        M = self.layout.microbatches
        for k in range(min(K, RunStats.TRACE - len(s.schedule))):
            t = step.start_tick + k
            stages = range(self.stages)
            s.schedule.append([(t - q) % M if log.work[k, q] else -1 for q in stages])
            s.work_schedule.append([int(log.work[k, q]) for q in stages])
            s.prompt_schedule.append([self._entry_prompt.get(t - q, 0) for q in stages])
        for t in [t for t in self._entry_prompt if t < step.start_tick + K - self.stages]:
            del self._entry_prompt[t]

    def _fresh_stats(self, start_tick: int) -> RunStats:
        lay = self.layout
        self._evictions_before = self.pool.evictions
        return RunStats(
            self.stages,
            lay.microbatches,
            lay.replicas,
            lay.rows,
            kv_blocks_total=self.pool.total,
            start_tick=start_tick,
        )

    def reset_stats(self) -> None:
        self.stats = self._fresh_stats(self.tick)


def _reuses(request: Request) -> bool:
    """Whether a request may start from a cached prefix: not one that asks for the logits of
    every prompt position (LLM.logits), nor one whose penalties count the prompt's tokens as
    they enter the ring."""
    return not (request.score or request.params.penalized)


def _padded(n: int) -> int:
    return -(-n // QUERY_BLOCK) * QUERY_BLOCK


def _bucket(n: int, limit: int) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, ... (powers of two and 1.5x powers of two)
    that holds n, at most `limit`: a handful of compiled sizes, none above 1.5x what is needed."""
    size = 1
    while size < n:
        power_of_two = size & (size - 1) == 0
        size = size * 2 if size == 1 else size * 3 // 2 if power_of_two else size * 4 // 3
    return min(size, limit)


def widths(rows: int) -> list[int]:
    """Every decode width a call may use."""
    return sorted({_bucket(n, rows) for n in range(1, rows + 1)})
