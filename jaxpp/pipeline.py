"""What one tick computes: the ring over the stages as two `jax.shard_map` programs, one that
moves a tick's tokens through every stage and one that samples the micro-batch leaving the last,
with no host round trip inside either.

Every device runs the same programs; `axis_index("stage")` tells it which stage it is. Layer slot
i of stage s lives at `layers[i][s]` (the partition is the sharding spec); each slot has its own
K and V page pool, `[stages * replicas * pages, ...]`, sharded the same way, so a stage only
touches its own layers' pages. Activations move s -> s+1 with `ppermute`.

The sequence rows (`max_num_seqs`) are split into M micro-batches of `mb` rows per pipeline
replica. At tick t stage s serves the entry that came in at tick t - s, which belongs to
micro-batch (t - s) mod M. An entry is a flat batch of T token slots (batch.py): the decode
tokens of its micro-batch's live rows and chunks of any requests' prompts, each cut into query
groups of at most 16 tokens of one request. A prompt's LAST token rides with its own row's
micro-batch, so that when that micro-batch leaves the last stage its first token is sampled
with the decode tokens of the rows beside it. S = 3, M = 3, prompts a (16 tokens), b (40) and
c (24) arriving together, a budget of 40, rows a in m0, b in m1, c in m2:

    tick     0         1          2          3          4          5
    stage 0  m0+a,b1   m1+b2      m2+c       m0'        m1'        m2'
    stage 1  .         m0+a,b1    m1+b2      m2+c       m0'        m1'
    stage 2  .         .          m0+a,b1    m1+b2      m2+c       m0'

(b1 = b[0:16], b2 = b[16:40]; ' = that micro-batch's next tokens: a's first token is sampled
when m0 leaves stage 2 at tick 2, b's at 3, c's at 4. Each tick runs a 32-token bucket: with S
stages a tick takes 1/S of the prompt work at hand, scheduler.py.) A micro-batch's tokens are
sampled when it leaves the last stage (every device samples the same token from the
vocab-parallel head) and its next tokens enter stage 0 at its next turn: with M >= S that is
never before they exist. The ring never drains between calls.

A tick is two programs, dispatched back to back without waiting:

    forward(T)   the entering tokens (stage 0) and every stage's layers over its entry: keys and
                 values written into their pages, attention over them (attention.py); the
                 activations move on; the last stage's outputs of the rows to sample are summed
                 onto every device (`Leaving`)
    sample(mode) the vocab-parallel head over those rows, the sampler (sampling.py), the rows'
                 next token, position and stop (and, in a grammar mode, where each row's
                 structured-output automaton goes: grammar.py); the tick's log entry

so a program is compiled per token bucket T (in a speculating engine, twice: with and without
the proposals at the entry) and per sampler mode, not per combination: the handful of programs
a configuration can meet is compiled before it serves (programs.py).

What rides with an entry from stage to stage is only its activations. Who its tokens are (rows,
positions, query groups, which rows it samples and for which request) is known to every device
without a collective: each keeps the last S entries into stage 0 (`StageState.history`), worked
out from replicated state.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxpp.attention import QUERY_BLOCK, paged_attention, write_kv
from jaxpp.batch import TickBatch
from jaxpp.grammar import TABLE_SPECS
from jaxpp.model import (
    VOCAB_AXES,
    embed_lookup,
    local_logits,
    merge_slots,
    param_specs,
    rope_tables,
)
from jaxpp.sampling import SamplerMode, SamplerRows, grammar_advance, sample
from jaxpp.sharding import LOGICAL_TO_MESH, logical_to_spec
from jaxpp.speculation import propose, verify, write_tokens

if TYPE_CHECKING:  # draft.py builds on layout.py, which builds on this module
    from jaxpp.draft import DraftModel

# One pool per layer slot, like the weights (slicing a layer out of a stacked pool would copy
# it every tick). K keeps positions last and V head_dim last: both attention dots are plain
# batched matmuls over a gathered page (measured 2.1x faster decode on CPU than one layout
# [.., seq, kv_heads, head_dim] for both). The pages axis runs over stages and replicas
# (sharding.py), so each device's shard is its own pool [pages, ...] with no unit axis in
# front: squeezing one off made XLA copy the whole pool every tick when tp left one KV head
# per device (it laid the unit axes out differently inside the loop).
K_POOL_AXES = ("pages", "kv_heads", "head_dim", "seq")
V_POOL_AXES = ("pages", "kv_heads", "seq", "head_dim")
BATCH = LOGICAL_TO_MESH["batch"]
ROW = P(BATCH)  # per-row and per-replica arrays: split over pipeline replicas
RIDING = P("stage", BATCH)  # [stages, replicas, ...]: what each stage holds in flight
PER_REPLICA = P(None, BATCH)  # [.., replicas, ...]: the same on every stage of a replica
PER_STAGE = P(None, BATCH, "stage")  # [ticks, replicas, stages]: each device its own count
REPLICATED = P()


class KVCache(NamedTuple):
    k: tuple[jax.Array, ...]  # per layer slot: [stages * replicas * pages, kv_heads, Dh, block]
    v: tuple[jax.Array, ...]  # per layer slot: [stages * replicas * pages, kv_heads, block, Dh]


class Entry(NamedTuple):
    """What entered stage 0 at one tick (per replica), as the stages after it need it; sized
    by the largest bucket (a tick of a smaller one leaves the rest empty)."""

    row: jax.Array  # i32 [T_max]: row of each token slot; -1 = empty (or a row not live)
    position: jax.Array  # i32 [T_max]
    decode: jax.Array  # bool [T_max]: a decode slot (a query group of its own)
    group_start: jax.Array  # i32 [G_max]: prompt query groups (batch.TickBatch)
    group_len: jax.Array  # i32 [G_max]
    sample: jax.Array  # i32 [mb]: slot sampled for each row of the micro-batch, -1 = none
    tag: jax.Array  # i32 [mb]: the request of each sampled row, latched at entry; -1 = none
    draft: jax.Array  # i32 [mb, k]: each row's drafts in the slots after its sampled one
    # (speculation.py); -1 = none


class StageState(NamedTuple):
    """What the stages carry from one tick to the next (donated each tick)."""

    cache: KVCache
    riding: jax.Array  # [stages, replicas, T_max, D]: the activations each stage received
    history: Entry  # [stages, replicas, ...]: the last S entries (tick t at t mod S)
    tick: jax.Array  # i32 scalar: the ring's global tick


class RowState(NamedTuple):
    """What the device knows of each row (donated each tick)."""

    next_token: jax.Array  # i32 [rows]: the token each live row feeds at its next turn
    position: jax.Array  # i32 [rows]: tokens in the row's pages (= position of next_token)
    generated: jax.Array  # i32 [rows]: tokens generated so far by the row's request
    live: jax.Array  # bool [rows]: the row is decoding


class Penalties(NamedTuple):
    """What presence, frequency and repetition penalties count per row (allocated when a
    penalised request first comes: [rows, 0] until then)."""

    counts: jax.Array  # i32 [rows, Vpad]: output-token counts
    seen: jax.Array  # bool [rows, Vpad]: prompt and output tokens


class Automata(NamedTuple):
    """Where each row's structured-output automaton is (grammar.py; read and updated only by
    the grammar sample programs, so that the others' arguments never change with it)."""

    state: jax.Array  # i32 [rows]: a state id of the device pool (GrammarTables); -1 = none


