"""The device program: ONE jitted `jax.shard_map` ring that decodes and prefills at once.

Every device runs the same program; `axis_index("stage")` tells it which stage it is. Layer slot
i of stage s lives at `layers[i][s]` (the partition is the sharding spec); the KV cache has one K
and one V array per slot, `[stages, slots, kv_heads, ...]`, sharded the same way, so a stage only
ever touches its own layers' cache. Activations move s -> s+1 with `ppermute`.

The sequence slots (`LLM(max_num_seqs=...)`) are split into M micro-batches of `mb` rows per
pipeline replica. At tick t stage s serves micro-batch (t - s) mod M: its live rows' decode
tokens PLUS at most one prompt chunk of `C` tokens (of any request being prefilled), in one
batch of w + C token rows, so the weights are read once for both. The chunk rides the ring with
that micro-batch; when a prompt's last chunk leaves the last stage, its first token is sampled
and its slot joins decode at its micro-batch's next turn. S = 3 stages, M = 3, request r
prefilling in chunks r.0, r.1 while m0..m2 decode (' = next token of that micro-batch):

    tick     0       1       2       3        4        5        6
    stage 0  m0+r.0  m1+r.1  m2      m0'      m1'+q.0  m2'      m0"
    stage 1  .       m0+r.0  m1+r.1  m2       m0'      m1'+q.0  m2'
    stage 2  .       .       m0+r.0  m1+r.1   m2       m0'      m1'+q.0
                                     ^ r's first token sampled: r joins its micro-batch's decode

A micro-batch's tokens are sampled when it leaves the last stage (every device samples the same
token from the vocab-parallel head) and its next tokens enter stage 0 at its next turn: with
M >= S that is never before they exist. After the S - 1 fill ticks of a fresh ring no stage
idles while any micro-batch has live rows or a chunk is queued. Stages skip (`lax.switch`) a
tick with nothing to do, and run a decode-only variant when no chunk rides along.

The host (scheduler.py) decides everything ahead of a call: which request occupies which slot
(`SlotControl`, uploaded only when it changes) and which chunk enters stage 0 at each tick of
the call (`ChunkPlan`). The device decides only what it must: a row finishes on a stop token or
its token budget the moment it is sampled, and its slot stays idle until the host refills it.
Each call runs up to K ticks in one `while_loop` (leaving early once nothing is live, queued or
riding) and returns a `StepLog` of every sampled token with its request tag; the ring state
(cache, activations in flight, per-slot positions) is donated from call to call, so the ring
never drains between calls.

What moves with a micro-batch from stage to stage is only its activations (`ppermute`). Who its
rows are (their request tags, latched when it entered stage 0) and which chunk rides with it
is known to every device without a collective: each keeps the last S entries into stage 0,
which it works out from replicated state, so stage s serves what entered s ticks ago and no
stage reads slot state that changed while its micro-batch was in flight.
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
    attend_cache,
    attend_new,
    embed_lookup,
    finish,
    group_queries,
    local_logits,
    merge,
    rope_tables,
    ungroup_queries,
)
from jaxpp.sampling import SamplerRows, sample
from jaxpp.scheduler import StepKind
from jaxpp.sharding import LOGICAL_TO_MESH, logical_to_spec

# K is stored [.., head_dim, seq] and V [.., seq, head_dim]: both decode dots (q.K and p.V) are
# then plain batched matmuls over (sequence, kv head) with no per-tick relayout of the cache
# (measured 2.1x faster decode on CPU than a [.., seq, kv_heads, head_dim] cache). One array per
# layer slot, like the weights: slicing a layer out of a stacked cache would copy it every tick.
K_CACHE_AXES = ("stage", "batch", "kv_heads", "head_dim", "seq")
V_CACHE_AXES = ("stage", "batch", "kv_heads", "seq", "head_dim")
BATCH = LOGICAL_TO_MESH["batch"]
ROW = P(BATCH)  # per-slot arrays: split over pipeline replicas
RIDING = P("stage", BATCH)  # [stages, replicas, ...]: what each stage holds in flight
PER_REPLICA = P(None, BATCH)  # [.., replicas, ...]: the same on every stage of a replica
PER_TICK = P(None, BATCH)  # [ticks, replicas, ...]: the step log
BUSY = P(None, "stage")  # [ticks, stages]: each stage reports its own column
REPLICATED = P()
META = 5  # chunk metadata riding the ring: tag, row, start, length, last
TAG, CHUNK_ROW, START, LENGTH, LAST = range(META)


class KVCache(NamedTuple):
    k: tuple[jax.Array, ...]  # per layer slot: [stages, slots, kv_heads, head_dim, cache_len]
    v: tuple[jax.Array, ...]  # per layer slot: [stages, slots, kv_heads, cache_len, head_dim]


class RingState(NamedTuple):
    """Everything the ring carries from one call to the next (donated each call)."""

    cache: KVCache
    hidden: jax.Array  # [stages, replicas, mb + C, D]: activations each stage received
    entries: jax.Array  # i32 [stages, replicas, mb + META + C]: what entered stage 0 at each of
    # the last S ticks (tick t at t mod S): row tags, chunk meta and chunk tokens
    tick: jax.Array  # i32 scalar: the ring's global tick
    next_token: jax.Array  # i32 [slots]: the token each live slot feeds at its next turn
    position: jax.Array  # i32 [slots]: tokens in the slot's cache (= position of next_token)
    generated: jax.Array  # i32 [slots]: tokens generated so far by the slot's request
    live: jax.Array  # bool [slots]: the slot is decoding
    counts: jax.Array  # i32 [slots, Vpad] output-token counts (penalties), or [slots, 0]
    seen: jax.Array  # bool [slots, Vpad] prompt+output tokens (repetition penalty), or [slots, 0]


class SlotControl(NamedTuple):
    """The host's word on every slot, uploaded when it changes."""

    tag: jax.Array  # i32 [slots]: the request in the slot (its serial number); -1 = stop/none
    sampler: SamplerRows  # [slots] sampling settings of that request


