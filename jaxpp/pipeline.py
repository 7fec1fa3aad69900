"""What one tick computes: ONE jitted `jax.shard_map` ring over the stages, many requests' tokens
per tick over a paged KV cache, with no host round trip inside.

Every device runs the same program; `axis_index("stage")` tells it which stage it is. Layer slot
i of stage s lives at `layers[i][s]` (the partition is the sharding spec); each slot has its own
K and V page pool, `[stages, pages, ...]`, sharded the same way, so a stage only touches its own
layers' pages. Activations move s -> s+1 with `ppermute`.

The sequence rows (`max_num_seqs`) are split into M micro-batches of `mb` rows per pipeline
replica. At tick t stage s serves the entry that came in at tick t - s, which belongs to
micro-batch (t - s) mod M. An entry is a flat batch of tokens: the decode tokens of its
micro-batch's live rows (w of them, the call's decode width) and C prompt-token slots holding
chunks of any requests' prompts, each chunk cut into query blocks of QUERY_BLOCK tokens of one
request. The host fills the prompt slots under the token budget (scheduler.py); a prompt's
LAST token rides with its own row's micro-batch, so that when that micro-batch leaves the last
stage its first token is sampled with the decode tokens of the rows beside it. S = 3, M = 3,
prompts a (16 tokens), b (40) and c (24) arriving together, a budget of 40, rows a in m0, b in
m1, c in m2:

    tick     0         1          2          3          4          5
    stage 0  m0+a,b1   m1+b2,c1   m2+c2      m0'        m1'        m2'
    stage 1  .         m0+a,b1    m1+b2,c1   m2+c2      m0'        m1'
    stage 2  .         .          m0+a,b1    m1+b2,c1   m2+c2      m0'

(b1 = b[0:24], b2 = b[24:40], c1 = c[0:23], c2 = c[23]; ' = that micro-batch's next tokens: a's
first token is sampled when m0 leaves stage 2 at tick 2, b's at 3, c's at 4; c's last token
waits for m2's turn.) A micro-batch's tokens are sampled when it leaves the last stage (every
device samples the same token from the vocab-parallel head) and its next tokens enter stage 0 at
its next turn: with M >= S that is never before they exist. The ring never drains between calls;
after the S - 1 fill ticks of a fresh ring no stage idles while a micro-batch has live rows or a
prompt token is planned.

Each stage runs its layers over its entry: the tick's keys and values are written into their
pages, then every token attends to its own sequence's pages up to its own position
(attention.py). A call runs exactly K ticks in a `fori_loop` (K = rounds x M, chosen by the
host from two values): no loop in the program has a data-dependent trip count and nothing is a
`cond`, so on a GPU the host never waits inside a call. Empty layer slots of an uneven
partition are computed and masked out; idle stages compute padding.

What rides with an entry from stage to stage is only its activations (`ppermute`). Who its
tokens are (decode rows' request tags, latched when it entered; its prompt query blocks; which
rows finish their prompt in it) is known to every device without a collective: each keeps the
last S entries into stage 0, worked out from replicated state. Decode positions are read from
the row state, which changes only when the row's one token in flight is sampled.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxpp.attention import QUERY_BLOCK, paged_attention, write_kv
from jaxpp.model import VOCAB_AXES, embed_lookup, local_logits, rope_tables
from jaxpp.sampling import SamplerRows, sample
from jaxpp.scheduler import StepKind
from jaxpp.sharding import LOGICAL_TO_MESH, logical_to_spec

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
PER_TICK = P(None, BATCH)  # [ticks, replicas, ...]: the step log
PER_STAGE = P(None, "stage")  # [ticks, stages]: each stage reports its own column
REPLICATED = P()
ROW_OF, START, LENGTH = range(3)  # columns of a prompt query block: row, first position, tokens


class KVCache(NamedTuple):
    k: tuple[
        jax.Array, ...
    ]  # per layer slot: [stages, replicas * pages, kv_heads, head_dim, block]
    v: tuple[
        jax.Array, ...
    ]  # per layer slot: [stages, replicas * pages, kv_heads, block, head_dim]


class Entry(NamedTuple):
    """What entered stage 0 at one tick (per replica), as far as later stages need it."""

    tags: jax.Array  # i32 [mb]: request of each decode row, -1 = not live
    blocks: jax.Array  # i32 [NB_max, 3]: prompt query blocks (row, start, length; 0 = none)
    block_tags: jax.Array  # i32 [NB_max]: request of each block's row
    finish: jax.Array  # i32 [mb]: per row, prompt-slot index of its prompt's last token, or -1


class RingState(NamedTuple):
    """Everything the ring carries from one call to the next (donated each call)."""

    cache: KVCache
    hidden: jax.Array  # [stages, replicas, mb + C_max, D]: activations each stage received
    entries: Entry  # [stages, replicas, ...]: the last S entries (tick t at t mod S)
    tick: jax.Array  # i32 scalar: the ring's global tick
    next_token: jax.Array  # i32 [rows]: the token each live row feeds at its next turn
    position: jax.Array  # i32 [rows]: tokens in the row's pages (= position of next_token)
    generated: jax.Array  # i32 [rows]: tokens generated so far by the row's request
    live: jax.Array  # bool [rows]: the row is decoding
    counts: jax.Array  # i32 [rows, Vpad] output-token counts (penalties), or [rows, 0]
    seen: jax.Array  # bool [rows, Vpad] prompt+output tokens (repetition penalty), or [rows, 0]


class SlotControl(NamedTuple):
    """The host's word on every row, uploaded when it changes."""

    tag: jax.Array  # i32 [rows]: the request in the row (its serial number); -1 = stop/none
    sampler: SamplerRows  # [rows] sampling settings of that request
    prompt_len: jax.Array  # i32 [rows]: its prompt (positions past it hold recomputed outputs)
    generated0: jax.Array  # i32 [rows]: tokens it had generated before this prefill


