"""Attention over pages (attention.py) against a dense numpy reference: random ragged batches of
query groups over sequences scattered into random pages, decode groups and prompt blocks, with
and without sliding windows, GQA ratios 1, 2 and 4, page sizes that do and do not divide a
item, steps small enough for several loop iterations, the loop bounded by the data (CPU) and
by max_model_len (accelerators); unused pages hold NaN and never matter. The GPU
kernel (paged_kernel.py) answers the same cases in Pallas' interpreter, and lowers to Triton for
the model families' shapes (the lowering runs on the CPU; only Triton's own compile needs a GPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpp import attention, paged_kernel
from jaxpp.attention import paged_attention, write_kv


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
@pytest.mark.parametrize("backend", ["xla", "xla-static", "pallas"])
def test_matches_dense_reference(block, hq, hkv, queries, window, backend, monkeypatch):
    monkeypatch.setenv("JAXPP_ATTENTION", backend.split("-")[0])
    if backend == "xla-static":  # an accelerator's bound: the chunks of a max_model_len row
        monkeypatch.setattr(attention, "trips_from_data", lambda: False)
    kind = "decode" if queries == 1 else "prompt"
    monkeypatch.setitem(attention.ITEM_POSITIONS, kind, 8)  # several items per group ...
    monkeypatch.setitem(attention.ITEMS_PER_STEP, kind, 3)  # ... and several steps
    rng = np.random.default_rng(block * 100 + queries + window)
    lengths = rng.integers(1, 40, size=6).tolist()
    q, q_pos, seq, keys, values, k_pool, v_pool, tables = _case(
        rng, rows=6, block=block, hq=hq, hkv=hkv, groups=7, queries=queries,
        lengths=lengths, pages=100,
    )  # fmt: skip
    want = _reference(q, q_pos, seq, keys, values, window)
    got = paged_attention(
        jnp.asarray(q), jnp.asarray(q_pos), jnp.asarray(seq), jnp.asarray(k_pool),
        jnp.asarray(v_pool), jnp.asarray(tables), jnp.int32(window), kind=kind,
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


def test_kernel_agrees_with_the_xla_path_on_random_ragged_batches(monkeypatch):
    """Random mixes of decode rows and prompt blocks, head_dim 16, pages of 16 (the kernel's
    GPU tiles), GQA ratios 8, 2 and 2, windows on and off: kernel and XLA path to float32
    rounding. (Two draws per shape: one compiled program each per backend.)"""
    attend = {  # one jitted function per backend: the choice is read when tracing
        backend: jax.jit(lambda *a, **k: paged_attention(*a, **k), static_argnames=("kind",))
        for backend in ("xla", "pallas")
    }
    for trial, (hkv, hq, queries) in enumerate([(1, 8, 1), (2, 4, 16), (4, 8, 16)] * 2):
        rng = np.random.default_rng(1000 + trial)
        window = 0 if trial < 3 else int(rng.choice([9, 40]))
        lengths = [119, *rng.integers(1, 120, size=4).tolist()]  # one table width
        q, q_pos, seq, _, _, k_pool, v_pool, tables = _case(
            rng, rows=5, block=16, hq=hq, hkv=hkv, groups=9, queries=queries,
            lengths=lengths, pages=64,
        )  # fmt: skip
        args = [jnp.asarray(a) for a in (q, q_pos, seq, k_pool, v_pool, tables)]
        kind = "decode" if queries == 1 else "prompt"
        out = {}
        for backend in ("xla", "pallas"):
            monkeypatch.setenv("JAXPP_ATTENTION", backend)
            got = attend[backend](*args, jnp.int32(window), kind=kind)
            out[backend] = np.asarray(got)
            if trial == 0:  # the choice took: the kernel is in one program only
                traced = attend[backend].trace(*args, jnp.int32(window), kind=kind)
                assert ("pallas_call" in str(traced.jaxpr)) == (backend == "pallas")
        scale = np.abs(out["xla"]).max()
        np.testing.assert_allclose(out["pallas"], out["xla"], rtol=0, atol=2e-6 * scale)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("head_dim,hq,hkv", [(64, 32, 8), (128, 32, 8), (128, 16, 2)])
def test_kernel_lowers_to_triton(dtype, head_dim, hq, hkv):
    """Pallas -> Triton IR for CUDA, on this machine: what the GPU will compile."""
    shape = jax.ShapeDtypeStruct
    args = (
        shape((7, hkv, 16 * hq // hkv, head_dim), dtype), shape((7, 16 * hq // hkv), jnp.int32),
        shape((7,), jnp.int32), shape((7,), jnp.int32), shape((7,), jnp.int32),
        shape((300, hkv, head_dim, 16), dtype),
        shape((300, hkv, 16, head_dim), dtype), shape((6, 257), jnp.int32),
        shape((), jnp.int32),
    )  # fmt: skip
    assert paged_kernel.supported(head_dim, 16)
    lowered = jax.jit(paged_kernel.paged_attention_kernel).trace(*args)
    text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    assert "jaxpp_paged_attention" in text and "triton" in text


def test_attention_backend_choice(monkeypatch):
    monkeypatch.setenv("JAXPP_ATTENTION", "auto")
    assert attention.attention_backend(128, 16) == "xla"  # no GPU here
    monkeypatch.setenv("JAXPP_ATTENTION", "pallas")
    assert attention.attention_backend(8, 3) == "pallas-interpret"
    assert not paged_kernel.supported(80, 16) and not paged_kernel.supported(128, 8)
    monkeypatch.setenv("JAXPP_ATTENTION", "cudnn")
    with pytest.raises(ValueError, match="JAXPP_ATTENTION='cudnn'"):
        attention.attention_backend(128, 16)