class ChunkPlan(NamedTuple):
    """The prompt chunk entering stage 0 at each tick of a call, per replica."""

    tokens: jax.Array  # i32 [replicas, K, C]
    meta: jax.Array  # i32 [replicas, K, 4]: row, start, length (0 = no chunk), last (0/1)


class StepLog(NamedTuple):
    """What a call did, tick by tick. Column w of the token arrays is the chunk's first token."""

    ticks: jax.Array  # i32 scalar: ticks run
    tags: jax.Array  # i32 [K, replicas, w + 1]: request of each sampled token, -1 = none
    tokens: jax.Array  # i32 [K, replicas, w + 1]
    logprob: jax.Array  # f32 [K, replicas, w + 1]
    top_ids: jax.Array  # i32 [K, replicas, w + 1, N]
    top_logprobs: jax.Array  # f32 [K, replicas, w + 1, N]
    busy: jax.Array  # i32 [K, stages]: replicas in which the stage did work
    chunks: jax.Array  # i32 [K, stages]: replicas in which the stage carried a prompt chunk
    logits: jax.Array  # f32 [K, replicas, C, V] chunk logits (collecting calls), else [K, 1, 0, 0]
    logit_meta: jax.Array  # i32 [K, replicas, META]: the chunk those logits belong to


@dataclasses.dataclass(frozen=True)
class PipelineShape:
    stages: int
    microbatches: int
    rows: int  # slots per micro-batch and replica (mb)
    chunk: int  # prompt tokens per chunk (C)
    cache_len: int  # positions per slot (T): a multiple of KV_BLOCK, >= max_model_len
    ticks: int  # ticks per call at most (K): the size of the step log
    vocab_size: int  # the real vocabulary (padded ids are masked)


