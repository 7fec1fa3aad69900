"""Who decides what runs next: the host side of continuous batching. No device code here.

Each pipeline replica has `microbatches x rows` sequence rows and a pool of KV pages
(kv_pages.py). Rows are cheap (a few numbers each on the device); memory is pages. Every call
the scheduler

- grows the pages of the running requests for the tokens the call (and the next one) may
  write, oldest first; when a replica's pool runs out it preempts its newest running request
  (its pages go back, it returns to the head of the queue and is recomputed from its prompt
  plus what it had generated when it is admitted again, as vLLM does);
- picks each tick's token bucket (batch.py: the largest of a few sizes that the micro-batch's
  decode rows and the prompt work at hand fill, within `max_num_batched_tokens`; with S stages
  1/S of that work, so that the S entries in flight stay even) and fills it
  for the micro-batch entering at that tick: its decode rows first, then the unfinished prompts
  (oldest first), then new requests from the queue (first come, first served) into that
  micro-batch's free rows, as long as their pages fit. An admitted request first takes the
  cached pages of its longest prefix (kv_pages.py: the prefix cache) and plans only the rest;
  the pages of every prompt planned become findable at once, those of an answer when its
  request finishes. A prompt longer than what is left of a tick continues over the next
  ticks; its LAST chunk waits for its own micro-batch's tick (pipeline.py samples the first
  token there);
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
import math
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from jaxpp.attention import QUERY_BLOCK
from jaxpp.batch import Buckets, Chunk, TickBatch, TickPlan, pack
from jaxpp.config import SamplingParams
from jaxpp.grammar import Automaton
from jaxpp.kv_pages import PagePool
from jaxpp.sampling import SamplerMode, host_sampler_rows, set_sampler_row, stop_token_ids
from jaxpp.stats import RunStats

GREEDY = SamplerMode(full_vocab=False, penalties=False, logprobs=0)


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
    # LLM.logits and prompt_logprobs: the logits of its prompt positions, by chunk start.
    logits: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
    admitted: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    stopped_by_string: bool = False
    preemptions: int = 0
    # Structured outputs: its automaton, where the device pool holds it (its first state's id)
    # and its state after `tokens` (the host walks it as the device does).
    automaton: Automaton | None = None
    grammar_base: int = -1
    grammar_state: int = 0
    # While admitted (one admission):
    tag: int = -1  # names this admission in the device log
    row: int | None = None
    sequence: list[int] = dataclasses.field(default_factory=list)  # prompt + tokens so far
    planned: int = 0  # tokens of `sequence` handed to the ring
    bound: int = 0  # positions it may have written by the end of the latest planned call
    decoding: bool = False  # its prompt has been planned in full: it decodes from now on
    feeds: bool = False  # it feeds a decode token in the call being planned
    drafted: bool = False  # it had draft slots: `bound` is only an upper bound from then on

    @property
    def finished(self) -> bool:
        return self.finish_time is not None

    @property
    def grammar_complete(self) -> bool:
        """Its automaton has no way on: the output is complete (the device stopped it)."""
        return self.automaton is not None and bool(self.automaton.terminal[self.grammar_state])

    @property
    def collecting(self) -> bool:
        """It keeps the logits of its prompt positions (LLM.logits, prompt_logprobs) and some
        of them have not come back yet."""
        wanted = self.score or self.params.prompt_logprobs is not None
        return wanted and sum(len(v) for v in self.logits.values()) < len(self.prompt)

    @property
    def last_position(self) -> int:
        """Positions it can ever write: its last sampled token is never fed back."""
        return len(self.prompt) + (0 if self.score else self.params.max_tokens - 1)

    @property
    def drafts_ok(self) -> bool:
        """It may speculate: as in vLLM, not with logprobs or penalties (nor a constraint)."""
        p = self.params
        return not (self.score or p.logprobs is not None or p.penalized or self.automaton)


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


@dataclasses.dataclass
class Call:
    """The inputs of one call: `rounds` x M ticks, each dispatched as a forward and a sample
    program (pipeline.py), as the scheduler planned them."""

    number: int
    start_tick: int  # the ring's tick when the call starts
    rounds: int
    batches: list[TickBatch]  # host arrays of each tick (rounds x M; later rounds repeat)
    candidates: list[int]  # per tick of a round: rows it can sample, over replicas (stats)
    mode: SamplerMode
    collect: bool  # keep the logits of every prompt position (LLM.logits)
    control: dict[str, np.ndarray] | None  # tag, prompt_len, generated0, sampler: if changed
    tables: np.ndarray | None  # i32 [rows, pages_per_seq]: the block tables, if changed
    waiting: bool  # the queue held requests when this call was planned
    held: int  # rows holding a request
    pages_in_use: int

    @property
    def ticks(self) -> int:
        return len(self.batches)

    @property
    def buckets(self) -> list[int]:
        return [b.token.shape[1] for b in self.batches]


class _Room:
    """What is left of one tick of one replica: token slots within the budget and the bucket,
    and prompt query groups."""

    def __init__(self, slots: int, groups: int):
        self.slots = slots
        self.groups = groups

    def fits(self, n: int) -> int:
        """Tokens of an n-token chunk that fit."""
        return max(0, min(n, self.slots, self.groups * QUERY_BLOCK))

    def take(self, n: int) -> None:
        self.slots -= n
        self.groups -= -(-n // QUERY_BLOCK)


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
        drafts: int = 0,
        verify_limit: int | None = None,
    ):
        """`clock` stamps admission, first-token and finish times: the engine's wall clock,
        or the modelled time of `jaxpp plan`'s trace replay. `drafts`: speculative tokens per
        decoding row (k; 0: none), in calls where at most `verify_limit` requests decode."""
        self.layout = layout
        self.pool = pool
        self.budget = token_budget
        self.drafts = drafts
        self.verify_limit = verify_limit
        self.buckets = Buckets.of(layout.rows * (drafts + 1), token_budget)
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
        self.grammar_start = np.full(layout.slots, -1, np.int32)
        self.last_position = np.zeros(layout.slots, np.int32)
        self.sampler = host_sampler_rows(layout.slots)
        self.control_changed = True
        self.calls = 0
        self.tick = 0  # the ring's tick at the start of the next call
        self._next_tag = 0
        self._unread_rounds = 0  # rounds of the call planned last (not read yet)
        # (bucket, prompt tokens) of the last S - 1 entries, still in the ring when the next
        # call starts: a tick's program must hold every entry in flight (its bucket is the
        # largest of them), and a prompt in flight still has its first token to come.
        self._in_flight: deque[tuple[int, int]] = deque([(0, 0)] * (stages - 1), stages - 1)
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

    def schedule(self) -> Call | None:
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
        longest = max((self._left(r) for r in self.running), default=0)
        riding = any(prompt for _, prompt in self._in_flight)
        if not (longest or self.waiting or self.releasing or riding or self._tail):
            return None
        collect = any(r.collecting for r in self.running) or any(r.collecting for r in self.waiting)
        prefilling = any(not r.decoding for r in self.running)
        # Short calls (one round) while prompts ride or wait, so that the queue is served
        # every round, and when no request has half a long call's rounds left to use.
        mixed = bool(self.waiting or prefilling or riding or collect)
        # One-round calls too while a request streams its tokens (SamplingParams.stream): each
        # token reaches the host one round after it is sampled, not up to max_rounds later.
        streaming = any(r.params.stream for r in self.running)
        needed = max((self._rounds_left(r) for r in self.running), default=0)
        long_call = not (mixed or streaming) and 2 * needed >= self.max_rounds
        rounds = self.max_rounds if long_call else 1
        drafts = self.drafts if self._verifies() else 0
        preempted = self._grow_decoding(rounds, drafts + 1)
        self._unread_rounds = rounds
        M = self.layout.microbatches
        plans: list[list[TickPlan]] = []
        for k in range(M):
            plans.append(self._plan_tick(k, mixed, not preempted, drafts, self._riding_at(plans)))
        held = sum(r is not None for r in self.occupant)
        # A request writing in the last round is sampled in the next call (several stages).
        self._tail = self.stages > 1 and longest >= rounds
        step = Call(
            number=call,
            start_tick=self.tick,
            rounds=rounds,
            batches=self._pack(plans, rounds),
            candidates=[
                sum(len(p.decode) + sum(c.last for c in p.chunks) for p in tick) for tick in plans
            ],  # fmt: skip
            mode=self._mode(verify=drafts > 0),
            collect=collect,
            control=self._control(),
            tables=self._tables(),
            waiting=bool(self.waiting),
            held=held,
            pages_in_use=self.pool.in_use,
        )
        self.stats.kv_blocks_peak = max(self.stats.kv_blocks_peak, self.pool.in_use)
        self.stats.prefix_cache_evictions = self.pool.evictions - self._evictions_before
        self.calls += 1
        self.tick += step.ticks
        return step

    def _plan_tick(
        self, k: int, prompts: bool, admit: bool, drafts: int, riding: int
    ) -> list[TickPlan]:
        """One replica's plan each for tick k of the call: the entering micro-batch's decode
        rows (each with `drafts` draft slots), then (`prompts`) unfinished prompts and
        (`admit`) new requests in the tick's bucket, at least the `riding` one."""
        lay = self.layout
        microbatch = (self.tick + k) % lay.microbatches
        plans = [
            TickPlan(decode=self._decode_rows(d, microbatch), drafts=drafts)
            for d in range(lay.replicas)
        ]
        if not prompts:
            return plans
        decode = max(p.decode_slots for p in plans)
        bucket = max(self.buckets.fit(decode, self._prompt_share()), riding)
        rooms = []
        for plan in plans:
            slots = min(bucket, max(self.budget, plan.decode_slots)) - plan.decode_slots
            rooms.append(_Room(slots, max(bucket // QUERY_BLOCK, 1)))
        tick = self.tick + k
        for request in [r for r in self.running if not r.decoding]:
            d = self._replica(request)
            self._plan_chunk(request, plans[d], microbatch, rooms[d], tick)
        if admit:
            self._admit(plans, microbatch, rooms, tick)
        return plans

    def _pack(self, plans: list[list[TickPlan]], rounds: int) -> list[TickBatch]:
        """Each tick's arrays, in the bucket of the largest entry in flight at that tick."""
        M, mb = self.layout.microbatches, self.layout.rows
        own = [self._own_bucket(tick) for tick in plans]
        batches, packed = [], {}
        for k in range(rounds * M):
            bucket = max(own[k % M], self._riding())
            key = (k % M, bucket)
            if key not in packed:
                packed[key] = pack(plans[k % M], bucket, mb, (self.tick + k) % M)
            batches.append(packed[key])
            prompt = sum(p.prompt_tokens for p in plans[k % M]) if k < M else 0
            self._in_flight.append((own[k % M], prompt))
        return batches

    def _riding(self) -> int:
        """The slots of the largest entry still in flight (entered in the last S - 1 ticks)."""
        return max((bucket for bucket, _ in self._in_flight), default=0)

    def _riding_at(self, planned: list[list[TickPlan]]) -> int:
        """The largest entry in flight when the tick after `planned` (this call's ticks so far)
        enters: of the last S - 1 entries, those of this call and the newest of the calls
        before."""
        window = self.stages - 1
        ours = [self._own_bucket(tick) for tick in planned[len(planned) - window :]]
        before = list(self._in_flight)[len(planned) :]
        return max([bucket for bucket, _ in before] + ours, default=0)

    def _own_bucket(self, tick: list[TickPlan]) -> int:
        """The smallest bucket that holds a tick's plans (its slots and its query groups)."""
        return self.buckets.up(max(max(p.slots, p.groups * QUERY_BLOCK) for p in tick))

    def _prompt_work(self) -> int:
        """Prompt slots a tick could fill now: the rest of the prompts being planned and the
        prompts of the queue's head that free rows could take, each in whole query groups (a
        tick of T slots holds T / 16 groups)."""
        left = [len(r.sequence) - r.planned for r in self.running if not r.decoding]
        free = sum(r is None for r in self.occupant)
        left += [len(r.prompt) + len(r.tokens) for r in list(self.waiting)[:free]]
        return sum(-(-n // QUERY_BLOCK) * QUERY_BLOCK for n in left)

    def _prompt_share(self) -> int:
        """The prompt work that sizes a tick's bucket: all of it with one stage; with S
        stages, 1/S of it. An entry's bucket is what every stage computes for the S ticks it
        crosses the ring (the program holds every entry in flight), so one tick taking all
        the work makes S ticks pay its size on every stage, while 1/S per tick keeps the S
        entries in flight even. The riding bucket is paid anyway: a tick fills it whatever
        its share. W at pp=4 (docs/performance.md, one sitting under load): 112.5 vs 85.1
        output tok/s with all of it (1.32x), ticks of 256 slots or more 599 -> 53."""
        return -(-self._prompt_work() // self.stages)

    def _tables(self) -> np.ndarray | None:
        """The block tables, if they changed since the last call."""
        if not self.pool.changed:
            return None
        self.pool.changed = False
        return self.pool.tables.copy()

    def _control(self) -> dict[str, np.ndarray] | None:
        if not self.control_changed:
            return None
        self.control_changed = False
        return {
            "tag": self.tags.copy(),
            "prompt_len": self.prompt_len.copy(),
            "generated0": self.generated0.copy(),
            "grammar_start": self.grammar_start.copy(),
            "last_position": self.last_position.copy(),
            "sampler": {k: v.copy() for k, v in self.sampler.items()},
        }

    def _left(self, request: Request) -> int:
        """Positions the request has left to write: exact from `bound` until it had drafts,
        then from the tokens read so far."""
        if not request.drafted:
            return request.last_position - request.bound
        known = len(request.prompt) + len(request.tokens) - 1
        return max(request.last_position - known, 0)

    def _rounds_left(self, request: Request) -> int:
        """Ring rounds the request still needs after the calls planned: one per position until
        it had drafts, then its positions left at the tokens per round drafting has given so
        far in this run, less the rounds of the call not read yet."""
        if not request.drafted:
            return self._left(request)
        stats = self.stats
        per_round = 1 + stats.spec_accepted_tokens / max(stats.tokens, 1)
        return math.ceil(self._left(request) / per_round) - self._unread_rounds

    def _grow_decoding(self, rounds: int, step: int) -> bool:
        """Pages for what each decoding request may write in this call (`step` positions per
        round: its token and its drafts), and if the pool allows for the next call too, oldest
        first. A request that cannot get this call's pages is preempted; when only the next
        call's are short, the newest requests of its replica are, so that their pages are back
        in time. Returns whether anything was preempted."""
        preempted = False
        for request in list(self.running):
            if not request.decoding or request.row is None:
                continue  # prefilling, or preempted a moment ago
            now = min(request.bound + rounds * step, request.last_position)
            ahead = min(now + self.max_rounds * (self.drafts + 1), request.last_position)
            # A decode token of it enters in this call (after drafts, until it is read done).
            request.feeds = now > request.bound or request.drafted
            request.drafted |= step > 1
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

    def _plan_chunk(
        self, request: Request, plan: TickPlan, microbatch: int, room: _Room, tick: int
    ) -> None:
        """Plan the next chunk of an unfinished prompt within the tick's room."""
        left = len(request.sequence) - request.planned
        n = room.fits(left)
        if n == left and self.layout.locate(request.row)[1] != microbatch:
            n -= 1  # its last token rides with its own micro-batch
        end = request.planned + n
        done = end == len(request.sequence)
        ahead = min(end + self.max_rounds, request.last_position) if done else end
        if n <= 0 or not (self.pool.grow(request.row, ahead) or self.pool.grow(request.row, end)):
            return
        self._place(request, plan, n, room, tick)

    def _admit(self, plans: list[TickPlan], microbatch: int, rooms: list[_Room], tick: int) -> None:
        """Admit waiting requests, first come first served, while their first chunk and its
        pages fit the tick. Each takes the lowest free row of the emptiest micro-batch of the
        emptiest replica, so that every micro-batch has work; its prompt rides at once, all of
        it when that is the entering micro-batch, else all but its last token (which rides
        at its micro-batch's turn)."""
        while self.waiting:
            row = self._free_row(microbatch, rooms)
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
            n = rooms[replica].fits(len(sequence) - done)
            n -= done + n == len(sequence) and not own
            ahead = min(len(sequence) + self.max_rounds, request.last_position)
            if not self.pool.grow(row, ahead if done + n == len(sequence) else done + n):
                self.pool.release(row)
                return  # the head of the queue waits for pages, and so does the rest
            self.waiting.popleft()
            self._seat(request, row, sequence, done)
            if n:
                self._place(request, plans[replica], n, rooms[replica], tick)

    def _free_row(self, microbatch: int, rooms: list[_Room]) -> int | None:
        """The lowest free row of the emptiest micro-batch (the entering one on a tie) of the
        emptiest replica that still has room in the tick."""
        lay = self.layout
        best, best_key = None, None
        for replica in range(lay.replicas):
            if rooms[replica].fits(1) <= 0:
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
        self.grammar_start[row] = (
            -1 if request.automaton is None else request.grammar_base + request.grammar_state
        )
        self.last_position[row] = request.last_position - 1  # (a count of positions)
        request.drafted = False
        params = request.params
        if request.score:  # sample nothing: the first token ends it
            params = dataclasses.replace(params, max_tokens=1, min_tokens=0)
        set_sampler_row(self.sampler, row, params, request.seed, self.eos_token_ids)
        self.control_changed = True

    def _place(self, request: Request, plan: TickPlan, n: int, room: _Room, tick: int) -> None:
        """Put the next n tokens of the request's prompt into the tick entering at `tick`."""
        replica = self._replica(request)
        local = request.row - replica * self.layout.microbatches * self.layout.rows
        start = request.planned
        last = start + n == len(request.sequence)
        plan.chunks.append(Chunk(local, start, request.sequence[start : start + n], last))
        room.take(n)
        self._entry_prompt[tick] = self._entry_prompt.get(tick, 0) + n
        request.planned = request.bound = start + n
        self.pool.publish(request.row, request.sequence, request.planned)
        if last:
            request.decoding, request.feeds = True, False

    def _decode_rows(self, replica: int, microbatch: int) -> list[int]:
        """Rows of that micro-batch (within the replica) that may feed a decode token."""
        lay = self.layout
        rows = []
        for r in range(lay.rows):
            request = self.occupant[lay.slot(replica, microbatch, r)]
            if request is not None and request.feeds and request.row is not None:
                rows.append(microbatch * lay.rows + r)
        return rows

    def _replica(self, request: Request) -> int:
        return self.layout.locate(request.row)[0]

    def _mode(self, verify: bool) -> SamplerMode:
        """The call's sampler mode, for the requests running once it is planned; it verifies
        the drafts planned (`verify`) unless a request admitted meanwhile has penalties or a
        constraint (then the drafts' slots go unused: no row keeps a draft)."""
        decoding = [r.params for r in self.running if not r.score]
        mode = SamplerMode.of(decoding) if decoding else GREEDY
        return dataclasses.replace(mode, verify=verify and not (mode.penalties or mode.grammar))

    def _verifies(self) -> bool:
        """Decoding rows get draft slots in the call being planned: the engine speculates,
        every running request may, and no more than `verify_limit` decode."""
        return (
            self.drafts > 0
            and any(r.decoding for r in self.running)
            and all(r.drafts_ok for r in self.running)
            and (self.verify_limit is None or self.decoding <= self.verify_limit)
        )

    def idle_call(self, bucket: int) -> Call:
        """A one-tick call in `bucket` slots with nothing in it: it compiles that bucket's
        programs (warm-up) and runs its tick on padding."""
        lay = self.layout
        plans = [TickPlan() for _ in range(lay.replicas)]
        step = Call(
            number=-1, start_tick=self.tick, rounds=1,
            batches=[pack(plans, bucket, lay.rows, self.tick % lay.microbatches)],
            candidates=[0], mode=GREEDY, collect=False, control=self._control(),
            tables=self._tables(), waiting=False, held=0, pages_in_use=self.pool.in_use,
        )  # fmt: skip
        self.tick += 1
        self._in_flight.append((bucket, 0))
        return step

    # --- reading a call's log ----------------------------------------------------------------

    def update(self, step: Call, log, collected: list | None = None) -> list[Request]:
        """Apply a finished call's log (host numpy arrays of pipeline.StepLog) and, for a
        collecting call, the logits of each tick (pipeline.Collected, host arrays); return the
        requests that finished."""
        now = self.clock()
        finished: list[Request] = []
        self.stats.count(step, log, self._entry_prompt)
        self._forget_entries(step)
        # Logits first: a request's last prompt logits come in the call that samples its first
        # token, which may finish it (max_tokens=1 with prompt_logprobs).
        for got in collected or ():
            finished += self._collect(got, now)
        tags = log.tags[: step.ticks]
        for k, replica, column in zip(*np.nonzero(tags >= 0), strict=True):
            request = self.active.get(int(tags[k, replica, column]))
            if request is None or request.score:
                continue
            self._append(request, log, k, replica, column, now)
            if request.finished:
                finished.append(request)
        return finished

    def _collect(self, got, now: float) -> list[Request]:
        """Keep the logits of collecting requests' prompt positions (one tick's
        pipeline.Collected); return the score requests whose every position is in."""
        finished = []
        for replica in range(got.tag.shape[0]):
            tags = got.tag[replica]
            for tag in np.unique(tags[tags >= 0]):
                request = self.active.get(int(tag))
                if request is None or not request.collecting:
                    continue
                # Its prompt's positions only: not its decode tokens, nor the generated part
                # of a preempted request's recomputed sequence.
                mine = (tags == tag) & (got.position[replica] < len(request.prompt))
                positions = got.position[replica][mine]
                if not len(positions):
                    continue
                request.logits[int(positions[0])] = np.asarray(got.logits[replica][mine])
                if request.score and not request.collecting:
                    request.first_token_time = now
                    self._finish(request, now)
                    finished.append(request)
        return finished

    def _append(self, request: Request, log, k, replica, column, now: float) -> None:
        """Add what the row sampled at tick k: its accepted drafts, then its token."""
        accepted = int(log.accepted[k, replica, column])
        for token in log.drafts[k, replica, column, :accepted]:
            self._append_token(request, int(token), now)
            if request.finished:
                return
        self._append_token(request, int(log.tokens[k, replica, column]), now)
        if request.params.logprobs is not None:
            request.logprobs.append(float(log.logprob[k, replica, column]))
            request.top.append(
                (log.top_ids[k, replica, column], log.top_logprobs[k, replica, column])
            )

    def _append_token(self, request: Request, token: int, now: float) -> None:
        request.tokens.append(token)
        if request.first_token_time is None:
            request.first_token_time = now
        p = request.params
        n = len(request.tokens)
        stops = stop_token_ids(p, self.eos_token_ids)
        if request.automaton is not None:
            request.grammar_state = request.automaton.next_state(request.grammar_state, token)
        # The device's rule, to the letter: it has stopped the row on exactly these.
        if (token in stops and n > p.min_tokens) or n >= p.max_tokens or request.grammar_complete:
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

    def _forget_entries(self, step: Call) -> None:
        for t in [t for t in self._entry_prompt if t < step.start_tick + step.ticks - self.stages]:
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
    every prompt position (LLM.logits, prompt_logprobs), nor one whose penalties count the
    prompt's tokens as they enter the ring."""
    params = request.params
    return not (request.score or params.prompt_logprobs is not None or params.penalized)