class Ring(NamedTuple):
    stages: StageState
    rows: RowState
    penalties: Penalties
    automata: Automata
    page_tokens: jax.Array  # i32 [replicas * pages, block]: the token whose keys and values
    # each page position holds, for prompt lookup (speculation.py); [replicas, 0] when the
    # engine does not speculate


class RowControl(NamedTuple):
    """The host's word on every row, uploaded when it changes."""

    tag: jax.Array  # i32 [rows]: the request in the row (its serial number); -1 = stop/none
    sampler: SamplerRows  # [rows] sampling settings of that request
    prompt_len: jax.Array  # i32 [rows]: its prompt (positions past it hold recomputed outputs)
    generated0: jax.Array  # i32 [rows]: tokens it had generated before this prefill
    grammar_start: jax.Array  # i32 [rows]: its automaton's state at its first token; -1 = none
    last_position: jax.Array  # i32 [rows]: the last position it may write (drafts stop there)


class Leaving(NamedTuple):
    """The micro-batch leaving the last stage at a tick, handed from forward to sample."""

    hidden: jax.Array  # [replicas * mb, k + 1, D]: the last stage's output of each row's
    # sampled slot and the k after it (its drafts' slots, when it has drafts)
    draft: jax.Array  # i32 [replicas * mb, k]: the row's drafts; -1 = none
    tag: jax.Array  # i32 [replicas * mb]: the request sampled in each row; -1 = none
    first: jax.Array  # bool [replicas * mb]: the slot ended a prompt (its first new token)
    position: jax.Array  # i32 [replicas * mb]: the row's position after the sampled token
    microbatch: jax.Array  # i32 scalar
    tick: jax.Array  # i32 scalar


LEAVING_SPEC = Leaving(*[ROW] * 5, REPLICATED, REPLICATED)


class StepLog(NamedTuple):
    """What a call did, tick by tick (K_max ticks; the call's first ticks are used)."""

    start: jax.Array  # i32 scalar: the ring's tick at entry 0
    tags: jax.Array  # i32 [K, replicas, mb]: request of each sampled token, -1 = none
    tokens: jax.Array  # i32 [K, replicas, mb]
    logprob: jax.Array  # f32 [K, replicas, mb]
    top_ids: jax.Array  # i32 [K, replicas, mb, N]
    top_logprobs: jax.Array  # f32 [K, replicas, mb, N]
    drafts: jax.Array  # i32 [K, replicas, mb, k]: the drafts each row had (-1 = none); the
    # first `accepted` were output before `tokens`
    accepted: jax.Array  # i32 [K, replicas, mb]
    work: jax.Array  # i32 [K, replicas, stages]: real tokens each stage computed
    live: jax.Array  # i32 [K, replicas]: rows decoding after the tick


class Collected(NamedTuple):
    """LLM.logits: what a collecting forward returns for the entry leaving the last stage."""

    logits: jax.Array  # f32 [replicas, T, V]
    tag: jax.Array  # i32 [replicas, T]: the request of each slot; -1 = none
    position: jax.Array  # i32 [replicas, T]