class Pipeline:
    """Builds and runs the jitted step program for one model on one mesh."""

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
        self.slots = len(nnx.merge(graphdef, state).layers)
        self.cache_spec = KVCache(
            (logical_to_spec(K_CACHE_AXES),) * self.slots,
            (logical_to_spec(V_CACHE_AXES),) * self.slots,
        )
        self.rows_per_read = rows_per_read(jax.default_backend(), self.shape.rows)
        # Tests set this to NaN: what a stage reads for a dead row, a chunk's padding or an
        # idle tick must never matter.
        self.bubble_fill: float | None = None
        self._compiled: dict[tuple, Callable] = {}

    def step(
        self,
        state,
        ring: RingState,
        control: SlotControl,
        plan: ChunkPlan,
        ticks: jax.Array,
        kind: StepKind,
    ) -> tuple[RingState, StepLog]:
        """Run the ring for up to `ticks` ticks (<= shape.ticks) or until nothing is left."""
        key = (kind, ring.counts.shape, self.bubble_fill, self.rows_per_read)
        if key not in self._compiled:
            self._compiled[key] = self._build(kind, self.bubble_fill, self.rows_per_read)
        return self._compiled[key](state, ring, control, plan, ticks)

    @property
    def compiled_programs(self) -> int:
        return len(self._compiled)

    # --- one stage: its layers, one after another -------------------------------------------

    def _run_stage(self, layers, x, cache: KVCache, attention, cos, sin):
        """Run this device's layer slots, one after another, over x [1, N, D].

        Returns (x, the new keys and values of every slot). The cache is only READ here:
        `attention(slot_cache, q, k, v, window)` attends over the slot's cache as it was plus
        this step's own k, v, and the caller writes the new keys and values after the stage
        ran. Threading the cache through the `lax.cond`s instead makes XLA copy every layer's
        K and V on every tick (measured: copies were a fifth of the batch-1 decode tick).
        The slot loop is unrolled over per-slot weights: a `scan` over a stack would slice each
        layer out of it, i.e. copy its weights, every tick. Empty slots are skipped.
        """
        new_kv = []
        for i, layer in enumerate(layers):
            slot_cache = (cache.k[i], cache.v[i])

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

    # --- the program -------------------------------------------------------------------------

    def _build(self, kind: StepKind, bubble_fill, rows_per_read: int):
        S, M = self.shape.stages, self.shape.microbatches
        mb, C, K = self.shape.rows, self.shape.chunk, self.shape.ticks
        w, mode = kind.width, kind.mode
        # Collecting calls run one round: their log holds every chunk's full logits.
        log_ticks = M if kind.collect else K
        last = S - 1
        # s -> s + 1; stage 0 takes what enters from the host side, never what the last passed.
        shift = [(i, i + 1) for i in range(S - 1)]
        # Rows handed to the head: the w decode rows, then the chunk's rows (all C when
        # collecting logits, else only its last real token, whose logits give the first token).
        head_chunk_rows = C if kind.collect else 1
        replicas = self.mesh.shape[BATCH]

        def over_replicas(collective, x):
            """Combine x over the pipeline replicas; no collective at all with one."""
            return collective(x, BATCH) if replicas > 1 else x

        def program(state, ring: RingState, ctl: SlotControl, plan: ChunkPlan, n_ticks):
            model, layers = self._split(state)
            s = jax.lax.axis_index("stage")
            embed = model.embed[...]
            plan_tokens, plan_meta = plan.tokens[0], plan.meta[0]  # this replica's [K, ...]
            last_planned = jnp.max(jnp.where(plan_meta[:, 2] > 0, jnp.arange(K), -1))
            n_top = mode.logprobs

            def tick(carry):
                ring, log, k = carry
                t = ring.tick
                m = jnp.mod(t - s, M)
                rows = m * mb + jnp.arange(w)
                # What enters stage 0: the live rows of micro-batch t mod M and this tick's
                # planned chunk. Every device works it out (from replicated state) and keeps the
                # last S entries: stage s serves what entered s ticks ago, and the micro-batch
                # leaving the last stage is known everywhere without a collective. Every device
                # also computes the entering embeddings: the vocab-parallel lookup is one.
                entering = jnp.mod(t, M) * mb + jnp.arange(w)
                entering_tags = jnp.where(
                    ring.live[entering] & (ctl.tag[entering] >= 0), ctl.tag[entering], -1
                )
                row, start, length, is_last = (plan_meta[k, i] for i in range(4))
                entering_meta = jnp.stack(
                    [jnp.where(length > 0, ctl.tag[row], -1), row, start, length, is_last]
                )
                entering_tokens = plan_tokens[k]
                entry = jnp.concatenate(
                    [entering_tags, jnp.full((mb - w,), -1, jnp.int32), entering_meta,
                     entering_tokens]
                )  # fmt: skip
                entries = jax.lax.dynamic_update_index_in_dim(
                    ring.entries[:, 0], entry, jnp.mod(t, S), 0
                )
                mine = entries[jnp.mod(t - s, S)]  # what this stage serves
                tags, meta = mine[:w], mine[mb : mb + META]
                first = s == 0
                x_entering = embed_lookup(
                    embed, jnp.concatenate([ring.next_token[entering], entering_tokens])
                )
                hidden = ring.hidden[0, 0]
                x = jnp.where(first, x_entering, jnp.concatenate([hidden[:w], hidden[mb:]], axis=0))
                dec_live = tags >= 0
                has_chunk = meta[LENGTH] > 0
                chunk_row, chunk_start, chunk_len = meta[CHUNK_ROW], meta[START], meta[LENGTH]
                if bubble_fill is not None:
                    real = jnp.concatenate([dec_live, jnp.arange(C) < chunk_len])
                    x = jnp.where(real[:, None], x, bubble_fill)

                q_pos = ring.position[rows]
                chunk_pos = chunk_start + jnp.arange(C)
                cos, sin = rope_tables(
                    jnp.concatenate([q_pos, chunk_pos])[None], self.inv_freq, self.dtype
                )
                cache = jax.tree.map(lambda a: a[0], ring.cache)  # this stage's shard

                def stage(x, with_chunk: bool):
                    n = w + (C if with_chunk else 0)

                    def attention(slot_cache, q, k, v, window):
                        return _attention(
                            slot_cache, q, k, v, window, w, with_chunk, rows_per_read,
                            rows0=m * mb, dec_pos=q_pos, dec_keys=jnp.where(dec_live, q_pos, 0),
                            chunk_row=chunk_row, chunk_pos=chunk_pos, chunk_len=chunk_len,
                        )  # fmt: skip

                    out, kv = self._run_stage(
                        layers, x[None, :n], cache, attention, cos[:, :n], sin[:, :n]
                    )
                    out = out[0]
                    if not with_chunk:  # the same shapes from every branch
                        out = jnp.concatenate([out, jnp.zeros((C, out.shape[-1]), out.dtype)])
                        kv = [
                            tuple(
                                jnp.concatenate([a, jnp.zeros((1, C) + a.shape[2:], a.dtype)], 1)
                                for a in pair
                            )
                            for pair in kv
                        ]
                    return out, kv

                branches = [
                    _skip_like(functools.partial(stage, with_chunk=True)),
                    functools.partial(stage, with_chunk=False),
                    functools.partial(stage, with_chunk=True),
                ]
                work = jnp.where(has_chunk, 2, jnp.where(jnp.any(dec_live), 1, 0))
                if w == 0:  # prompts only: there is no decode-only variant
                    branches[1] = branches[2]
                out, new_kv = jax.lax.switch(work, branches, x)
                cache = _write_kv(
                    cache, new_kv, w, rows, dec_live, q_pos, chunk_row, chunk_start, chunk_len
                )

                # The micro-batch leaving the last stage gets its tokens, on every device.
                m_out = jnp.mod(t - last, M)
                rows_out = m_out * mb + jnp.arange(w)
                chunk_out = jax.lax.dynamic_slice_in_dim(
                    out[w:], jnp.maximum(chunk_len - 1, 0) * (1 - kind.collect), head_chunk_rows
                )
                final = jax.lax.psum(
                    jnp.where(s == last, jnp.concatenate([out[:w], chunk_out]), 0), "stage"
                )
                leaving = entries[jnp.mod(t - last, S)]
                out_tags, out_meta = leaving[:w], leaving[mb : mb + META]
                out_chunk_tokens = leaving[mb + META :]
                logits = local_logits(model, final, self.shape.vocab_size)
                ring, record = _sample_and_record(
                    ring, ctl, logits, out_tags, out_meta, out_chunk_tokens, rows_out, w,
                    kind, self.shape.vocab_size,
                )  # fmt: skip

                busy = over_replicas(jax.lax.psum, (work > 0).astype(jnp.int32))
                carried = over_replicas(jax.lax.psum, has_chunk.astype(jnp.int32))
                log = log._replace(
                    tags=log.tags.at[k, 0].set(record.tags),
                    tokens=log.tokens.at[k, 0].set(record.tokens),
                    logprob=log.logprob.at[k, 0].set(record.logprob),
                    top_ids=log.top_ids.at[k, 0].set(record.top_ids),
                    top_logprobs=log.top_logprobs.at[k, 0].set(record.top_logprobs),
                    busy=log.busy.at[k, 0].set(busy),
                    chunks=log.chunks.at[k, 0].set(carried),
                )
                if kind.collect:
                    log = log._replace(
                        logits=log.logits.at[k, 0].set(logits[w:]),
                        logit_meta=log.logit_meta.at[k, 0].set(out_meta),
                    )
                padded = jnp.concatenate(
                    [out[:w], jnp.zeros((mb - w,) + out.shape[1:], out.dtype), out[w:]]
                )
                ring = ring._replace(
                    cache=jax.tree.map(lambda a: a[None], cache),
                    hidden=jax.lax.ppermute(padded, "stage", shift)[None, None],
                    entries=entries[:, None],
                    tick=t + 1,
                )
                return ring, log, k + 1

            def pending(carry):
                ring, _, k = carry
                # In flight: what entered in the last S - 1 ticks (the tick's own slot in the
                # history is the oldest entry, which has left the last stage).
                recent = jnp.arange(S) != jnp.mod(ring.tick, S)
                entries = ring.entries[:, 0]
                in_flight = jnp.any(
                    recent & (jnp.any(entries[:, :mb] >= 0, axis=1) | (entries[:, mb + LENGTH] > 0))
                )
                live = jnp.any(ring.live & (ctl.tag >= 0))
                work = over_replicas(jax.lax.pmax, (in_flight | live).astype(jnp.int32))
                planned = over_replicas(jax.lax.pmax, last_planned) >= k
                return (k < n_ticks) & (planned | (work > 0))

            log = _empty_log(log_ticks, w, n_top, C, kind, model)
            # Slots the host withdrew stop now: it refills them only after this call is back.
            ring = ring._replace(live=ring.live & (ctl.tag >= 0))
            ring, log, k = jax.lax.while_loop(pending, tick, (ring, log, jnp.int32(0)))
            return ring, log._replace(ticks=k)

        rows_spec = SamplerRows(*([ROW] * len(SamplerRows._fields)))
        ring_spec = RingState(
            cache=self.cache_spec,
            hidden=RIDING,
            entries=PER_REPLICA,
            tick=REPLICATED,
            next_token=ROW,
            position=ROW,
            generated=ROW,
            live=ROW,
            counts=ROW,
            seen=ROW,
        )
        log_spec = StepLog(
            ticks=REPLICATED,
            tags=PER_TICK,
            tokens=PER_TICK,
            logprob=PER_TICK,
            top_ids=PER_TICK,
            top_logprobs=PER_TICK,
            busy=BUSY,
            chunks=BUSY,
            logits=P(None, BATCH, None, VOCAB_AXES) if kind.collect else PER_TICK,
            logit_meta=PER_TICK,
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
                SlotControl(ROW, rows_spec),
                ChunkPlan(ROW, ROW),
                REPLICATED,
            ),
            out_specs=(ring_spec, log_spec),
            check_vma=False,
        )
        return jax.jit(fn, donate_argnums=(1,))


