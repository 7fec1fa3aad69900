"""Attention over pages (attention.py) against a dense numpy reference: random ragged batches of
query groups over sequences scattered into random pages, decode groups and prompt blocks, with
and without sliding windows, GQA ratios 1, 2 and 4, page sizes that do and do not divide an
item, an item bound that forces the item loop; unused pages hold NaN and never matter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpp import attention
from jaxpp.attention import items_needed, paged_attention, write_kv


def _reference(q, q_pos, seq, keys, values, window):
    """q [R, Q, Hq, D]; keys/values [rows, T, Hkv, D]: softmax over positions <= q_pos."""
    r_, q_, hq, d = q.shape
    hkv = keys.shape[2]
    out = np.zeros(q.shape, np.float64)
    for r in range(r_):
        for i in range(q_):
            p = q_pos[r, i]
            if p < 0:
                continue
            lo = max(0, p - window + 1) if window else 0
            for h in range(hq):
                k = keys[seq[r], lo : p + 1, h // (hq // hkv)].astype(np.float64)
                v = values[seq[r], lo : p + 1, h // (hq // hkv)].astype(np.float64)
                s = k @ q[r, i, h].astype(np.float64) / np.sqrt(d)
                w = np.exp(s - s.max())
                out[r, i, h] = (w / w.sum()) @ v
    return out


def _case(rng, *, rows, block, hq, hkv, groups, queries, lengths, pages):
    d = 8
    max_len = max(lengths)
    keys = rng.standard_normal((rows, max_len, hkv, d)).astype(np.float32)
    values = rng.standard_normal((rows, max_len, hkv, d)).astype(np.float32)
    per_seq = -(-max_len // block)
    # Every sequence's pages at random places of a larger pool; the rest of the pool is NaN.
    order = rng.permutation(pages)[: rows * per_seq].reshape(rows, per_seq)
    k_pool = np.full((pages, hkv, d, block), np.nan, np.float32)
    v_pool = np.full((pages, hkv, block, d), np.nan, np.float32)
    for r in range(rows):
        for p in range(lengths[r]):
            k_pool[order[r, p // block], :, :, p % block] = keys[r, p]
            v_pool[order[r, p // block], :, p % block, :] = values[r, p]
    tables = np.zeros((rows, per_seq + 2), np.int32)  # extra columns point at page 0
    tables[:, :per_seq] = order
    seq = rng.integers(0, rows, size=groups).astype(np.int32)
    q_pos = np.full((groups, queries), -1, np.int32)
    for g in range(groups):
        n = rng.integers(0, queries + 1)  # some groups empty, some part-filled (padding)
        last = lengths[seq[g]] - 1
        start = max(0, last - n + 1)
        q_pos[g, : last - start + 1] = np.arange(start, last + 1)
    q = rng.standard_normal((groups, queries, hq, d)).astype(np.float32)
    return q, q_pos, seq, keys, values, k_pool, v_pool, tables


@pytest.mark.parametrize(
    "block,hq,hkv,queries,window",
    [(4, 4, 4, 1, 0), (3, 4, 2, 1, 5), (4, 8, 2, 6, 5), (5, 2, 1, 16, 0)],
    ids=["decode-mha", "decode-gqa2-odd-pages-window", "prompt-gqa4-window", "prompt-block16-mqa"],
)
def test_matches_dense_reference(block, hq, hkv, queries, window, monkeypatch):
    kind = "decode" if queries == 1 else "prompt"
    monkeypatch.setitem(attention.ITEM_POSITIONS, kind, 8)
    rng = np.random.default_rng(block * 100 + queries + window)
    lengths = rng.integers(1, 40, size=6).tolist()
    q, q_pos, seq, keys, values, k_pool, v_pool, tables = _case(
        rng, rows=6, block=block, hq=hq, hkv=hkv, groups=7, queries=queries,
        lengths=lengths, pages=100,
    )  # fmt: skip
    need = 0
    for g in range(len(seq)):
        real = q_pos[g][q_pos[g] >= 0]
        if len(real):
            need += items_needed(0, int(real.max()), block, kind)
    want = _reference(q, q_pos, seq, keys, values, window)
    for items in (need, need + 5):  # the exact bound, and padding items
        # A tiny read bound forces several loop steps over the items.
        monkeypatch.setattr(attention, "READ_ELEMENTS", 3 * 8 * 8 * queries * (hq // hkv))
        got = paged_attention(
            jnp.asarray(q), jnp.asarray(q_pos), jnp.asarray(seq), jnp.asarray(k_pool),
            jnp.asarray(v_pool), jnp.asarray(tables), jnp.int32(window), items=items, kind=kind,
        )  # fmt: skip
        got = np.asarray(got)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_write_kv_drops_tokens_past_the_pool():
    k_pool = jnp.zeros((3, 2, 4, 5))
    v_pool = jnp.zeros((3, 2, 5, 4))
    k = jnp.ones((3, 2, 4))
    page = jnp.array([1, 3, 2])  # the second token points past the pool: dropped
    offset = jnp.array([4, 0, 1])
    k_new, v_new = jax.jit(write_kv)(k_pool, v_pool, k, 2 * k, page, offset)
    assert float(k_new.sum()) == 2 * 8 and float(v_new.sum()) == 2 * 2 * 8
    assert float(k_new[1, :, :, 4].sum()) == 8 and float(v_new[2, :, 1].sum()) == 16
