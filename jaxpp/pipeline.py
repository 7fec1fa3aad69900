"""The two pipeline schedules, each ONE jitted `jax.shard_map` program over the whole mesh.

Every device runs the same program; `axis_index("stage")` tells it which stage it is. Layer slot
i of stage s lives at `layers[i][s]` (the partition is the sharding spec); the KV cache has one K
and one V array per slot, `[stages, sequences, kv_heads, ...]`, sharded the same way, so a stage
only ever touches its own layers' cache. Activations move s -> s+1 with `ppermute`.

Prefill (GPipe), S = 3 stages, M = 4 micro-batches: stage s runs micro-batch t - s at tick t,
M + S - 1 ticks, bubble (S - 1) / (M + S - 1) = 2/6.

    tick     0   1   2   3   4   5
    stage 0  m0  m1  m2  m3  .   .
    stage 1  .   m0  m1  m2  m3  .
    stage 2  .   .   m0  m1  m2  m3   -> final hidden states -> vocab-parallel LM head

Decode (circular ring), S = 3, M = 3: stage s runs micro-batch (t - s) mod M. When the last stage
finishes a micro-batch, every device samples its next token from the vocab-parallel head, and
the token is embedded (vocab-parallel table) and enters stage 0 at the very next tick — when that
micro-batch's turn comes round again. After the S - 1 fill ticks no stage ever idles; K ticks run
inside one `while_loop` (leaving early once every sequence is done), and the ring's in-flight
activations are carried between calls, so there is no refill per call.

    tick     0   1   2   3   4   5   6   7 ...
    stage 0  m0  m1  m2  m0' m1' m2' m0" m1"      ' = next token of that micro-batch
    stage 1  .   m0  m1  m2  m0' m1' m2' m0"
    stage 2  .   .   m0  m1  m2  m0' m1' m2'
                     ^ m0's token sampled here, m0' enters stage 0 at tick 3

With M > S micro-batches the sampled token waits in `next_token` until its micro-batch's turn.
Ticks that fall in a bubble skip the stage's work with `lax.cond` (nothing is computed into the
result), as do empty slots of an uneven partition. Both programs count their own ticks and the
stage-ticks that did real work, so the bubble fraction is measured, not assumed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxpp.model import (
    VOCAB_AXES,
    attend_cached,
    attend_prompt,
    embed_lookup,
    local_logits,
    rope_tables,
)
from jaxpp.sampling import SamplerMode, SamplerRows, sample
from jaxpp.sharding import LOGICAL_TO_MESH, logical_to_spec

# K is stored [.., head_dim, seq] and V [.., seq, head_dim]: both decode dots (q.K and p.V) are
# then plain batched matmuls over (sequence, kv head) with no per-tick relayout of the cache
# (measured 2.1x faster decode on CPU than a [.., seq, kv_heads, head_dim] cache). One array per
# layer slot, like the weights: slicing a layer out of a stacked cache would copy it every tick.
K_CACHE_AXES = ("stage", "batch", "kv_heads", "head_dim", "seq")
V_CACHE_AXES = ("stage", "batch", "kv_heads", "seq", "head_dim")
ROW = P(LOGICAL_TO_MESH["batch"])  # per-sequence arrays: split over pipeline replicas
REPLICATED = P()
SCHEDULE = P(None, "stage")  # [ticks, stages]: each stage reports its own column


class KVCache(NamedTuple):
    k: tuple[jax.Array, ...]  # per layer slot: [stages, sequences, kv_heads, head_dim, max_len]
    v: tuple[jax.Array, ...]  # per layer slot: [stages, sequences, kv_heads, max_len, head_dim]


TRACE_TICKS = 64  # decode ticks whose schedule is recorded (the prefill records all of its)


class RunStats(NamedTuple):
    ticks: jax.Array  # ticks the program executed
    busy: jax.Array  # stage-ticks that did real work (summed over stages, one pipeline replica)
    schedule: jax.Array  # i32 [ticks, stages]: the micro-batch each stage ran per tick, -1 idle


class DecodeState(NamedTuple):
    """Everything the decode ring carries from one call to the next (donated each call)."""

    cache: KVCache
    in_flight: jax.Array  # [stages, sequences_per_microbatch * dp, 1, D] activation per stage
    tick: jax.Array  # i32 scalar: global tick counter of the ring
    next_token: jax.Array  # i32 [B]: the token each sequence feeds at its next turn
    position: jax.Array  # i32 [B]: tokens in the cache (= position of next_token)
    generated: jax.Array  # i32 [B]: tokens generated so far (the prefill's first one included)
    done: jax.Array  # bool [B]
    out_tokens: jax.Array  # i32 [B, max_new]
    out_logprob: jax.Array  # f32 [B, max_new]
    top_ids: jax.Array  # i32 [B, max_new, N]
    top_logprobs: jax.Array  # f32 [B, max_new, N]
    counts: jax.Array  # i32 [B, Vpad] output-token counts (penalties), or [B, 0]
    seen: jax.Array  # bool [B, Vpad] prompt+output tokens (repetition penalty), or [B, 0]
    stats: RunStats


@dataclasses.dataclass(frozen=True)
class PipelineShape:
    stages: int
    microbatches: int
    vocab_size: int  # the real vocabulary (padded ids are masked)


class Pipeline:
    """Builds the jitted prefill and decode programs for one model on one mesh."""

    def __init__(
        self,
        mesh: Mesh,
        graphdef,
        layer_graphdef,
        state: nnx.State,
        inv_freq,
        dtype,
        shape: PipelineShape,
    ):
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
        slots = len(nnx.merge(graphdef, state).layers)
        self.cache_spec = KVCache(
            (logical_to_spec(K_CACHE_AXES),) * slots, (logical_to_spec(V_CACHE_AXES),) * slots
        )
        # Tests set this to NaN: what a stage reads during a bubble tick must never matter.
        self.bubble_fill: float | None = None
        self._compiled: dict[tuple, Callable] = {}

    # --- one stage: its layers, one after another -------------------------------------------

    def _run_stage(self, layers, x, cache: KVCache | None, attention, cos, sin):
        """Run this device's layer slots, one after another, over x [R, T, D].

        Returns (x, the new keys and values of every slot). The cache is only READ here:
        `attention(slot_cache, q, k, v, window)` attends over the slot's cache as it was plus
        this call's own k, v, and the caller writes the new keys and values after the stage
        ran. Threading the cache through the `lax.cond`s instead makes XLA copy every layer's
        K and V on every tick (measured: copies were a fifth of the batch-1 decode tick).
        The slot loop is unrolled over per-slot weights: a `scan` over a stack would slice each
        layer out of it, i.e. copy its weights, every tick. Empty slots are skipped.
        """
        new_kv = []
        for i, layer in enumerate(layers):
            slot_cache = None if cache is None else (cache.k[i], cache.v[i])

            def compute(x, layer=layer, slot_cache=slot_cache):
                h = layer.input_norm(x)
                q, k, v = layer.attn.qkv(h, cos, sin)
                x = x + layer.attn.out(attention(slot_cache, q, k, v, layer.window[...]))
                return x + layer.mlp(layer.post_attn_norm(x)), (k, v)

            x, kv = jax.lax.cond(layer.filled[...], compute, _skip_like(compute), x)
            new_kv.append(kv)
        return x, new_kv

    def _split(self, state):
        """Local model (embed/norm/head) and this stage's layers, one module per slot."""
        model = nnx.merge(self.graphdef, state)
        layers = [
            nnx.merge(self.layer_graphdef, jax.tree.map(lambda a: a[0], nnx.state(slot)))
            for slot in model.layers
        ]
        return model, layers

    # --- prefill: GPipe --------------------------------------------------------------------

    def prefill(
        self,
        state,
        tokens,
        lengths,
        cache: KVCache | None,
        rows: SamplerRows | None,
        mode: SamplerMode | None,
    ):
        """Run prompts [B, T] through the pipeline.

        With `rows` (generate): writes the KV cache and returns (cache, first tokens, Sampled
        extras, stats). Without (logits): returns (logits [B, T, Vpad] float32, stats).
        """
        key = (
            "prefill",
            tokens.shape,
            cache is not None and cache.k[0].shape,
            mode,
            self.bubble_fill,
        )
        if key not in self._compiled:
            self._compiled[key] = self._build_prefill(
                cache is not None, rows is not None, mode, self.bubble_fill
            )
        return self._compiled[key](state, tokens, lengths, cache, rows)

    def _build_prefill(self, with_cache: bool, with_sampling: bool, mode, bubble_fill):
        S, M = self.shape.stages, self.shape.microbatches
        last = S - 1

        def program(state, tokens, lengths, cache, rows):
            model, layers = self._split(state)
            s = jax.lax.axis_index("stage")
            rows_local, T = tokens.shape
            mb = rows_local // M
            x_all = embed_lookup(model.embed[...], tokens).reshape(M, mb, T, -1)
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (mb, T))
            cos, sin = rope_tables(positions, self.inv_freq, self.dtype)
            cache = jax.tree.map(lambda a: a[0], cache)  # this stage's shard

            def tick(t, carry):
                act, cache, finals, busy, schedule = carry
                m = t - s
                valid = (m >= 0) & (m < M)
                m = jnp.clip(m, 0, M - 1)
                x = jnp.where(s == 0, x_all[jnp.clip(t, 0, M - 1)], act)
                if bubble_fill is not None:
                    x = jnp.where(valid, x, bubble_fill)

                def attention(slot_cache, q, k, v, window):  # a prompt attends to itself
                    return attend_prompt(q, k, v, positions, window)

                def work(x):
                    return self._run_stage(layers, x, None, attention, cos, sin)

                out, new_kv = jax.lax.cond(valid, work, _skip_like(work), x)
                if cache is not None:  # k, v [mb, T, Hkv, Dh] -> the cache's layouts
                    at = (m * mb, 0, 0, 0)
                    cache = KVCache(
                        tuple(
                            _write_if(valid, c, k.transpose(0, 2, 3, 1), at)
                            for c, (k, _) in zip(cache.k, new_kv, strict=True)
                        ),
                        tuple(
                            _write_if(valid, c, v.transpose(0, 2, 1, 3), at)
                            for c, (_, v) in zip(cache.v, new_kv, strict=True)
                        ),
                    )
                keep = jnp.where(valid & (s == last), out, finals[m])
                finals = jax.lax.dynamic_update_index_in_dim(finals, keep, m, 0)
                act = jax.lax.ppermute(out, "stage", [(i, i + 1) for i in range(S - 1)])
                schedule = schedule.at[t, 0].set(jnp.where(valid, m, -1))
                return act, cache, finals, busy + valid.astype(jnp.int32), schedule

            ticks = M + S - 1
            init = (
                jnp.zeros_like(x_all[0]),
                cache,
                jnp.zeros_like(x_all),
                jnp.int32(0),
                jnp.full((ticks, 1), -1, jnp.int32),
            )
            _, cache, finals, busy, schedule = jax.lax.fori_loop(0, ticks, tick, init)
            busy = jax.lax.pmax(jax.lax.psum(busy, "stage"), ("data", "tensor"))
            stats = RunStats(jnp.int32(ticks), busy, schedule)
            # The last stage holds the final hidden states; share them for the vocab-parallel head.
            finals = jax.lax.psum(jnp.where(s == last, finals, 0), "stage").reshape(
                rows_local, T, -1
            )
            if not with_sampling:
                return local_logits(model, finals, self.shape.vocab_size), stats
            cache = jax.tree.map(lambda a: a[None], cache)
            last_hidden = finals[jnp.arange(rows_local), lengths - 1]
            logits = local_logits(model, last_hidden, self.shape.vocab_size)
            seen = None
            if mode.penalties:
                vocab = logits.shape[-1] * jax.lax.psum(1, VOCAB_AXES)
                valid_tok = jnp.arange(T)[None, :] < lengths[:, None]
                seen = (
                    jnp.zeros((rows_local, vocab), bool)
                    .at[jnp.arange(rows_local)[:, None], jnp.where(valid_tok, tokens, vocab)]
                    .set(True, mode="drop")
                )
            counts = None if seen is None else jnp.zeros(seen.shape, jnp.int32)
            generated = jnp.zeros((rows_local,), jnp.int32)
            sampled = sample(logits, rows, generated, counts, seen, self.shape.vocab_size, mode)
            if seen is None:
                seen = jnp.zeros((rows_local, 0), bool)
            return cache, sampled, seen, stats

        rows_spec = SamplerRows(*([ROW] * len(SamplerRows._fields)))
        in_specs = (
            self.state_specs,
            ROW,
            ROW,
            self.cache_spec if with_cache else None,
            rows_spec if with_sampling else None,
        )
        if with_sampling:
            out_specs = (
                self.cache_spec,
                ROW,
                ROW,
                RunStats(REPLICATED, REPLICATED, SCHEDULE),
            )
        else:
            out_specs = (
                P(LOGICAL_TO_MESH["batch"], None, VOCAB_AXES),
                RunStats(REPLICATED, REPLICATED, SCHEDULE),
            )
        fn = jax.shard_map(
            program, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )
        return jax.jit(fn, donate_argnums=(3,) if with_cache else ())

    # --- decode: the circular ring -----------------------------------------------------------

    def decode(
        self, state, dstate: DecodeState, rows: SamplerRows, tick_end, mode: SamplerMode
    ) -> DecodeState:
        """Advance the ring until tick `tick_end` or until every sequence is done."""
        key = (
            "decode",
            dstate.cache.k[0].shape,
            dstate.out_tokens.shape,
            dstate.top_ids.shape,
            mode,
            self.bubble_fill,
        )
        if key not in self._compiled:
            self._compiled[key] = self._build_decode(mode, self.bubble_fill)
        return self._compiled[key](state, dstate, rows, tick_end)

    def _build_decode(self, mode: SamplerMode, bubble_fill):
        S, M = self.shape.stages, self.shape.microbatches
        last = S - 1
        ring = [(i, (i + 1) % S) for i in range(S)]

        def program(state, d: DecodeState, rows: SamplerRows, tick_end):
            model, layers = self._split(state)
            s = jax.lax.axis_index("stage")
            mb = d.next_token.shape[0] // M
            embed = model.embed[...]

            def rows_of(array, m):
                return jax.lax.dynamic_slice_in_dim(array, m * mb, mb, 0)

            def tick_body(d: DecodeState) -> DecodeState:
                t = d.tick
                # Stage s works on micro-batch (t - s) mod M; nothing to do during the fill or
                # once every sequence of that micro-batch has finished.
                m = jnp.mod(t - s, M)
                valid = (t - s >= 0) & jnp.any(~rows_of(d.done, m))
                x0 = embed_lookup(embed, rows_of(d.next_token, jnp.mod(t, M)))[:, None, :]
                x = jnp.where(s == 0, x0, d.in_flight[0])
                if bubble_fill is not None:
                    x = jnp.where(valid, x, bubble_fill)
                q_pos = rows_of(d.position, m)[:, None]
                cos, sin = rope_tables(q_pos, self.inv_freq, self.dtype)

                def attention(slot_cache, q, k, v, window):
                    keys, values = slot_cache
                    if M > 1:  # this micro-batch's rows (a copy; with M == 1 the cache itself)
                        keys = jax.lax.dynamic_slice_in_dim(keys, m * mb, mb, 0)
                        values = jax.lax.dynamic_slice_in_dim(values, m * mb, mb, 0)
                    return attend_cached(q, keys, values, k[:, 0], v[:, 0], q_pos[:, 0], window)

                cache = jax.tree.map(lambda a: a[0], d.cache)  # this stage's shard

                def work(x):
                    return self._run_stage(layers, x, cache, attention, cos, sin)

                out, new_kv = jax.lax.cond(valid, work, _skip_like(work), x)
                cache = _write_decode(cache, new_kv, valid, m, mb, q_pos[:, 0])

                # The micro-batch leaving the last stage gets its next token, on every device.
                m_out = jnp.mod(t - last, M)
                hidden = jax.lax.psum(jnp.where(s == last, out, 0), "stage")[:, 0]
                logits = local_logits(model, hidden, self.shape.vocab_size)
                out_rows = SamplerRows(*(rows_of(a, m_out) for a in rows))
                generated = rows_of(d.generated, m_out)
                counts = rows_of(d.counts, m_out) if mode.penalties else None
                seen = rows_of(d.seen, m_out) if mode.penalties else None
                got = sample(logits, out_rows, generated, counts, seen, self.shape.vocab_size, mode)
                live = (t >= last) & ~rows_of(d.done, m_out)
                d = _record(d, m_out * mb + jnp.arange(mb), live, got, generated, out_rows, mode)
                busy = jax.lax.psum(valid.astype(jnp.int32), "stage")
                at = jnp.minimum(t, TRACE_TICKS - 1)
                traced = jnp.where(
                    t < TRACE_TICKS, jnp.where(valid, m, -1), d.stats.schedule[at, 0]
                )
                return d._replace(
                    cache=jax.tree.map(lambda a: a[None], cache),
                    in_flight=jax.lax.ppermute(out, "stage", ring)[None],
                    tick=t + 1,
                    stats=RunStats(
                        d.stats.ticks + 1,
                        d.stats.busy + busy,
                        d.stats.schedule.at[at, 0].set(traced),
                    ),
                )

            def running(d: DecodeState):
                pending = jax.lax.psum(jnp.sum(~d.done), "data")
                return (d.tick < tick_end) & (pending > 0)

            return jax.lax.while_loop(running, tick_body, d)

        rows_spec = SamplerRows(*([ROW] * len(SamplerRows._fields)))
        d_spec = DecodeState(
            cache=self.cache_spec,
            in_flight=P("stage", LOGICAL_TO_MESH["batch"]),
            tick=REPLICATED,
            next_token=ROW,
            position=ROW,
            generated=ROW,
            done=ROW,
            out_tokens=ROW,
            out_logprob=ROW,
            top_ids=ROW,
            top_logprobs=ROW,
            counts=ROW,
            seen=ROW,
            stats=RunStats(REPLICATED, REPLICATED, SCHEDULE),
        )
        fn = jax.shard_map(
            program,
            mesh=self.mesh,
            in_specs=(self.state_specs, d_spec, rows_spec, REPLICATED),
            out_specs=d_spec,
            check_vma=False,
        )
        return jax.jit(fn, donate_argnums=(1,))


