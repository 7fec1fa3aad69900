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
ITEMS of whole pages (`ITEM_POSITIONS[kind]` positions: fewer for decode groups than for
prompt groups). The items of all groups are laid end to end and read `ITEMS_PER_STEP[kind]` at
a time (one gather, two batched dots); each item folds into an online-softmax partial, and the
partials of a group merge exactly (segment max, then rescaled segment sums). So the work is
the live length of each sequence, never the longest in the tick nor `max_model_len`.

    groups   g0 (decode, 300 keys)   g1 (decode, 40 keys)   g2 (prompt block, 200 keys)
    items    [g0:0-127][g0:128-255][g0:256-383][g1:0-127][g2:0-127][g2:128-255]
    steps    |---- step 0 ----|---- step 1 ----|---- step 2 (part empty) ----|
             (items of 128 positions drawn; decode groups read items of 32)

The loop's trip count: on a CPU the steps the tick's items need, read from the data (XLA:CPU
evaluates a loop's condition on the host anyway); on an accelerator a bound known when
compiling (every group reading a `max_model_len` sequence), since there a loop whose trip count
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
# Positions per item (rounded to whole pages), per kind of query group. A group reads half an
# item past its last key on average: a decode group (one query per key) wastes less with small
# items, a prompt group (16 queries per key) merges fewer partials with large ones. Measured on
# the CPU, llama-32m f32: batch 32 decode at 64-192 positions, decode items of 32 1.23-1.26x
# transformers, of 128 1.03-1.10x; 32 rows of W's lengths (16-768 positions), one layer: items
# of 32 4.4 ms, of 64 4.8, of 16 6.2; reading 128 positions of every row in lock step instead
# (no item list, no merge, but every row padded to the longest) 7.5-8.8 ms.
ITEM_POSITIONS = {"decode": 32, "prompt": 128}
# Items one step of the loop reads (gathers and dots at once), per kind.
ITEMS_PER_STEP = {"decode": 128, "prompt": 32}
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
    """Whether the item loop runs as many steps as the data needs (XLA:CPU, where the
    loop's condition is evaluated on the host anyway) or a bound known when compiling (an
    accelerator, where a data-dependent condition is a device-to-host copy per iteration)."""
    return jax.default_backend() == "cpu"


def item_pages(block: int, kind: str) -> int:
    """Pages per item of a `kind` ("decode" or "prompt") group: ITEM_POSITIONS[kind]
    positions, at least one page."""
    return max(1, ITEM_POSITIONS[kind] // block)


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


class Partial(NamedTuple):
    """Online-softmax state over SOME keys, per query: the running max of the scores, the sum
    of exp(score - max) and the exp-weighted sum of the values. Partials over disjoint keys
    merge exactly; the division comes once at the end. top, total [G, Hkv, Q*Gq];
    acc [G, Hkv, Q*Gq, Dh]."""

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
    kind (static): "decode" or "prompt": the item size (ITEM_POSITIONS) and step.
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
    per_item = item_pages(block, kind)
    span = per_item * block
    first_item = first // span
    count = jnp.where(last >= 0, last // span - first_item + 1, 0)
    ends = jnp.cumsum(count)
    step = ITEMS_PER_STEP[kind]
    if trips_from_data():
        trips = -(-ends[-1] // step)  # a loop on the host: its trip count costs nothing
    else:
        trips = -(-grouped.shape[0] * -(-tables.shape[1] // per_item) // step)
    read = _item_reader(grouped, qpos, seq, k_pool, v_pool, tables, window, per_item, step,
                        first_item, ends - count, ends, last)  # fmt: skip
    part = Partial(
        jnp.full(grouped.shape[:3], MASKED, jnp.float32),
        jnp.zeros(grouped.shape[:3], jnp.float32),
        jnp.zeros(grouped.shape, jnp.float32),
    )
    part = jax.lax.fori_loop(0, trips, read, part)
    # A padding query saw no key: its partials hold a uniform mix of whatever it read.
    seen = (qpos >= 0)[:, None, :, None] & (part.total[..., None] > 0)
    out = jnp.where(seen, part.acc / jnp.where(seen, part.total[..., None], 1.0), 0)
    return _ungroup_queries(out.astype(q.dtype), queries)


def _item_reader(grouped, qpos, seq, k_pool, v_pool, tables, window, per_item, step,
                 first_item, starts, ends, last):  # fmt: skip
    """The loop body: read items i * step .. (i + 1) * step - 1 of the tick (each one span of
    one group's pages) and fold their partials into their groups'."""
    groups, kv_heads, _, head_dim = grouped.shape
    span = per_item * k_pool.shape[3]
    scale = head_dim**-0.5

    def read(i, part: Partial) -> Partial:
        j = i * step + jnp.arange(step)  # item ids of this step
        group = jnp.sum(ends[None, :] <= j[:, None], axis=1)  # the group item j belongs to
        valid = j < ends[-1]
        g = jnp.minimum(group, groups - 1)
        index = first_item[g] + j - starts[g]  # which item of its sequence
        cols = jnp.clip(index[:, None] * per_item + jnp.arange(per_item), 0, tables.shape[1] - 1)
        pages = tables[seq[g][:, None], cols]  # [step, per_item]
        keys = k_pool[pages].transpose(0, 2, 3, 1, 4).reshape(step, kv_heads, head_dim, span)
        values = v_pool[pages].transpose(0, 2, 1, 3, 4).reshape(step, kv_heads, span, head_dim)
        k_pos = index[:, None] * span + jnp.arange(span)  # [step, span]
        # Keys past the group's last query were never written for this sequence (or belong to
        # another one): 0 * their value must not meet a NaN there.
        written = valid[:, None] & (k_pos <= last[g][:, None])
        values = jnp.where(written[:, None, :, None], values, 0)
        qp, kp = qpos[g][:, :, None], k_pos[:, None, :]  # [step, QG, 1], [step, 1, span]
        visible = written[:, None, :] & (kp <= qp) & ((window == 0) | (kp > qp - window))
        scores = jnp.einsum("ihqd,ihds->ihqs", grouped[g], keys).astype(jnp.float32) * scale
        scores = jnp.where(visible[:, None], scores, MASKED)
        top = jnp.max(scores, axis=-1)
        probs = jnp.exp(scores - top[..., None])
        acc = jnp.einsum("ihqs,ihsd->ihqd", probs.astype(values.dtype), values)
        owner = jnp.where(valid, group, groups)  # items past the last fall outside: dropped
        return _merge_items(part, top, jnp.sum(probs, axis=-1), acc.astype(jnp.float32), owner)

    return read


def _merge_items(part: Partial, top, total, acc, owner) -> Partial:
    """Fold the partials of some items (top, total [I, H, Q], acc [I, H, Q, Dh]) into the
    partials of the groups that own them (owner [I]; == groups: dropped)."""
    groups = part.top.shape[0]
    new_top = jnp.maximum(
        part.top, jax.ops.segment_max(top, owner, groups, indices_are_sorted=True)
    )
    rescale = jnp.exp(part.top - new_top)
    weight = jnp.exp(top - new_top[jnp.minimum(owner, groups - 1)])
    return Partial(
        new_top,
        part.total * rescale
        + jax.ops.segment_sum(total * weight, owner, groups, indices_are_sorted=True),
        part.acc * rescale[..., None]
        + jax.ops.segment_sum(acc * weight[..., None], owner, groups, indices_are_sorted=True),
    )


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