def _attention(
    slot_cache, q, k, v, window, w, with_chunk, rows_per_read, *, rows0, dec_pos, dec_keys,
    chunk_row, chunk_pos, chunk_len,
):  # fmt: skip
    """Attention of one step's w decode rows and (with_chunk) C chunk rows.

    q [1, w + C, Hq, Dh], k and v [1, w + C, Hkv, Dh]. A decode row attends to its cached keys
    (positions < its own) and its own key; the chunk attends to its row's cached prefix
    (positions < its start) and causally to itself.
    """
    keys, values = slot_cache
    hkv = k.shape[2]
    group = q.shape[2] // hkv
    outs = []
    if w:
        q_dec = group_queries(q[0, :w, None], hkv)  # [w, Hkv, G, Dh]
        pos = jnp.repeat(dec_pos[:, None], group, axis=1)
        part = merge(
            attend_cache(
                q_dec, pos, keys, values, rows0, dec_keys, window, rows_per_read=rows_per_read
            ),
            attend_new(q_dec, pos, k[0, :w, None], v[0, :w, None], dec_pos[:, None], window),
        )
        outs.append(ungroup_queries(finish(part, q.dtype), 1)[:, 0])
    if with_chunk:
        q_chunk = group_queries(q[:, w:], hkv)  # [1, Hkv, C*G, Dh]
        pos = jnp.repeat(chunk_pos, group)[None]
        # The padding after the prompt's last token is causally invisible to every real
        # token, but 0 * its value is only 0 if the value is finite: zero it.
        real = (jnp.arange(chunk_pos.shape[0]) < chunk_len)[None, :, None, None]
        part = merge(
            attend_cache(
                q_chunk,
                pos,
                keys,
                values,
                chunk_row,
                chunk_pos[:1],
                window,
                rows_per_read=rows_per_read,
            ),
            attend_new(
                q_chunk, pos, k[:, w:], jnp.where(real, v[:, w:], 0), chunk_pos[None], window
            ),
        )
        outs.append(ungroup_queries(finish(part, q.dtype), chunk_pos.shape[0])[0])
    return jnp.concatenate(outs)[None]