class PromptPlan(NamedTuple):
    """The prompt tokens entering stage 0 at each tick of a call, per replica."""

    tokens: jax.Array  # i32 [replicas, M, C]
    blocks: jax.Array  # i32 [replicas, M, C / QUERY_BLOCK, 3]: row, start, length
    finish: jax.Array  # i32 [replicas, M, mb]: per row of the entering micro-batch, see Entry


class StepLog(NamedTuple):
    """What a call did, tick by tick."""

    tags: jax.Array  # i32 [K, replicas, w]: request of each sampled token, -1 = none
    tokens: jax.Array  # i32 [K, replicas, w]
    logprob: jax.Array  # f32 [K, replicas, w]
    top_ids: jax.Array  # i32 [K, replicas, w, N]
    top_logprobs: jax.Array  # f32 [K, replicas, w, N]
    work: jax.Array  # i32 [K, stages]: real tokens each stage computed, summed over replicas
    live: jax.Array  # i32 [K, replicas]: rows decoding after the tick
    logits: jax.Array  # f32 [K, replicas, C, V] prompt logits (collecting calls), else empty
    logit_blocks: jax.Array  # i32 [K, replicas, NB, 3]: tag, start, length of those blocks


@dataclasses.dataclass(frozen=True)
class PipelineShape:
    stages: int
    microbatches: int
    rows: int  # rows per micro-batch and replica (mb)
    prompt_slots: int  # the most prompt-token slots a tick carries (C_max, the token budget)
    block_size: int  # positions per KV page
    pages: int  # KV pages per replica and layer slot
    pages_per_seq: int  # block-table columns: pages of a max_model_len sequence
    rounds: int  # ring rounds of a long call (decode_chunk)
    vocab_size: int  # the real vocabulary (padded ids are masked)

    @property
    def query_blocks(self) -> int:
        return self.prompt_slots // QUERY_BLOCK


@dataclasses.dataclass
class _Program:
    """One step program: built, and compiled (or being compiled in the background)."""

    kind: StepKind
    jitted: Callable
    shapes: tuple  # of its arguments
    executable: Future  # the compiled program

    def ready(self) -> bool:
        return self.executable.done()