def _record(d: DecodeState, row_ids, live, got, generated, rows: SamplerRows, mode) -> DecodeState:
    """Store the tokens just sampled for rows `row_ids` and update their stop state."""
    slot = jnp.minimum(generated, d.out_tokens.shape[1] - 1)
    tokens = got.tokens
    hit_stop = (tokens[:, None] == rows.stop_ids).any(-1) & (generated + 1 > rows.min_tokens)
    finished = hit_stop | (generated + 1 >= rows.max_tokens)

    def put(array, value):
        old = array[row_ids, slot]
        mask = live.reshape(live.shape + (1,) * (old.ndim - 1))
        return array.at[row_ids, slot].set(jnp.where(mask, value, old))

    d = d._replace(
        out_tokens=put(d.out_tokens, tokens),
        out_logprob=put(d.out_logprob, got.logprob),
        top_ids=put(d.top_ids, got.top_ids),
        top_logprobs=put(d.top_logprobs, got.top_logprobs),
        next_token=d.next_token.at[row_ids].set(jnp.where(live, tokens, d.next_token[row_ids])),
        position=d.position.at[row_ids].add(live.astype(jnp.int32)),
        generated=d.generated.at[row_ids].add(live.astype(jnp.int32)),
        done=d.done.at[row_ids].set(d.done[row_ids] | (live & finished)),
    )
    if mode.penalties:
        hit = jax.nn.one_hot(tokens, d.counts.shape[1], dtype=jnp.int32) * live[:, None]
        d = d._replace(
            counts=d.counts.at[row_ids].add(hit),
            seen=d.seen.at[row_ids].set(d.seen[row_ids] | (hit > 0)),
        )
    return d