def _write_kv(
    cache: KVCache, new_kv, w, rows, dec_live, dec_pos, chunk_row, start, length
) -> KVCache:
    """Store the step's keys and values (k, v [1, w + C, Hkv, Dh] per slot) in the cache, in
    place, with ONE scatter per array: each live decode row's at its position and the chunk's
    real tokens at start .. start + length of its row. Dead rows and the chunk's padding point
    past the end of the cache, and a scatter skips what falls outside. (Two writes per array, or
    a `cond` around the chunk's, made XLA copy every layer's whole cache each tick: 128 copies,
    16 ms of a 38 ms decode tick on an H200.)"""
    T = cache.k[0].shape[-1]
    C = new_kv[0][0].shape[1] - w
    chunk = jnp.arange(C)
    at_rows = jnp.concatenate([rows, jnp.full((C,), chunk_row)])
    at_pos = jnp.concatenate(
        [jnp.where(dec_live, dec_pos, T), jnp.where(chunk < length, start + chunk, T)]
    )
    ks, vs = [], []
    for kc, vc, (k, v) in zip(cache.k, cache.v, new_kv, strict=True):
        ks.append(kc.at[at_rows, :, :, at_pos].set(k[0], mode="drop"))
        vs.append(vc.at[at_rows, :, at_pos, :].set(v[0], mode="drop"))
    return KVCache(tuple(ks), tuple(vs))