def _covers(big: StepKind, small: StepKind) -> bool:
    """A program of kind `big` can run a call planned as `small` (with its prompt arrays padded
    to big.prompt slots): the same rounds and sampler, room for all of its rows and items."""
    return (
        (big.rounds, big.mode, big.collect) == (small.rounds, small.mode, small.collect)
        and big.width >= small.width
        and big.prompt >= small.prompt
        and big.decode_items >= small.decode_items
        and big.prompt_items >= small.prompt_items
    )


class _Pace:
    """The ring's seconds per token-tick, a moving average over the time between consecutive
    calls (the engine dispatches a call once the one before the last is done, so that is about
    one call's time); a gap far longer than the pace (the engine waited for requests, or
    compiled) counts as 4x the pace."""

    def __init__(self):
        self.seconds_per_token_tick = 0.0
        self._last: tuple[float, int] | None = None  # (when, token-ticks) of the last call

    def call(self, token_ticks: int) -> None:
        now = time.perf_counter()
        if self._last is not None:
            sample = (now - self._last[0]) / self._last[1]
            pace = self.seconds_per_token_tick
            self.seconds_per_token_tick = (
                sample if not pace else 0.8 * pace + 0.2 * min(sample, 4 * pace)
            )
        self._last = (now, token_ticks)


def _cost(kind: StepKind) -> tuple[int, int]:
    """Which covering program is cheapest: tokens through the layers, then attention items."""
    return (kind.tokens, kind.decode_items + kind.prompt_items)