def _skip_like(fn: Callable) -> Callable:
    """The `lax.cond` branch that skips `fn`: x passes through, zeros for fn's other outputs."""

    def skip(x):
        _, rest = jax.eval_shape(fn, x)
        return x, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), rest)

    return skip


def _write_if(valid, cache: jax.Array, update: jax.Array, at: tuple) -> jax.Array:
    """dynamic_update_slice of `update` at `at`, or the old contents when not `valid`."""
    old = jax.lax.dynamic_slice(cache, at, update.shape)
    return jax.lax.dynamic_update_slice(cache, jnp.where(valid, update, old), at)


def _write_decode(cache: KVCache, new_kv, valid, m, mb: int, pos) -> KVCache:
    """Store each slot's new key and value (k, v [mb, 1, Hkv, Dh]) of micro-batch m's rows at
    their positions `pos` [mb]: one row is a dynamic_update_slice, several a scatter; both
    update the cache in place. Nothing changes on a skipped tick (`valid` false)."""
    if mb == 1:
        ks = tuple(
            _write_if(valid, c, k.transpose(0, 2, 3, 1), (m, 0, 0, pos[0]))
            for c, (k, _) in zip(cache.k, new_kv, strict=True)
        )
        vs = tuple(
            _write_if(valid, c, v.transpose(0, 2, 1, 3), (m, 0, pos[0], 0))
            for c, (_, v) in zip(cache.v, new_kv, strict=True)
        )
        return KVCache(ks, vs)
    rows = m * mb + jnp.arange(mb)
    ks = tuple(
        c.at[rows, :, :, pos].set(jnp.where(valid, k[:, 0], c[rows, :, :, pos]))
        for c, (k, _) in zip(cache.k, new_kv, strict=True)
    )
    vs = tuple(
        c.at[rows, :, pos, :].set(jnp.where(valid, v[:, 0], c[rows, :, pos, :]))
        for c, (_, v) in zip(cache.v, new_kv, strict=True)
    )
    return KVCache(ks, vs)


def empty_cache(
    mesh: Mesh, stages, slots, sequences, max_len, kv_heads, head_dim, dtype
) -> KVCache:
    """Zeros: one K and one V array per layer slot, each [stages, sequences, kv_heads, ...]."""
    lead = (stages, sequences, kv_heads)
    per_slot = []
    for shape, axes in (
        (lead + (head_dim, max_len), K_CACHE_AXES),
        (lead + (max_len, head_dim), V_CACHE_AXES),
    ):
        sharding = jax.sharding.NamedSharding(mesh, logical_to_spec(axes))
        zeros = _zeros_program(shape, jnp.dtype(dtype), sharding)
        per_slot.append(tuple(zeros() for _ in range(slots)))
    return KVCache(*per_slot)


@functools.lru_cache(maxsize=64)
def _zeros_program(shape, dtype, sharding):
    """One jitted allocator per cache shape: a fresh lambda per call would compile every time
    consecutive waves change cache shape, i.e. a number of compilations growing with waves."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


def host_array(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))