class _Record(NamedTuple):
    tags: jax.Array
    tokens: jax.Array
    logprob: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


def _sample_and_record(
    ring: RingState, ctl: SlotControl, logits, tags, meta, chunk_tokens, rows, w, kind, vocab
) -> tuple[RingState, _Record]:
    """Sample the tokens of the w decode rows leaving the last stage and, when a prompt's last
    chunk left with them, its first token; update the slots' state (a slot stops the moment
    its stop token or token budget is reached) and return the log entries."""
    mode = kind.mode
    chunk_row, chunk_start, chunk_len = meta[CHUNK_ROW], meta[START], meta[LENGTH]
    first_token = (chunk_len > 0) & (meta[LAST] > 0)
    all_rows = jnp.concatenate([rows, chunk_row[None]])
    sampler = SamplerRows(*(a[all_rows] for a in ctl.sampler))
    head = jnp.concatenate([logits[:w], logits[w:][chunk_len - 1 if kind.collect else 0][None]])
    generated = jnp.concatenate([ring.generated[rows], jnp.zeros((1,), jnp.int32)])
    counts = seen = None
    if mode.penalties:
        # The chunk's prompt tokens are marked seen as its chunks leave (the first one clears
        # whatever the slot's previous request left there).
        fresh = jnp.where(chunk_start == 0, False, ring.seen[chunk_row])
        prompt = jnp.arange(chunk_tokens.shape[0]) < chunk_len
        chunk_seen = fresh.at[jnp.where(prompt, chunk_tokens, fresh.shape[0])].set(
            True, mode="drop"
        )
        seen_rows = jnp.concatenate([ring.seen[rows], chunk_seen[None]])
        counts = jnp.concatenate(
            [ring.counts[rows], jnp.zeros((1, ring.counts.shape[1]), jnp.int32)]
        )
        seen = seen_rows
    got = sample(head, sampler, generated, counts, seen, vocab, mode)

    live = jnp.concatenate([tags >= 0, first_token[None]])
    hit_stop = (got.tokens[:, None] == sampler.stop_ids).any(-1) & (
        generated + 1 > sampler.min_tokens
    )
    finished = hit_stop | (generated + 1 >= sampler.max_tokens)
    # A slot the host has withdrawn (tag -1) stops, even for a pass that entered before.
    cont = live & ~finished & (ctl.tag[all_rows] >= 0)
    dec = slice(0, w)

    def put(array, index, value, where):
        return array.at[index].set(jnp.where(where, value, array[index]))

    next_token = put(ring.next_token, rows, got.tokens[dec], live[dec])
    position = ring.position.at[rows].add(live[dec].astype(jnp.int32))
    generated_new = ring.generated.at[rows].add(live[dec].astype(jnp.int32))
    live_new = put(ring.live, rows, cont[dec], live[dec])
    # The prefilled slot starts decoding (unless its first token already ended it, or the host
    # withdrew the request meanwhile).
    next_token = put(next_token, chunk_row, got.tokens[w], first_token)
    position = put(position, chunk_row, chunk_start + chunk_len, first_token)
    generated_new = put(generated_new, chunk_row, 1, first_token)
    live_new = put(live_new, chunk_row, cont[w], first_token)
    ring = ring._replace(
        next_token=next_token, position=position, generated=generated_new, live=live_new
    )
    if mode.penalties:
        hit = jax.nn.one_hot(got.tokens, ring.counts.shape[1], dtype=jnp.int32) * live[:, None]
        seen_new = ring.seen.at[rows].set(seen[:w] | (hit[:w] > 0))
        seen_new = put(seen_new, chunk_row, seen[w] | (hit[w] > 0), chunk_len > 0)
        counts_new = ring.counts.at[rows].add(hit[:w])
        counts_new = put(counts_new, chunk_row, hit[w], first_token)
        ring = ring._replace(counts=counts_new, seen=seen_new)
    log_tags = jnp.where(live, jnp.concatenate([tags, meta[TAG][None]]), -1)
    return ring, _Record(log_tags, got.tokens, got.logprob, got.top_ids, got.top_logprobs)