class Pipeline:
    """Builds and runs the jitted step programs for one model on one mesh."""

    def __init__(
        self,
        mesh: Mesh,
        graphdef,
        layer_graphdef,
        state: nnx.State,
        inv_freq,
        dtype,
        shape: PipelineShape,
        filled: np.ndarray,
    ):
        """`filled` [stages, slots]: which layer slots hold a layer (the partition's grid)."""
        self.mesh = mesh
        self.graphdef = graphdef
        self.layer_graphdef = layer_graphdef
        self.inv_freq = inv_freq
        self.dtype = dtype
        self.shape = shape
        self.state_specs = jax.tree.map(
            lambda v: logical_to_spec(v.get_metadata()["logical_axes"]),
            state,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )
        self.slots = filled.shape[1]
        # A slot filled on every stage runs unmasked; only an uneven partition masks.
        self.masked_slots = tuple(not bool(filled[:, i].all()) for i in range(self.slots))
        self.cache_spec = KVCache(
            (logical_to_spec(K_POOL_AXES),) * self.slots,
            (logical_to_spec(V_POOL_AXES),) * self.slots,
        )
        # Tests set this to NaN: what a stage reads for a dead row, a prompt slot's padding or
        # an idle tick must never matter.
        self.bubble_fill: float | None = None
        # LLM(compile_in_background=True): see serving_kind.
        self.compile_in_background = False
        self._programs: dict[tuple, _Program] = {}
        self._compiler: ThreadPoolExecutor | None = None
        self.covered_calls = 0  # calls that ran on a covering program (serving_kind)
        self._padding_s: dict[tuple, float] = {}  # per uncompiled program: padding paid so far
        self._compile_s = 0.0  # the last compilation's seconds
        self._pace = _Pace()

    def serving_kind(
        self, kind: StepKind, state, ring: RingState, control: SlotControl, tables, plan
    ) -> StepKind:
        """The kind of program that runs a call planned as `kind`: its own, unless that is not
        compiled yet, `compile_in_background` is on and a compiled program covers the call
        (as wide or wider, as many prompt slots and attention items or more: it only pads
        more, tests/test_serving.py). Then the cheapest of those runs it, so that a server
        never holds its requests for a compilation once its first programs exist (seconds
        each on a CPU, and on a CPU the compilation takes cores from the ring too).

        Rent or buy: the call's own program is compiled, in a background thread, once the
        padding its covering programs cost (their extra tokens x ticks x the ring's measured
        seconds per token-tick) adds up to what the last compilation took. A shape met once
        or twice is padded for good; one met all the time gets its own program soon.
        `plan` may be the host's arrays: only their shapes are read."""
        key = self._key(kind, ring)
        own = self._programs.get(key)
        if not self.compile_in_background or (own is not None and own.ready()):
            return kind
        covering = [
            p for k, p in self._programs.items() if k[1:] == key[1:] and p.ready()
            and _covers(p.kind, kind)
        ]  # fmt: skip
        if not covering:
            return kind  # step() compiles it now (or waits for its compilation)
        cover = min(covering, key=lambda p: _cost(p.kind)).kind
        if own is None:
            extra = (cover.tokens - kind.tokens) * kind.rounds * self.shape.microbatches
            paid = self._padding_s.get(key, 0.0) + extra * self._pace.seconds_per_token_tick
            self._padding_s[key] = paid
            if paid >= self._compile_s:
                args = (state, ring, control, tables, plan)
                self._programs[key] = self._program(kind, args, background=True)
        self.covered_calls += 1
        return cover

    def step(
        self, state, ring: RingState, control: SlotControl, tables, plan: PromptPlan, kind: StepKind
    ) -> tuple[RingState, StepLog]:
        """Run the ring for kind.rounds x M ticks."""
        args = (state, ring, control, tables, plan)
        key = self._key(kind, ring)
        if key not in self._programs:
            self._programs[key] = self._program(kind, args, background=False)
        executable = self._programs[key].executable.result()
        if self.compile_in_background:  # the pace prices padding (serving_kind)
            self._pace.call(kind.tokens * kind.rounds * self.shape.microbatches)
        return executable(*args)

    def _key(self, kind: StepKind, ring: RingState) -> tuple:
        return (kind, ring.counts.shape, self.bubble_fill)

    def _program(self, kind: StepKind, args: tuple, background: bool) -> _Program:
        row = jax.sharding.NamedSharding(self.mesh, ROW)
        shapes = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", row)),
            args,
        )
        jitted = self._build(kind, self.bubble_fill)

        def compile_it():
            start = time.perf_counter()
            executable = jitted.lower(*shapes).compile()
            self._compile_s = time.perf_counter() - start
            return executable

        executable: Future = Future()
        if background:
            if self._compiler is None:
                self._compiler = ThreadPoolExecutor(1, thread_name_prefix="jaxpp-compile")
            executable = self._compiler.submit(compile_it)
        else:
            executable.set_result(compile_it())
        return _Program(kind, jitted, shapes, executable)

    @property
    def compiled_programs(self) -> int:
        return len(self._programs)

    def lowered_programs(self) -> list[tuple[Callable, tuple]]:
        """(jitted program, the shapes of its arguments) of every program built so far: what a
        test lowers to read the optimized HLO."""
        return [(p.jitted, p.shapes) for p in self._programs.values()]

    # --- one stage: its layers, one after another -------------------------------------------

    def _run_stage(self, layers, x, cache: KVCache, attend, kv_at, cos, sin):
        """Run this device's layer slots over x [1, T, D]: each writes the tick's keys and
        values into its pool (kv_at: page and offset of every token) and attends over it.
        The slot loop is unrolled over per-slot weights (a `scan` over a stack would slice,
        i.e. copy, each layer's weights every tick). Returns (x, the new pools)."""
        ks, vs = [], []
        for i, layer in enumerate(layers):
            h = layer.input_norm(x)
            q, k, v = layer.attn.qkv(h, cos, sin)
            k_pool, v_pool = write_kv(cache.k[i], cache.v[i], k[0], v[0], *kv_at)
            y = x + layer.attn.out(attend(q[0], k_pool, v_pool, layer.window[...])[None])
            y = y + layer.mlp(layer.post_attn_norm(y))
            x = jnp.where(layer.filled[...], y, x) if self.masked_slots[i] else y
            ks.append(k_pool)
            vs.append(v_pool)
        return x, KVCache(tuple(ks), tuple(vs))

    def _split(self, state):
        """Local model (embed/norm/head) and this stage's layers, one module per slot."""
        model = nnx.merge(self.graphdef, state)
        layers = [
            nnx.merge(self.layer_graphdef, jax.tree.map(lambda a: a[0], nnx.state(slot)))
            for slot in model.layers
        ]
        return model, layers

    # --- the program -------------------------------------------------------------------------

    def _build(self, kind: StepKind, bubble_fill):
        sh = self.shape
        S, M, mb, QB = sh.stages, sh.microbatches, sh.rows, QUERY_BLOCK
        w, C, mode = kind.width, kind.prompt, kind.mode
        NB = C // QB
        K = kind.rounds * M
        last = S - 1
        # s -> s + 1; stage 0 takes what enters from the host side, never what the last passed.
        shift = [(i, i + 1) for i in range(S - 1)]
        replicas = self.mesh.shape[BATCH]
        pages = sh.pages
        offsets = jnp.arange(QB)

        def over_replicas(x):
            return jax.lax.psum(x, BATCH) if replicas > 1 else x

        def program(state, ring: RingState, ctl: SlotControl, tables, plan: PromptPlan):
            model, layers = self._split(state)
            s = jax.lax.axis_index("stage")
            embed = model.embed[...]
            rows_local = ring.live.shape[0]

            def tick(k, carry):
                ring, log = carry
                t = ring.tick
                # What enters stage 0: the live rows of micro-batch t mod M and this tick's
                # planned prompt tokens. Every device works it out (from replicated state) and
                # keeps the last S entries: stage s serves what entered s ticks ago, and what
                # leaves the last stage is known everywhere without a collective.
                rows_in = jnp.mod(t, M) * mb + jnp.arange(w)
                tags_in = jnp.where(
                    ring.live[rows_in] & (ctl.tag[rows_in] >= 0), ctl.tag[rows_in], -1
                )
                if C:
                    tokens_in, blocks_in, finish_in = (
                        plan.tokens[0, k],
                        plan.blocks[0, k],
                        plan.finish[0, k],
                    )
                else:
                    tokens_in = jnp.zeros((0,), jnp.int32)
                    blocks_in = jnp.zeros((0, 3), jnp.int32)
                    finish_in = jnp.full((mb,), -1, jnp.int32)
                block_tags_in = jnp.where(
                    blocks_in[:, LENGTH] > 0, ctl.tag[blocks_in[:, ROW_OF]], -1
                )
                history = ring.entries
                entry = Entry(
                    history.tags[0, 0].at[:].set(-1).at[:w].set(tags_in),
                    history.blocks[0, 0].at[:].set(0).at[:NB].set(blocks_in),
                    history.block_tags[0, 0].at[:].set(-1).at[:NB].set(block_tags_in),
                    finish_in,
                )
                at = jnp.mod(t, S)
                history = jax.tree.map(
                    lambda h, e: jax.lax.dynamic_update_index_in_dim(h[:, 0], e, at, 0)[:, None],
                    history,
                    entry,
                )
                if mode.penalties:
                    ring = _count_prompt_tokens(ring, ctl, tokens_in, blocks_in, rows_local)

                # This stage's entry: micro-batch m's decode rows and the prompt blocks.
                mine = jax.tree.map(lambda h: h[jnp.mod(t - s, S), 0], history)
                dec_rows = jnp.mod(t - s, M) * mb + jnp.arange(w)
                dec_live = mine.tags[:w] >= 0
                dec_pos = jnp.where(dec_live, ring.position[dec_rows], -1)
                b_row, b_start, b_len = (mine.blocks[:NB, i] for i in range(3))
                p_real = offsets[None, :] < b_len[:, None]
                p_pos = jnp.where(p_real, b_start[:, None] + offsets, -1)  # [NB, QB]

                x = embed_lookup(embed, jnp.concatenate([ring.next_token[rows_in], tokens_in]))
                if S > 1:
                    hidden = ring.hidden[0, 0]
                    received = jnp.concatenate([hidden[:w], hidden[mb : mb + C]])
                    x = jnp.where(s == 0, x, received)
                real = jnp.concatenate([dec_live, p_real.reshape(-1)])
                if bubble_fill is not None:
                    x = jnp.where(real[:, None], x, bubble_fill)
                tok_pos = jnp.concatenate([dec_pos, p_pos.reshape(-1)])
                tok_seq = jnp.concatenate([dec_rows, jnp.repeat(b_row, QB)])
                page_col = jnp.clip(tok_pos // sh.block_size, 0, tables.shape[1] - 1)
                kv_at = (
                    jnp.where(tok_pos >= 0, tables[tok_seq, page_col], pages),
                    jnp.mod(tok_pos, sh.block_size),
                )
                cos, sin = rope_tables(jnp.maximum(tok_pos, 0)[None], self.inv_freq, self.dtype)

                def attend(q, k_pool, v_pool, window):
                    parts = []
                    if w:
                        dec = paged_attention(
                            q[:w, None], dec_pos[:, None], dec_rows, k_pool, v_pool, tables,
                            window, items=kind.decode_items, kind="decode",
                        )  # fmt: skip
                        parts.append(dec[:, 0])
                    if C:
                        blocks = q[w:].reshape((NB, QB) + q.shape[1:])
                        pre = paged_attention(
                            blocks, p_pos, b_row, k_pool, v_pool, tables, window,
                            items=kind.prompt_items, kind="prompt",
                        )  # fmt: skip
                        parts.append(pre.reshape((C,) + q.shape[1:]))
                    return jnp.concatenate(parts)

                out, cache = self._run_stage(layers, x[None], ring.cache, attend, kv_at, cos, sin)
                out = out[0]

                # What leaves the last stage gets its tokens, on every device.
                leaving = jax.tree.map(lambda h: h[jnp.mod(t - last, S), 0], history)
                rows_out = jnp.mod(t - last, M) * mb + jnp.arange(w)
                finish = leaving.finish[:w]
                source = jnp.where(finish >= 0, w + finish, jnp.arange(w))
                if kind.collect:
                    source = jnp.concatenate([source, w + jnp.arange(C)])
                final = jax.lax.psum(jnp.where(s == last, out[source], 0), "stage")
                logits = local_logits(model, final, sh.vocab_size)
                ring, record = _sample_and_update(
                    ring, ctl, logits[:w], leaving, rows_out, w, mode, sh.vocab_size
                )

                work = over_replicas(jnp.sum(real.astype(jnp.int32)))
                log = log._replace(
                    tags=log.tags.at[k, 0].set(record.tags),
                    tokens=log.tokens.at[k, 0].set(record.tokens),
                    logprob=log.logprob.at[k, 0].set(record.logprob),
                    top_ids=log.top_ids.at[k, 0].set(record.top_ids),
                    top_logprobs=log.top_logprobs.at[k, 0].set(record.top_logprobs),
                    work=log.work.at[k, 0].set(work),
                    live=log.live.at[k, 0].set(jnp.sum(ring.live.astype(jnp.int32))),
                )
                if kind.collect:
                    meta = jnp.concatenate(
                        [leaving.block_tags[:NB, None], leaving.blocks[:NB, 1:]], 1
                    )
                    log = log._replace(
                        logits=log.logits.at[k, 0].set(logits[w:]),
                        logit_blocks=log.logit_blocks.at[k, 0].set(meta),
                    )
                if S > 1:
                    sent = jax.lax.ppermute(out, "stage", shift)
                    hidden = jax.lax.dynamic_update_slice(ring.hidden[0, 0], sent[:w], (0, 0))
                    hidden = jax.lax.dynamic_update_slice(hidden, sent[w:], (mb, 0))
                    ring = ring._replace(hidden=hidden[None, None])
                ring = ring._replace(cache=cache, entries=history, tick=t + 1)
                return ring, log

            log = _empty_log(K, w, mode.logprobs, C, NB, kind.collect, model)
            # Rows the host withdrew stop now: it refills them only after this call.
            ring = ring._replace(live=ring.live & (ctl.tag >= 0))
            return jax.lax.fori_loop(0, K, tick, (ring, log))

        rows_spec = SamplerRows(*([ROW] * len(SamplerRows._fields)))
        ring_spec = RingState(
            cache=self.cache_spec,
            hidden=RIDING,
            entries=Entry(*([PER_REPLICA] * len(Entry._fields))),
            tick=REPLICATED,
            next_token=ROW,
            position=ROW,
            generated=ROW,
            live=ROW,
            counts=ROW,
            seen=ROW,
        )
        log_spec = StepLog(
            tags=PER_TICK,
            tokens=PER_TICK,
            logprob=PER_TICK,
            top_ids=PER_TICK,
            top_logprobs=PER_TICK,
            work=PER_STAGE,
            live=PER_TICK,
            logits=P(None, BATCH, None, VOCAB_AXES) if kind.collect else PER_TICK,
            logit_blocks=PER_TICK,
        )
        # Float32 means float32: accelerators run float32 matmuls in TF32 unless asked not to
        # (4.6e-4 of the logit scale from transformers on an H200; 6.4e-7 at "highest").
        # bfloat16 keeps the fast default (float32 accumulation; softmax and norms in float32).
        precision = "highest" if jnp.dtype(self.dtype) == jnp.float32 else None

        def precise(*args):
            with jax.default_matmul_precision(precision):
                return program(*args)

        fn = jax.shard_map(
            precise,
            mesh=self.mesh,
            in_specs=(
                self.state_specs,
                ring_spec,
                SlotControl(ROW, rows_spec, ROW, ROW),
                ROW,
                PromptPlan(ROW, ROW, ROW),
            ),
            out_specs=(ring_spec, log_spec),
            check_vma=False,
        )
        # Outputs placed as the specs say, empty ones too (XLA would call a [rows, 0] array
        # replicated): the next call's compiled program takes exactly these shardings.
        out_shardings = jax.tree.map(
            lambda spec: jax.sharding.NamedSharding(self.mesh, spec),
            (ring_spec, log_spec),
            is_leaf=lambda x: isinstance(x, P),
        )
        return jax.jit(fn, donate_argnums=(1,), out_shardings=out_shardings)


def _count_prompt_tokens(ring: RingState, ctl: SlotControl, tokens, blocks, rows: int):
    """Penalties: the prompt tokens entering now are seen by their rows; a prefill's first
    block clears what the row's previous request left; recomputed outputs (positions past the
    prompt, after a preemption) count as generated."""
    row, start, length = (blocks[:, i] for i in range(3))
    fresh = jnp.where((start == 0) & (length > 0), row, rows)
    seen = ring.seen.at[fresh].set(False, mode="drop")
    counts = ring.counts.at[fresh].set(0, mode="drop")
    offsets = jnp.arange(QUERY_BLOCK)
    real = (offsets[None, :] < length[:, None]).reshape(-1)
    token_row = jnp.repeat(row, QUERY_BLOCK)
    position = (start[:, None] + offsets).reshape(-1)
    seen = seen.at[jnp.where(real, token_row, rows), tokens].set(True, mode="drop")
    output = real & (position >= ctl.prompt_len[token_row])
    counts = counts.at[jnp.where(output, token_row, rows), tokens].add(1, mode="drop")
    return ring._replace(seen=seen, counts=counts)


class _Record(NamedTuple):
    tags: jax.Array
    tokens: jax.Array
    logprob: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


def _sample_and_update(
    ring: RingState, ctl: SlotControl, logits, leaving: Entry, rows, w, mode, vocab
) -> tuple[RingState, _Record]:
    """Sample the next token of every row of the micro-batch leaving the last stage that
    decoded or finished its prompt; update the rows (one stops the moment its stop token or
    token budget is reached) and return the log entries."""
    finish = leaving.finish[:w]
    first = finish >= 0  # the row's prompt ended here: this is its first new token
    decoding = leaving.tags[:w] >= 0
    sampled = first | decoding
    block = jnp.maximum(finish, 0) // QUERY_BLOCK
    end = leaving.blocks[block, START] + jnp.mod(jnp.maximum(finish, 0), QUERY_BLOCK) + 1
    sampler = SamplerRows(*(a[rows] for a in ctl.sampler))
    generated = jnp.where(first, ctl.generated0[rows], ring.generated[rows])
    counts = ring.counts[rows] if mode.penalties else None
    seen = ring.seen[rows] if mode.penalties else None
    got = sample(logits, sampler, generated, counts, seen, vocab, mode)

    hit_stop = (got.tokens[:, None] == sampler.stop_ids).any(-1) & (
        generated + 1 > sampler.min_tokens
    )
    finished = hit_stop | (generated + 1 >= sampler.max_tokens)
    # A row the host has withdrawn (tag -1) stops, even for a token that entered before.
    cont = sampled & ~finished & (ctl.tag[rows] >= 0)

    def put(array, value):
        return array.at[rows].set(jnp.where(sampled, value, array[rows]))

    ring = ring._replace(
        next_token=put(ring.next_token, got.tokens),
        position=put(ring.position, jnp.where(first, end, ring.position[rows] + 1)),
        generated=put(ring.generated, generated + 1),
        live=put(ring.live, cont),
    )
    if mode.penalties:
        hit = jax.nn.one_hot(got.tokens, ring.counts.shape[1], dtype=jnp.int32)
        hit = hit * sampled[:, None]
        ring = ring._replace(
            counts=ring.counts.at[rows].add(hit), seen=ring.seen.at[rows].set(seen | (hit > 0))
        )
    tags = jnp.where(first, leaving.block_tags[block], leaving.tags[:w])
    log_tags = jnp.where(sampled, tags, -1)
    return ring, _Record(log_tags, got.tokens, got.logprob, got.top_ids, got.top_logprobs)


def _empty_log(K, w, n_top, C, NB, collect: bool, model) -> StepLog:
    if collect:
        logits = jnp.zeros((K, 1, C, model.embed.shape[0]), jnp.float32)
        blocks = jnp.full((K, 1, NB, 3), -1, jnp.int32)
    else:
        logits = jnp.zeros((K, 1, 0, 0), jnp.float32)
        blocks = jnp.zeros((K, 1, 0, 3), jnp.int32)
    return StepLog(
        tags=jnp.full((K, 1, w), -1, jnp.int32),
        tokens=jnp.zeros((K, 1, w), jnp.int32),
        logprob=jnp.zeros((K, 1, w), jnp.float32),
        top_ids=jnp.zeros((K, 1, w, n_top), jnp.int32),
        top_logprobs=jnp.zeros((K, 1, w, n_top), jnp.float32),
        work=jnp.zeros((K, 1), jnp.int32),
        live=jnp.zeros((K, 1), jnp.int32),
        logits=logits,
        logit_blocks=blocks,
    )


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
) -> RingState:
    """A fresh ring: zero pools, nothing in flight, no row live."""
    S, mb = shape.stages, shape.rows
    rows = replicas * shape.microbatches * mb

    def zeros(global_shape, axes):
        sharding = jax.sharding.NamedSharding(mesh, logical_to_spec(axes))
        return _zeros_program(global_shape, jnp.dtype(dtype), sharding)()

    shapes = pool_shapes(shape, slots, replicas, kv_heads, head_dim)
    cache = KVCache(*(tuple(zeros(*leaf) for leaf in arrays) for arrays in shapes))

    def put(a, spec):
        return jax.device_put(a, jax.sharding.NamedSharding(mesh, spec))

    NB = shape.query_blocks
    lead = (S, replicas)
    entries = Entry(
        tags=np.full(lead + (mb,), -1, np.int32),
        blocks=np.zeros(lead + (NB, 3), np.int32),
        block_tags=np.full(lead + (NB,), -1, np.int32),
        finish=np.full(lead + (mb,), -1, np.int32),
    )
    width = vocab_padded if penalties else 0
    riding = mb + shape.prompt_slots if S > 1 else 0  # one stage holds nothing in flight
    return RingState(
        cache=cache,
        hidden=put(np.zeros((S, replicas, riding, hidden), dtype), RIDING),
        entries=jax.tree.map(lambda a: put(a, PER_REPLICA), entries),
        tick=put(np.int32(0), REPLICATED),
        next_token=put(np.zeros(rows, np.int32), ROW),
        position=put(np.zeros(rows, np.int32), ROW),
        generated=put(np.zeros(rows, np.int32), ROW),
        live=put(np.zeros(rows, bool), ROW),
        counts=put(np.zeros((rows, width), np.int32), ROW),
        seen=put(np.zeros((rows, width), bool), ROW),
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
def _zeros_program(shape, dtype, sharding):
    """One jitted allocator per pool shape (a fresh lambda per call would compile each time)."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
