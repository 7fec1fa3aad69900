"""The GPU kernel of `attention.paged_attention`: one Pallas (Triton) program per query group
and KV head walks that group's own pages, so the work is each sequence's live length with no
bucket of items, no gather of pages into a staging array and no merge of partials.

    grid (group r, kv head h):      program (r, h)
      q      [QG, Dh]  the group's Q queries x G heads sharing KV head h (padded to >= 16)
      pages  table row of seq[r]: for page p in [first_page, end_page)   <- a loop on the GPU,
        K[page, h] [Dh, block], V[page, h] [block, Dh]                      its bounds read
        scores = q @ K, masked (causal, window, never-written keys)        from memory, not
        online softmax: top, total, acc [QG, Dh]                            from the host
      out    acc / total (0 for a padding query)

The bounds (first page, end page, last position, window) are computed per group in XLA (from
attention.paged_attention's key ranges) and
read by the kernel: a loop whose trip count is data never waits for the host, because the
kernel runs it. The masks are the XLA path's (attention.py), in the same order of operations up
to the order the positions of one sequence are summed in: both paths agree to float32 rounding,
and the tests hold them to 2e-6 of the output scale on random ragged batches.

Triton's dot needs every dimension >= 16 and power-of-two tiles: `supported` says when the
kernel applies (head_dim and block powers of two, >= 16); elsewhere the XLA path runs. Triton,
not Mosaic GPU: it runs on Ampere and later and on JAX 0.10 and 0.11 alike (Mosaic GPU wants
Hopper); with no GPU lent to this project yet, the simpler backend came first. On the
CPU the kernel runs in Pallas' interpreter (`interpret=True`), which is how CI tests it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

try:  # Pallas' Triton backend: deprecated from JAX 0.11 on, to be removed in a later release
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # then the XLA path runs everywhere
    plgpu = None

MASKED = float(np.finfo(np.float32).min)  # the XLA path's score of an invisible key
MIN_TILE = 16  # Triton's dot: every dimension at least this
# Launch parameters of every program: a walk over pages is one load-dot-dot chain, so few warps
# and two stages (the next page's load while this page's dots run) are the natural start.
NUM_WARPS = 4
NUM_STAGES = 2


def _pow2(n: int) -> bool:
    return n >= MIN_TILE and n & (n - 1) == 0


def supported(head_dim: int, block: int) -> bool:
    """Whether the kernel compiles for this shape on a GPU (Triton tiles, and a JAX that has
    Pallas' Triton backend)."""
    return plgpu is not None and _pow2(head_dim) and _pow2(block)


def _kernel(q_ref, qpos_ref, bounds_ref, row_ref, k_ref, v_ref, o_ref, *, block: int):
    q = q_ref[...]  # [QG, Dh]
    qpos = qpos_ref[...]  # [QG]
    first_page, end_page, last, window = (bounds_ref[i] for i in range(4))
    scale = q.shape[-1] ** -0.5

    def page_step(p, carry):
        top, total, acc = carry
        page = row_ref[p]
        keys = k_ref[page]  # [Dh, block]
        values = v_ref[page]  # [block, Dh]
        k_pos = p * block + jnp.arange(block)
        # Keys past the group's last query were never written for this sequence: 0 * their
        # value must not meet a NaN there.
        written = k_pos <= last
        values = jnp.where(written[:, None], values, jnp.zeros_like(values))
        kp, qp = k_pos[None, :], qpos[:, None]
        visible = written[None, :] & (kp <= qp) & ((window == 0) | (kp > qp - window))
        scores = plgpu.dot(q, keys, precision=jax.lax.Precision.HIGHEST).astype(jnp.float32)
        scores = jnp.where(visible, scores * scale, MASKED)
        new_top = jnp.maximum(top, jnp.max(scores, axis=1))
        rescale = jnp.exp(top - new_top)
        probs = jnp.exp(scores - new_top[:, None])
        weighted = plgpu.dot(
            probs.astype(values.dtype), values, precision=jax.lax.Precision.HIGHEST
        ).astype(jnp.float32)
        return new_top, total * rescale + jnp.sum(probs, axis=1), acc * rescale[:, None] + weighted

    rows = q.shape[0]
    top = jnp.full((rows,), MASKED, jnp.float32)
    total = jnp.zeros((rows,), jnp.float32)
    acc = jnp.zeros(q.shape, jnp.float32)
    top, total, acc = jax.lax.fori_loop(first_page, end_page, page_step, (top, total, acc))
    # A padding query saw no key: its sums hold a uniform mix of whatever it read.
    seen = (qpos >= 0) & (total > 0)
    out = jnp.where(seen[:, None], acc / jnp.where(seen, total, 1.0)[:, None], 0.0)
    o_ref[...] = out.astype(o_ref.dtype)


def paged_attention_kernel(
    grouped: jax.Array,
    qpos: jax.Array,
    first: jax.Array,
    last: jax.Array,
    seq: jax.Array,
    k_pool: jax.Array,
    v_pool: jax.Array,
    tables: jax.Array,
    window: jax.Array,
    *,
    interpret: bool = False,
) -> jax.Array:
    """Attention of grouped queries [R, Hkv, QG, Dh] at positions qpos [R, QG] (-1: padding)
    over the pages of their sequences `seq` [R] (rows of `tables`), group r reading keys at
    positions [first[r], last[r]] (attention.paged_attention's ranges); window as there.
    Returns [R, Hkv, QG, Dh] in the queries' dtype."""
    groups, kv_heads, width, head_dim = grouped.shape
    block = k_pool.shape[3]
    padded = max(MIN_TILE, pl.next_power_of_2(width))
    grouped = jnp.pad(grouped, ((0, 0), (0, 0), (0, padded - width), (0, 0)))
    qpos = jnp.pad(qpos, ((0, 0), (0, padded - width)), constant_values=-1)
    first_page = first // block
    end_page = jnp.where(last >= 0, last // block + 1, first_page)
    bounds = jnp.stack(
        [first_page, end_page, last, jnp.broadcast_to(window, last.shape)], axis=1
    ).astype(jnp.int32)
    rows = tables[seq]  # [R, pages per sequence]
    pages = k_pool.shape[0]
    whole_pool = (pages, None, *k_pool.shape[2:])
    out = pl.pallas_call(
        functools.partial(_kernel, block=block),
        grid=(groups, kv_heads),
        in_specs=[
            pl.BlockSpec((None, None, padded, head_dim), lambda r, h: (r, h, 0, 0)),
            pl.BlockSpec((None, padded), lambda r, h: (r, 0)),
            pl.BlockSpec((None, 4), lambda r, h: (r, 0)),
            pl.BlockSpec((None, rows.shape[1]), lambda r, h: (r, 0)),
            pl.BlockSpec(whole_pool, lambda r, h: (0, h, 0, 0)),
            pl.BlockSpec((pages, None, *v_pool.shape[2:]), lambda r, h: (0, h, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, padded, head_dim), lambda r, h: (r, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct(grouped.shape, grouped.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret,
        name="jaxpp_paged_attention",
    )(grouped, qpos, bounds, rows, k_pool, v_pool)
    return out[:, :, :width]