def _empty_log(K, w, n_top, C, kind: StepKind, model) -> StepLog:
    n = w + 1
    if kind.collect:
        vocab_local = model.embed.shape[0]
        logits = jnp.zeros((K, 1, C, vocab_local), jnp.float32)
    else:
        logits = jnp.zeros((K, 1, 0, 0), jnp.float32)
    return StepLog(
        ticks=jnp.int32(0),
        tags=jnp.full((K, 1, n), -1, jnp.int32),
        tokens=jnp.zeros((K, 1, n), jnp.int32),
        logprob=jnp.zeros((K, 1, n), jnp.float32),
        top_ids=jnp.zeros((K, 1, n, n_top), jnp.int32),
        top_logprobs=jnp.zeros((K, 1, n, n_top), jnp.float32),
        busy=jnp.zeros((K, 1), jnp.int32),
        chunks=jnp.zeros((K, 1), jnp.int32),
        logits=logits,
        logit_meta=jnp.full((K, 1, META), -1, jnp.int32),
    )


def _skip_like(fn: Callable) -> Callable:
    """The `lax.cond` branch that skips `fn`: x passes through, zeros for fn's other outputs."""

    def skip(x):
        _, rest = jax.eval_shape(fn, x)
        return x, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), rest)

    return skip


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
    """A fresh ring: zero cache, nothing in flight, no slot live."""
    S, mb, C = shape.stages, shape.rows, shape.chunk
    rows = replicas * shape.microbatches * mb

    def zeros(global_shape, axes):
        sharding = jax.sharding.NamedSharding(mesh, logical_to_spec(axes))
        return _zeros_program(global_shape, jnp.dtype(dtype), sharding)()

    shapes = cache_shapes(shape, slots, replicas, kv_heads, head_dim)
    cache = KVCache(*(tuple(zeros(*leaf) for leaf in arrays) for arrays in shapes))

    def put(a, spec):
        return jax.device_put(a, jax.sharding.NamedSharding(mesh, spec))

    entries = np.full((S, replicas, mb + META + C), -1, np.int32)
    entries[:, :, mb + LENGTH] = 0
    width = vocab_padded if penalties else 0
    return RingState(
        cache=cache,
        hidden=put(np.zeros((S, replicas, mb + C, hidden), dtype), RIDING),
        entries=put(entries, PER_REPLICA),
        tick=put(np.int32(0), REPLICATED),
        next_token=put(np.zeros(rows, np.int32), ROW),
        position=put(np.zeros(rows, np.int32), ROW),
        generated=put(np.zeros(rows, np.int32), ROW),
        live=put(np.zeros(rows, bool), ROW),
        counts=put(np.zeros((rows, width), np.int32), ROW),
        seen=put(np.zeros((rows, width), bool), ROW),
    )


def cache_shapes(
    shape: PipelineShape, slots: int, replicas: int, kv_heads: int, head_dim: int
) -> KVCache:
    """(global shape, logical axes) of each K and V array of the ring's cache, one per layer
    slot: what `empty_ring` allocates and what `jaxpp plan` sizes."""
    rows = replicas * shape.microbatches * shape.rows
    lead = (shape.stages, rows, kv_heads)
    k = (lead + (head_dim, shape.cache_len), K_CACHE_AXES)
    v = (lead + (shape.cache_len, head_dim), V_CACHE_AXES)
    return KVCache((k,) * slots, (v,) * slots)


def rows_per_read(platform: str, rows: int) -> int:
    """Decode rows attention reads the cache for at a time (model.attend_cache). On the CPU a
    loop step costs more than reading a few keys a row does not need: 2 rows per step measured
    63-74 ms per W decode tick (32 rows of 16-600 positions), 1 row 83-91 ms, 8 rows 82-93 ms.
    Accelerators read all of a micro-batch's rows at once."""
    return 2 if platform == "cpu" else rows


@functools.lru_cache(maxsize=64)
def _zeros_program(shape, dtype, sharding):
    """One jitted allocator per cache shape (a fresh lambda per call would compile each time)."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