@dataclasses.dataclass(frozen=True)
class PipelineShape:
    stages: int
    microbatches: int
    rows: int  # rows per micro-batch and replica (mb)
    max_tokens: int  # token slots of the largest bucket (T_max)
    block_size: int  # positions per KV page
    pages: int  # KV pages per replica and layer slot
    pages_per_seq: int  # block-table columns: pages of a max_model_len sequence
    log_ticks: int  # ticks a call's log holds (its longest call)
    vocab_size: int  # the real vocabulary (padded ids are masked)
    drafts: int = 0  # speculative tokens a verifying row feeds after its next token (k)
    lookup: tuple[int, int] = (0, 0)  # prompt lookup's n-gram sizes (min, max)

    @property
    def decode_slots(self) -> int:
        """Slots at the front of a tick that decode rows can take (k + 1 per row)."""
        return self.rows * (self.drafts + 1)

    @property
    def page_token_shape(self) -> tuple[int, int]:
        """Per replica, the page-token pool's shape ([1, 0] when the engine does not speculate)."""
        return (self.pages, self.block_size) if self.drafts else (1, 0)

    @property
    def max_groups(self) -> int:
        return max(self.max_tokens // QUERY_BLOCK, 1)


class Pipeline:
    """Builds the jitted tick programs for one model on one mesh."""

    def __init__(self, mesh: Mesh, graphdef, layer_graphdef, state: nnx.State, inv_freq, dtype,
                 shape: PipelineShape, filled: np.ndarray,
                 draft: DraftModel | None = None):  # fmt: skip
        """`filled` [stages, slots]: which layer slots hold a layer (the partition's grid);
        `draft`: the draft model that proposes in place of prompt lookup (draft.py)."""
        self.draft = draft
        self.mesh = mesh
        self.graphdef = graphdef
        self.layer_graphdef = layer_graphdef
        self.inv_freq = inv_freq
        self.dtype = dtype
        self.shape = shape
        self.state_specs = param_specs(state)
        self.slots = filled.shape[1]
        # A slot filled on every stage runs unmasked; only an uneven partition masks.
        self.masked_slots = tuple(not bool(filled[:, i].all()) for i in range(self.slots))
        self.cache_spec = KVCache(
            (logical_to_spec(K_POOL_AXES),) * self.slots,
            (logical_to_spec(V_POOL_AXES),) * self.slots,
        )
        # Tests set this to NaN: what a stage reads for a dead row, a padding slot or an idle
        # tick must never matter.
        self.bubble_fill: float | None = None

    # --- the specs of the programs' arguments ------------------------------------------------

    def stage_spec(self) -> StageState:
        return StageState(self.cache_spec, RIDING, Entry(*[PER_REPLICA] * 8), REPLICATED)

    @staticmethod
    def row_spec() -> RowState:
        return RowState(*[ROW] * len(RowState._fields))

    @staticmethod
    def control_spec() -> RowControl:
        return RowControl(ROW, SamplerRows(*[ROW] * len(SamplerRows._fields)), *[ROW] * 4)

    @staticmethod
    def log_spec() -> StepLog:
        per_tick = P(None, BATCH)
        return StepLog(REPLICATED, *[per_tick] * 7, PER_STAGE, per_tick)

    def _jit(self, fn, in_specs, out_specs, donate):
        """shard_map + jit, with float32 pinned to float32 and outputs placed as the specs say
        (the next tick's program takes exactly these shardings)."""
        # Float32 means float32: accelerators run float32 matmuls in TF32 unless asked not to
        # (4.6e-4 of the logit scale from transformers on an H200; 6.4e-7 at "highest").
        # bfloat16 keeps the fast default (float32 accumulation; softmax and norms in float32).
        precision = "highest" if jnp.dtype(self.dtype) == jnp.float32 else None

        def precise(*args):
            with jax.default_matmul_precision(precision):
                return fn(*args)

        precise.__name__ = fn.__name__
        mapped = jax.shard_map(precise, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                               check_vma=False)  # fmt: skip
        shardings = jax.tree.map(
            lambda spec: jax.sharding.NamedSharding(self.mesh, spec),
            out_specs,
            is_leaf=lambda x: isinstance(x, P),
        )
        return jax.jit(mapped, donate_argnums=donate, out_shardings=shardings)

    # --- the forward program -----------------------------------------------------------------

    def forward_program(self, collect: bool, propose: bool):
        """forward(state, stages, rows, tag, tables, batch, log, page_tokens, last_position,
        draft_state) -> (stages, leaving, log, page_tokens[, collected]): one tick of every
        stage, given each row's state (read only) and request (RowControl.tag; the sampler's
        settings are not its business, so that their shapes never recompile it). jit keys it
        by the batch's bucket. `propose`: the twin of a call that verifies, which proposes
        drafts at the entry (a draft model costs a tick W + k - 1 token-forwards per drafting
        row, which a call that verifies nothing must not pay)."""
        outs = (self.stage_spec(), LEAVING_SPEC, self.log_spec(), ROW)
        if collect:
            outs += (Collected(P(BATCH, None, VOCAB_AXES), ROW, ROW),)
        batch_spec = TickBatch(*[ROW] * len(TickBatch._fields))
        draft = self.draft.specs if self.draft else ()
        ins = (self.state_specs, self.stage_spec(), self.row_spec(), ROW, ROW, batch_spec,
               self.log_spec(), ROW, ROW, draft)  # fmt: skip
        tick = functools.partial(self._forward, collect=collect, fill=self.bubble_fill,
                                 propose=propose)  # fmt: skip
        tick.__name__ = "forward_collect" if collect else "forward"
        return self._jit(tick, ins, outs, donate=(1, 6, 7))

    def _forward(self, state, stages: StageState, rows: RowState, tag, tables, batch: TickBatch,
                 log: StepLog, page_tokens, last_position, draft_state, *, collect: bool,
                 fill, propose: bool):  # fmt: skip
        """The tick; the decode rows that have slots for drafts get them from the tokens of
        their pages (by prompt lookup, or the draft model `draft_state`: its parameters, () when
        none), and the entering tokens are written there (speculation.py)."""
        sh = self.shape
        S, T = sh.stages, batch.token.shape[1]
        model, layers = self._split(state)
        s = jax.lax.axis_index("stage")
        t = stages.tick
        batch = jax.tree.map(lambda a: a[0], batch)
        proposer = self._proposer(draft_state) if propose and sh.drafts else None
        lookup = (proposer, page_tokens, tables, last_position)
        entry, tokens = _enter(batch, rows, tag, t, sh, lookup)
        if sh.drafts:
            page_tokens = write_tokens(page_tokens, tables, entry.row[:T], entry.position[:T],
                                       tokens)  # fmt: skip
        history = jax.tree.map(
            lambda h, e: jax.lax.dynamic_update_index_in_dim(h[:, 0], e, t % S, 0)[:, None],
            stages.history,
            entry,
        )
        mine = _truncate(jax.tree.map(lambda h: h[(t - s) % S, 0], history), T)
        with jax.named_scope("embed"):
            x = embed_lookup(model.embed[...], tokens)
        if S > 1:
            x = jnp.where(s == 0, x, stages.riding[0, 0, :T])
        if fill is not None:
            x = jnp.where((mine.row >= 0)[:, None], x, fill)
        out, cache = self._run_stage(layers, x, stages.cache, mine, tables)

        leaving = jax.tree.map(lambda h: h[(t - S + 1) % S, 0], history)
        slot = jnp.clip(leaving.sample[:, None] + jnp.arange(sh.drafts + 1), 0, T - 1)
        with jax.named_scope("ring"):
            final = jax.lax.psum(jnp.where(s == S - 1, out[slot], 0), "stage")
            riding = stages.riding
            if S > 1:
                sent = jax.lax.ppermute(out, "stage", [(i, i + 1) for i in range(S - 1)])
                riding = jax.lax.dynamic_update_slice(riding, sent[None, None], (0, 0, 0, 0))
        slot_position = leaving.position[jnp.clip(leaving.sample, 0, sh.max_tokens - 1)]
        handed = Leaving(
            hidden=final,
            draft=leaving.draft,
            tag=leaving.tag,
            first=(leaving.sample >= 0) & ~leaving.decode[jnp.maximum(leaving.sample, 0)],
            position=slot_position + 1,
            microbatch=(t - S + 1) % sh.microbatches,
            tick=t,
        )
        # Each device reports its own count (a collective here would run beside the others).
        work = jnp.sum((mine.row >= 0).astype(jnp.int32))
        log = log._replace(work=log.work.at[t - log.start, 0, 0].set(work))
        stages = StageState(cache, riding, history, t + 1)
        if not collect:
            return stages, handed, log, page_tokens
        every = _truncate(leaving, T)
        hidden = jax.lax.psum(jnp.where(s == S - 1, out, 0), "stage")
        tags = jnp.where(every.row >= 0, tag[jnp.maximum(every.row, 0)], -1)
        logits = local_logits(model, hidden, sh.vocab_size)
        collected = Collected(logits[None], tags[None], every.position[None])
        return stages, handed, log, page_tokens, collected

    def _proposer(self, draft_state):
        """(text, position, limit) -> drafts: prompt lookup, or the draft model's greedy tokens."""
        sh = self.shape
        if self.draft is None:
            return functools.partial(propose, k=sh.drafts, low=sh.lookup[0], high=sh.lookup[1])
        return functools.partial(self.draft.propose, draft_state, k=sh.drafts)

    def count_program(self):
        """count(penalties, prompt_len, batch) -> penalties: the prompt tokens entering at a
        tick are seen by their rows (a penalised call runs it before each forward)."""
        batch_spec = TickBatch(*[ROW] * len(TickBatch._fields))
        spec = Penalties(ROW, ROW)
        fn = functools.partial(_count_prompt_tokens)
        fn.__name__ = "count_prompt_tokens"
        return self._jit(fn, (spec, ROW, batch_spec), spec, donate=(0,))

    # --- one stage: its layers, one after another -------------------------------------------

    def _run_stage(self, layers, x, cache: KVCache, entry: Entry, tables):
        """Run this device's layer slots over x [T, D] (entry: who its tokens are): each writes
        the tick's keys and values into its pool and attends over it. The slot loop is unrolled
        over per-slot weights (a `scan` over a stack would slice, i.e. copy, each layer's
        weights every tick). Returns (x, the new pools)."""
        block, pages = self.shape.block_size, self.shape.pages
        position = entry.position
        real = entry.row >= 0
        row = jnp.maximum(entry.row, 0)
        column = jnp.clip(position // block, 0, tables.shape[1] - 1)
        kv_at = (jnp.where(real, tables[row, column], pages), jnp.mod(position, block))
        cos, sin = rope_tables(jnp.maximum(position, 0)[None], self.inv_freq, self.dtype)
        ks, vs = [], []
        for i, layer in enumerate(layers):
            with jax.named_scope("norm"):
                h = layer.input_norm(x)
            with jax.named_scope("qkv"):
                q, k, v = layer.attn.qkv(h[None], cos, sin)
            with jax.named_scope("write_kv"):
                k_pool, v_pool = write_kv(cache.k[i], cache.v[i], k[0], v[0], *kv_at)
            attended = self._attend(q[0], k_pool, v_pool, layer.window[...], entry, tables)
            with jax.named_scope("o_proj"):
                y = x + layer.attn.out(attended[None])[0]
            with jax.named_scope("norm"):
                h = layer.post_attn_norm(y)
            with jax.named_scope("mlp"):
                y = y + layer.mlp(h[None])[0]
            x = jnp.where(layer.filled[...], y, x) if self.masked_slots[i] else y
            ks.append(k_pool)
            vs.append(v_pool)
        return x, KVCache(tuple(ks), tuple(vs))

    def _attend(self, q, k_pool, v_pool, window, entry: Entry, tables):
        """Attention of every slot of the entry: decode slots (the first min(T, mb * (k + 1)),
        a group each) and prompt query groups, each over its own sequence's pages."""
        T = q.shape[0]
        decodes = min(T, self.shape.decode_slots)
        row = jnp.maximum(entry.row, 0)
        with jax.named_scope("attend_decode"):
            dec_pos = jnp.where(entry.decode & (entry.row >= 0), entry.position, -1)[:decodes]
            dec = paged_attention(q[:decodes, None], dec_pos[:, None], row[:decodes], k_pool,
                                  v_pool, tables, window, kind="decode")[:, 0]  # fmt: skip
        with jax.named_scope("attend_prompt"):
            lanes = jnp.arange(QUERY_BLOCK)
            index = entry.group_start[:, None] + lanes  # [G, QB]
            used = lanes < entry.group_len[:, None]
            at = jnp.clip(index, 0, T - 1)
            pos = jnp.where(used, entry.position[at], -1)
            pre = paged_attention(q[at], pos, row[entry.group_start], k_pool, v_pool, tables,
                                  window, kind="prompt")  # fmt: skip
            out = jnp.zeros_like(q).at[jnp.where(used, index, T)].set(pre, mode="drop")
        return out.at[:decodes].add(jnp.where((dec_pos >= 0)[:, None, None], dec, 0))

    def _split(self, state):
        """Local model (embed/norm/head) and this stage's layers, one module per slot."""
        return merge_slots(self.graphdef, self.layer_graphdef, state)

    # --- the sampling program ----------------------------------------------------------------

    def sample_program(self, mode: SamplerMode):
        """sample(state, rows, control, leaving, log[, penalties][, automata, tables]) -> (rows,
        log[, penalties][, automata]): the next token(s) of every row of the micro-batch
        leaving the last stage. One program per sampler mode; only a penalties mode takes (and
        updates) the penalty counts, only a grammar mode the rows' automata and the pool's
        tables; a verify mode checks the rows' drafts (speculation.py)."""
        ins = (self.state_specs, self.row_spec(), self.control_spec(), LEAVING_SPEC,
               self.log_spec())  # fmt: skip
        outs = (self.row_spec(), self.log_spec())
        donate = (1, 4)
        if mode.penalties:
            donate += (len(ins),)
            ins, outs = ins + (Penalties(ROW, ROW),), outs + (Penalties(ROW, ROW),)
        if mode.grammar:  # the tables are read only: the pool keeps them
            donate += (len(ins),)
            ins, outs = ins + (Automata(ROW), TABLE_SPECS), outs + (Automata(ROW),)
        fn = functools.partial(self._sample, mode=mode)
        fn.__name__ = "sample"
        return self._jit(fn, ins, outs, donate=donate)

    def _sample(self, state, rows: RowState, ctl: RowControl, leaving: Leaving, log: StepLog,
                *extra, mode: SamplerMode):  # fmt: skip
        """Sample the next token of every row of the leaving micro-batch that decoded or ended
        its prompt (in a verify mode, a token at each of its drafts' positions too, keeping
        the drafts that equal them); update the rows (one stops the moment its stop token or
        token budget is reached, or when its automaton has no way on) and write the tick's log
        entry. `extra`: the penalties (mode.penalties), the automata and their tables
        (mode.grammar)."""
        mb, vocab = self.shape.rows, self.shape.vocab_size
        extra = list(extra)
        penalties = extra.pop(0) if mode.penalties else None
        automata, tables = (extra.pop(0), extra.pop(0)) if mode.grammar else (None, None)
        width = self.shape.drafts + 1 if mode.verify else 1  # positions drawn per row
        model = nnx.merge(self.graphdef, state)
        with jax.named_scope("lm_head"):
            hidden = leaving.hidden[:, :width]
            logits = local_logits(model, hidden.reshape(mb * width, -1), vocab)
        with jax.named_scope("sample"):
            ids = leaving.microbatch * mb + jnp.arange(mb)
            sampled = leaving.tag >= 0
            sampler = SamplerRows(*(a[ids] for a in ctl.sampler))
            generated = jnp.where(leaving.first, ctl.generated0[ids], rows.generated[ids])
            counts = penalties.counts[ids] if mode.penalties else None
            seen = penalties.seen[ids] if mode.penalties else None
            at = _automaton_state(ctl, automata, ids, leaving.first) if mode.grammar else None
            walk = (at, tables) if mode.grammar else None
            index = (generated[:, None] + jnp.arange(width)).reshape(-1)  # each draw's token
            repeated = SamplerRows(*(jnp.repeat(a, width, axis=0) for a in sampler))
            got = sample(logits, repeated, index, counts, seen, vocab, mode, walk)
            drawn = got.tokens.reshape(mb, width)
            stop = (drawn[..., None] == sampler.stop_ids[:, None]).any(-1) & (
                index.reshape(mb, width) + 1 > sampler.min_tokens[:, None]
            )
            budget = index.reshape(mb, width) + 1 >= sampler.max_tokens[:, None]
            verdict = verify(drawn, leaving.draft[:, : width - 1], stop, budget)
            n = verdict.accepted
            token = jnp.take_along_axis(drawn, n[:, None], axis=1)[:, 0]
            finished = verdict.finished
            if mode.grammar:  # a row whose automaton has no way on is complete
                with jax.named_scope("grammar"):
                    following = grammar_advance(at, token, tables)
                    finished |= (following >= 0) & tables.terminal[jnp.maximum(following, 0)]
            # A row the host has withdrawn (tag -1) stops, even for a token that entered before.
            cont = sampled & ~finished & (ctl.tag[ids] >= 0)

            def put(array, value):
                return array.at[ids].set(jnp.where(sampled, value, array[ids]))

            rows = rows._replace(
                next_token=put(rows.next_token, token),
                position=put(rows.position, leaving.position + n),
                generated=put(rows.generated, generated + n + 1),
                live=put(rows.live, cont),
            )
            updated = ()
            if mode.penalties:
                updated += (_counted(penalties, ids, token, sampled, seen),)
            if mode.grammar:
                updated += (Automata(put(automata.state, following)),)
        at_n = n[:, None] if width > 1 else jnp.zeros((mb, 1), jnp.int32)
        chosen = jax.tree.map(lambda a: _pick(a, at_n, mb, width), got)
        return (rows, _logged(log, leaving, sampled, chosen, verdict, rows), *updated)


def _pick(a: jax.Array, n: jax.Array, mb: int, width: int) -> jax.Array:
    """Row r's entry n[r] of a [mb * width, ...] array of draws."""
    a = a.reshape((mb, width) + a.shape[1:])
    return jnp.take_along_axis(a, n.reshape((mb, 1) + (1,) * (a.ndim - 2)), axis=1)[:, 0]


def _automaton_state(ctl: RowControl, automata: Automata, ids, first) -> jax.Array:
    """Each row's automaton state before its token: its request's start at its first token,
    the ring's after it; -1 where its request has no constraint (whatever an earlier occupant
    of the row left in the ring)."""
    start = ctl.grammar_start[ids]
    now = jnp.where(first, start, automata.state[ids])
    return jnp.where(start < 0, -1, now)


def _counted(penalties: Penalties, ids, tokens, sampled, seen) -> Penalties:
    """The penalty counts with each sampled row's new token counted (and seen)."""
    hit = jax.nn.one_hot(tokens, penalties.counts.shape[1], dtype=jnp.int32)
    hit = hit * sampled[:, None]
    counts = penalties.counts.at[ids].add(hit)
    return Penalties(counts, penalties.seen.at[ids].set(seen | (hit > 0)))


def _logged(log: StepLog, leaving: Leaving, sampled, got, verdict, rows: RowState) -> StepLog:
    """The log with the tick's entry: what each row of the leaving micro-batch sampled (its
    accepted drafts, then its token)."""
    k = leaving.tick - log.start
    drafts = log.drafts.shape[-1]
    return log._replace(
        tags=log.tags.at[k, 0].set(jnp.where(sampled, leaving.tag, -1)),
        tokens=log.tokens.at[k, 0].set(got.tokens),
        logprob=log.logprob.at[k, 0].set(got.logprob),
        top_ids=log.top_ids.at[k, 0].set(got.top_ids),
        top_logprobs=log.top_logprobs.at[k, 0].set(got.top_logprobs),
        drafts=log.drafts.at[k, 0].set(leaving.draft[:, :drafts]),
        accepted=log.accepted.at[k, 0].set(jnp.where(sampled, verdict.accepted, 0)),
        live=log.live.at[k, 0].set(jnp.sum(rows.live.astype(jnp.int32))),
    )


def _enter(batch: TickBatch, rows: RowState, tag, t, sh: PipelineShape, lookup):
    """The entry of tick t from the host's batch (one replica's, T slots) and the row state:
    decode slots get their row's next token and position, or become empty when the row is no
    longer live (finished on the device, or withdrawn); a decode slot j > 0 of a row gets its
    j-th draft at the position j after, or becomes empty past its drafts; each sampled row's
    request is latched. `lookup`: (proposer, page tokens, block tables, last positions) for
    the drafts.
    Returns (the entry padded to the largest bucket, the entering token ids [T])."""
    decode = (batch.token < 0) & (batch.row >= 0)
    r = jnp.maximum(batch.row, 0)
    live = rows.live[r] & (tag[r] >= 0)
    ids = (t % sh.microbatches) * sh.rows + jnp.arange(sh.rows)
    offset = jnp.where(decode, batch.position, 0)  # a decode slot's place after its row's token
    draft = _drafts(batch, decode, rows, ids, sh, *lookup)
    local = jnp.clip(r - ids[0], 0, sh.rows - 1)
    drafted = draft[local, jnp.clip(offset - 1, 0, max(sh.drafts - 1, 0))] if sh.drafts else r
    live &= (offset == 0) | (drafted >= 0)
    row = jnp.where(decode & ~live, -1, batch.row)
    fed = jnp.where(offset > 0, drafted, rows.next_token[r])
    tokens = jnp.where(decode, fed, batch.token)
    at = jnp.where(decode, rows.position[r] + offset, batch.position)
    position = jnp.where(row >= 0, at, -1)
    taken = jnp.clip(batch.sample, 0, batch.token.shape[0] - 1)
    sampled = (batch.sample >= 0) & (row[taken] >= 0)
    pad = sh.max_tokens - batch.token.shape[0]
    groups = sh.max_groups - batch.group_start.shape[0]
    entry = Entry(
        row=jnp.pad(row, (0, pad), constant_values=-1),
        position=jnp.pad(position, (0, pad), constant_values=-1),
        decode=jnp.pad(decode & (row >= 0), (0, pad)),
        group_start=jnp.pad(batch.group_start, (0, groups)),
        group_len=jnp.pad(batch.group_len, (0, groups)),
        sample=jnp.where(sampled, batch.sample, -1),
        tag=jnp.where(sampled, tag[ids], -1),
        draft=jnp.where(sampled[:, None], draft, -1),
    )
    return entry, tokens


def _drafts(batch: TickBatch, decode, rows: RowState, ids, sh: PipelineShape, proposer,
            page_tokens, tables, last_position) -> jax.Array:  # fmt: skip
    """i32 [mb, k]: the drafts of the entering micro-batch's rows `ids`, for the decode slots
    the host gave each beyond its first (none for a row given one slot); -1 = none. A row's
    text is the tokens of its pages before its position, then its next token; `proposer`
    (text, position, limit) -> drafts (Pipeline._proposer; None: the call proposes none)."""
    if proposer is None:
        return jnp.full((sh.rows, sh.drafts), -1, jnp.int32)
    local = jnp.where(decode & (batch.position > 0), batch.row - ids[0], sh.rows)
    slots = jnp.zeros((sh.rows,), jnp.int32).at[local].max(batch.position, mode="drop")
    position = rows.position[ids]
    pages = jnp.clip(tables[ids], 0, page_tokens.shape[0] - 1)
    text = page_tokens[pages].reshape(sh.rows, -1)  # [mb, pages_per_seq * block]
    at = jnp.minimum(position, text.shape[1] - 1)
    text = text.at[jnp.arange(sh.rows), at].set(rows.next_token[ids])
    limit = jnp.minimum(slots, last_position[ids] - position)
    return proposer(text, position, limit)


def _truncate(entry: Entry, tokens: int) -> Entry:
    """The first `tokens` slots and their query groups (a bucket of that size)."""
    groups = max(tokens // QUERY_BLOCK, 1)
    return entry._replace(
        row=entry.row[:tokens],
        position=entry.position[:tokens],
        decode=entry.decode[:tokens],
        group_start=entry.group_start[:groups],
        group_len=entry.group_len[:groups],
    )


def _count_prompt_tokens(penalties: Penalties, prompt_len, batch: TickBatch) -> Penalties:
    """Penalties: the prompt tokens entering now are seen by their rows; a prefill's first
    token clears what the row's previous request left; recomputed outputs (positions past the
    prompt, after a preemption) count as generated."""
    b = jax.tree.map(lambda a: a[0], batch)
    prompt = (b.token >= 0) & (b.row >= 0)
    n = penalties.counts.shape[0]
    fresh = jnp.where(prompt & (b.position == 0), b.row, n)
    seen = penalties.seen.at[fresh].set(False, mode="drop")
    counts = penalties.counts.at[fresh].set(0, mode="drop")
    seen = seen.at[jnp.where(prompt, b.row, n), b.token].set(True, mode="drop")
    output = prompt & (b.position >= prompt_len[jnp.maximum(b.row, 0)])
    counts = counts.at[jnp.where(output, b.row, n), b.token].add(1, mode="drop")
    return Penalties(counts, seen)


def empty_log(mesh: Mesh, shape: PipelineShape, replicas: int, n_top: int, start: int) -> StepLog:
    """A call's log, nothing sampled yet; `start` the ring's tick at its first entry."""
    tick = jax.device_put(np.int32(start), jax.sharding.NamedSharding(mesh, REPLICATED))
    return _log_program(mesh, shape, replicas, n_top)(tick)


@functools.lru_cache(maxsize=16)
def _log_program(mesh: Mesh, shape: PipelineShape, replicas: int, n_top: int):
    """One jitted allocator of a call's log (one program, not one per array)."""
    lead = (shape.log_ticks, replicas, shape.rows)

    def make(start):
        return StepLog(
            start=start,
            tags=jnp.full(lead, -1, jnp.int32),
            tokens=jnp.zeros(lead, jnp.int32),
            logprob=jnp.zeros(lead, jnp.float32),
            top_ids=jnp.zeros(lead + (n_top,), jnp.int32),
            top_logprobs=jnp.zeros(lead + (n_top,), jnp.float32),
            drafts=jnp.full(lead + (shape.drafts,), -1, jnp.int32),
            accepted=jnp.zeros(lead, jnp.int32),
            work=jnp.zeros((shape.log_ticks, replicas, shape.stages), jnp.int32),
            live=jnp.zeros((shape.log_ticks, replicas), jnp.int32),
        )

    shardings = jax.tree.map(
        lambda spec: jax.sharding.NamedSharding(mesh, spec),
        Pipeline.log_spec(),
        is_leaf=lambda x: isinstance(x, P),
    )
    return jax.jit(make, out_shardings=shardings)


def empty_ring(
    mesh: Mesh,
    shape: PipelineShape,
    slots: int,
    replicas: int,
    kv_heads: int,
    head_dim: int,
    hidden: int,
    vocab_padded: int,
    penalties: bool,
    dtype,
) -> Ring:
    """A fresh ring: zero pools, nothing in flight, no row live."""  # fmt: skip
    S, mb, T, G = shape.stages, shape.rows, shape.max_tokens, shape.max_groups
    rows = replicas * shape.microbatches * mb

    def zeros(global_shape, axes):
        sharding = jax.sharding.NamedSharding(mesh, logical_to_spec(axes))
        return _filled_program(global_shape, jnp.dtype(dtype), 0, sharding)()

    shapes = pool_shapes(shape, slots, replicas, kv_heads, head_dim)
    cache = KVCache(*(tuple(zeros(*leaf) for leaf in arrays) for arrays in shapes))

    def put(a, spec):
        return jax.device_put(a, jax.sharding.NamedSharding(mesh, spec))

    lead = (S, replicas)
    history = Entry(
        row=np.full(lead + (T,), -1, np.int32),
        position=np.full(lead + (T,), -1, np.int32),
        decode=np.zeros(lead + (T,), bool),
        group_start=np.zeros(lead + (G,), np.int32),
        group_len=np.zeros(lead + (G,), np.int32),
        sample=np.full(lead + (mb,), -1, np.int32),
        tag=np.full(lead + (mb,), -1, np.int32),
        draft=np.full(lead + (mb, shape.drafts), -1, np.int32),
    )
    riding = T if S > 1 else 0  # one stage holds nothing in flight
    stages = StageState(
        cache=cache,
        riding=put(np.zeros((S, replicas, riding, hidden), dtype), RIDING),
        history=jax.tree.map(lambda a: put(a, PER_REPLICA), history),
        tick=put(np.int32(0), REPLICATED),
    )
    row_state = RowState(
        next_token=put(np.zeros(rows, np.int32), ROW),
        position=put(np.zeros(rows, np.int32), ROW),
        generated=put(np.zeros(rows, np.int32), ROW),
        live=put(np.zeros(rows, bool), ROW),
    )
    penalty_counts = empty_penalties(mesh, rows, vocab_padded if penalties else 0)
    automata = Automata(put(np.full(rows, -1, np.int32), ROW))
    pages, block = shape.page_token_shape
    page_tokens = put(np.full((replicas * pages, block), -1, np.int32), ROW)
    return Ring(stages, row_state, penalty_counts, automata, page_tokens)


def empty_penalties(mesh: Mesh, rows: int, width: int) -> Penalties:
    """Nothing counted yet: `width` columns per row (0 until a penalised request comes)."""
    sharding = jax.sharding.NamedSharding(mesh, ROW)
    return Penalties(
        counts=jax.device_put(np.zeros((rows, width), np.int32), sharding),
        seen=jax.device_put(np.zeros((rows, width), bool), sharding),
    )


def pool_shapes(
    shape: PipelineShape, slots: int, replicas: int, kv_heads: int, head_dim: int
) -> KVCache:
    """(global shape, logical axes) of each K and V page pool, one per layer slot: what
    `empty_ring` allocates and what `jaxpp plan` sizes."""
    lead = (shape.stages * replicas * shape.pages, kv_heads)
    k = (lead + (head_dim, shape.block_size), K_POOL_AXES)
    v = (lead + (shape.block_size, head_dim), V_POOL_AXES)
    return KVCache((k,) * slots, (v,) * slots)


@functools.lru_cache(maxsize=64)
def _filled_program(shape, dtype, value, sharding):
    """One jitted allocator per array shape (a fresh lambda per call would compile each time)."""
    return jax.jit(lambda: jnp.full(shape, value, dtype), out_shardings=sharding)
