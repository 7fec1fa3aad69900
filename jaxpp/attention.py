"""Attention over a paged KV cache: the XLA path, and the switch to the GPU kernel
(paged_kernel.py) that this path is the reference for.

Every token of a tick attends to its own sequence's keys up to its own position (and inside its
layer's sliding window): a decode token, a prompt chunk over a cached prefix and a fresh prompt
are one case. The tick's own keys and values are written into their pages FIRST (`write_kv`),
so a prompt chunk sees itself causally through the same reads as its prefix.

The KV pool of one layer slot on one device holds `pages` pages of `block` positions:

    K [pages, kv_heads, head_dim, block]     V [pages, kv_heads, block, head_dim]

(K with positions last and V with head_dim last make both dots plain batched matmuls; a page
is one contiguous run of memory, so gathering pages reads whole cache lines). A sequence's
block table row lists its pages in position order: position p lives at page
`table[p // block]`, offset `p % block`.

Queries come in GROUPS, each from ONE sequence: a decode token is a group of one query, a
prompt chunk is cut into groups of up to `QUERY_BLOCK` queries. Group g reads the keys at
positions [first_g, last_g] (from 0, or from the start of its window, to its last query) in
CHUNKS of `CHUNK_POSITIONS[kind]` positions (whole pages): iteration i reads the i-th chunk of
every group at once, one gather and two batched dots, and folds it into the group's
online-softmax state (running max, sum, weighted values). A group with fewer chunks re-reads
its own last chunk, masked, for the iterations it has none: the work follows the longest group
of the tick, never `max_model_len`, and the re-read pages are in cache.

    iteration   0           1           2
    g0 (decode, 300 keys)   [0-127]     [128-255]   [256-383]
    g1 (decode, 40 keys)    [0-127]     (masked)    (masked)
    g2 (prompt block, 200)  [0-127]     [128-255]   (masked)

The trip count: on a CPU the most chunks any group needs, read from the data (XLA:CPU runs the
loop on the host, so a data-dependent trip count costs nothing); on an accelerator a bound known
when compiling (the chunks of a `max_model_len` sequence), since there a loop whose trip count
is data copies a predicate to the host every iteration. (On GPUs the kernel runs instead.)

On a GPU the same call runs paged_kernel.py (a Pallas kernel walking each group's pages itself,
bounds read on the device); JAXPP_ATTENTION chooses: "auto" (the kernel on GPUs where its tiles
fit, this path elsewhere), "xla" (this path everywhere) or "pallas" (the kernel everywhere: in
Pallas' interpreter off a GPU, which is how the CPU tests run the engine through it).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxpp import paged_kernel

QUERY_BLOCK = 16  # prompt tokens per query group at most
# Key positions one loop iteration reads per group, per kind of group (rounded to whole pages).
CHUNK_POSITIONS = {"decode": 128, "prompt": 128}
MASKED = float(np.finfo(np.float32).min)  # score of an invisible key: exp() of it is exactly 0
ATTENTION_CHOICES = ("auto", "xla", "pallas")


def attention_backend(head_dim: int, block: int) -> str:
    """ "xla", "pallas" (the kernel on a GPU) or "pallas-interpret", from JAXPP_ATTENTION and the
    platform; read when a step program is traced."""
    choice = os.environ.get("JAXPP_ATTENTION", "auto")
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"JAXPP_ATTENTION={choice!r}: expected one of {ATTENTION_CHOICES}")
    on_gpu = jax.default_backend() == "gpu"
    if choice == "pallas":
        if paged_kernel.plgpu is None:
            raise ValueError(f"JAXPP_ATTENTION=pallas: JAX {jax.__version__} has no Pallas Triton")
        return "pallas" if on_gpu else "pallas-interpret"
    if choice == "auto" and on_gpu and paged_kernel.supported(head_dim, block):
        return "pallas"
    return "xla"


def trips_from_data() -> bool:
    """Whether the chunk loop runs as many iterations as the data needs (XLA:CPU, where the
    loop's condition is evaluated on the host anyway) or a bound known when compiling (an
    accelerator, where a data-dependent condition is a device-to-host copy per iteration)."""
    return jax.default_backend() == "cpu"


def chunk_pages(block: int, kind: str) -> int:
    """Pages per chunk of a `kind` ("decode" or "prompt") group: CHUNK_POSITIONS[kind]
    positions, at least one page."""
    return max(1, CHUNK_POSITIONS[kind] // block)


def write_kv(k_pool, v_pool, k, v, page, offset):
    """Store new keys and values k, v [N, kv_heads, head_dim] at (page[i], offset[i]), in
    place, one scatter per pool; a token whose page is past the pool (dead, padding) is
    dropped. Returns the new (k_pool, v_pool)."""
    if k.shape[0] == 1:
        # XLA turns a one-index scatter into a dynamic-update-slice whose "drop" is a select
        # over the whole pool, and inside the ring's loop copies the pool around it (measured:
        # 4 whole-pool copies per layer per tick at batch 1). A second, dropped, index keeps it
        # a scatter, in place.
        k, v = (jnp.concatenate([a, a]) for a in (k, v))
        page = jnp.concatenate([page, jnp.full_like(page, k_pool.shape[0])])
        offset = jnp.concatenate([offset, offset])
    return (
        k_pool.at[page, :, :, offset].set(k, mode="drop"),
        v_pool.at[page, :, offset, :].set(v, mode="drop"),
    )


class Softmax(NamedTuple):
    """Online-softmax state over the keys read so far, per query: the running max of the
    scores, the sum of exp(score - max) and the exp-weighted sum of the values.
    top, total [G, Hkv, Q*Gq]; acc [G, Hkv, Q*Gq, Dh]."""

    top: jax.Array
    total: jax.Array
    acc: jax.Array


def paged_attention(
    q: jax.Array,
    q_pos: jax.Array,
    seq: jax.Array,
    k_pool: jax.Array,
    v_pool: jax.Array,
    tables: jax.Array,
    window: jax.Array,
    *,
    kind: str,
) -> jax.Array:
    """Attention of G query groups over their sequences' pages.

    q [G, Q, Hq, Dh]: group g holds Q queries of sequence `seq[g]` (a row of `tables`
    [rows, pages_per_seq]) at positions q_pos [G, Q], -1 for padding (its output is 0).
    window: 0 for full attention, else a query at p sees keys in (p - window, p].
    kind (static): "decode" or "prompt", the chunk size (CHUNK_POSITIONS).
    Returns [G, Q, Hq, Dh] in q's dtype.
    """
    queries, head_dim = q.shape[1], q.shape[3]
    kv_heads, block = k_pool.shape[1], k_pool.shape[3]
    grouped = _group_queries(q, kv_heads)  # [G, Hkv, Q*Gq, Dh]
    qpos = jnp.repeat(q_pos, grouped.shape[2] // queries, axis=1)  # [G, Q*Gq]
    real = q_pos >= 0
    last = jnp.max(jnp.where(real, q_pos, -1), axis=1)
    lowest = jnp.min(jnp.where(real, q_pos, jnp.iinfo(jnp.int32).max), axis=1)
    first = jnp.where(window > 0, jnp.maximum(lowest - window + 1, 0), 0)
    backend = attention_backend(head_dim, block)
    if backend != "xla":
        out = paged_kernel.paged_attention_kernel(
            grouped, qpos, first, last, seq, k_pool, v_pool, tables, window,
            interpret=backend == "pallas-interpret",
        )  # fmt: skip
        return _ungroup_queries(out, queries)
    per_chunk = chunk_pages(block, kind)
    span = per_chunk * block
    first_chunk = first // span
    chunks = jnp.where(last >= 0, last // span - first_chunk + 1, 0)
    if trips_from_data():
        trips = jnp.max(chunks)  # a loop on the host: its trip count costs nothing
    else:
        trips = -(-tables.shape[1] * block // span)  # known when compiling
    read = _chunk_reader(grouped, qpos, seq, k_pool, v_pool, tables, window, per_chunk,
                         first_chunk, chunks, last)  # fmt: skip
    state = Softmax(
        jnp.full(grouped.shape[:3], MASKED, jnp.float32),
        jnp.zeros(grouped.shape[:3], jnp.float32),
        jnp.zeros(grouped.shape, jnp.float32),
    )
    state = jax.lax.fori_loop(0, trips, read, state)
    # A padding query saw no key: its sums hold a uniform mix of whatever it read.
    seen = (qpos >= 0)[:, None, :, None] & (state.total[..., None] > 0)
    out = jnp.where(seen, state.acc / jnp.where(seen, state.total[..., None], 1.0), 0)
    return _ungroup_queries(out.astype(q.dtype), queries)


def _chunk_reader(grouped, qpos, seq, k_pool, v_pool, tables, window, per_chunk, first_chunk,
                  chunks, last):  # fmt: skip
    """The loop body: fold the i-th chunk of keys of every group into its softmax state. A
    group past its own chunks re-reads its last one (in cache), masked."""
    groups, kv_heads, _, head_dim = grouped.shape
    block = k_pool.shape[3]
    span = per_chunk * block
    last_col = jnp.maximum(last, 0) // block
    scale = head_dim**-0.5

    def read(i, state: Softmax) -> Softmax:
        active = i < chunks  # [G]
        chunk = first_chunk + jnp.minimum(i, jnp.maximum(chunks - 1, 0))
        cols = jnp.minimum(chunk[:, None] * per_chunk + jnp.arange(per_chunk), last_col[:, None])
        pages = tables[seq[:, None], cols]  # [G, per_chunk]
        keys = k_pool[pages].transpose(0, 2, 3, 1, 4).reshape(groups, kv_heads, head_dim, span)
        values = v_pool[pages].transpose(0, 2, 1, 3, 4).reshape(groups, kv_heads, span, head_dim)
        k_pos = chunk[:, None] * span + jnp.arange(span)  # [G, span]
        # Keys past the group's last query were never written for this sequence (or belong to
        # another one): 0 * their value must not meet a NaN there.
        written = active[:, None] & (k_pos <= last[:, None])
        values = jnp.where(written[:, None, :, None], values, 0)
        qp, kp = qpos[:, :, None], k_pos[:, None, :]  # [G, QG, 1], [G, 1, span]
        visible = written[:, None, :] & (kp <= qp) & ((window == 0) | (kp > qp - window))
        scores = jnp.einsum("ghqd,ghds->ghqs", grouped, keys).astype(jnp.float32) * scale
        scores = jnp.where(visible[:, None], scores, MASKED)
        top = jnp.maximum(state.top, jnp.max(scores, axis=-1))
        rescale = jnp.exp(state.top - top)
        probs = jnp.exp(scores - top[..., None])
        weighted = jnp.einsum("ghqs,ghsd->ghqd", probs.astype(values.dtype), values)
        return Softmax(
            top,
            state.total * rescale + jnp.sum(probs, axis=-1),
            state.acc * rescale[..., None] + weighted.astype(jnp.float32),
        )

    return read


def _group_queries(q: jax.Array, kv_heads: int) -> jax.Array:
    """q [R, T, Hq, Dh] -> [R, Hkv, T*G, Dh]: the G query heads sharing a KV head (GQA: head j
    reads KV head j // G) side by side, query t*G + g."""
    r, t, hq, hd = q.shape
    g = hq // kv_heads
    return q.reshape(r, t, kv_heads, g, hd).transpose(0, 2, 1, 3, 4).reshape(r, kv_heads, t * g, hd)


def _ungroup_queries(out: jax.Array, tokens: int) -> jax.Array:
    """The inverse of _group_queries: [R, Hkv, T*G, Dh] -> [R, T, Hq, Dh]."""
    r, hkv, tg, hd = out.shape
    g = tg // tokens
    return out.reshape(r, hkv, tokens, g, hd).transpose(0, 2, 1, 3, 4).reshape(r, tokens, -1, hd)
