"""One decoder for every supported family (Llama, Mistral, Qwen2, Qwen3 and the MoE variants).

Family differences are config switches (biases, q/k norm, sliding windows, rope scaling, routed
experts), never copies of the model. The numerical rules follow transformers exactly; see
shared/reference/hf-parity.md: RMSNorm in float32 then weight, rotate-half rope, softmax in
float32, GQA head j -> KV head j // group.

Storage: the decoder stack is a list of layer SLOTS, one `DecoderLayer` per slot, each parameter
stacked over stages `[stages, ...]` and sharded on "stage": layer l of stage s lives in slot i
at index s (see partition.layer_grid), so the partition is the sharding spec. One array per slot
rather than one `[stages, slots, ...]` stack: inside the jitted programs a slot's weights are then
whole buffers, whereas picking a layer out of a stack is a `dynamic_slice`, which XLA
materialises as a copy of the layer's weights on every tick (measured: 63% of a batch-1 decode
tick on CPU; docs/performance.md). pipeline.py `nnx.merge`s each slot with the layer graphdef
at trace time — no Python on the hot path. Every function here runs INSIDE `jax.shard_map`, on
one device's shard: tensor-parallel sums (`psum("tensor")`) and vocab-parallel lookups are
written out explicitly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpp.config import ModelConfig

STACK_AXES = ("stage",)  # leading axis of every per-slot layer tensor
VOCAB_AXES = ("stage", "tensor")  # the devices a vocab-parallel table is split over


class LayerInfo(nnx.Variable):
    """Per-layer constants stacked with the parameters (filled-slot mask, sliding window)."""


def _param(shape: tuple[int, ...], axes: tuple[str | None, ...], dtype, value=0.0) -> nnx.Param:
    return nnx.Param(jnp.full(shape, value, dtype), logical_axes=axes)


def _stacked(stack: tuple[int, ...], shape: tuple[int, ...], axes: tuple, dtype, value=0.0):
    return _param(stack + shape, STACK_AXES[: len(stack)] + axes, dtype, value)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype, stack: tuple[int, ...] = (), axis="embed"):
        self.weight = _stacked(stack, (dim,), (axis,), dtype, 1.0)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * self.weight[...]


class Attention(nnx.Module):
    """Projections only; the KV pages and the softmax live in attention.py."""

    def __init__(self, cfg: ModelConfig, kv_heads: int, dtype, stack: tuple[int, ...]):
        d, h, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.q_proj = _stacked(stack, (d, h, hd), ("embed", "q_heads", "head_dim"), dtype)
        self.k_proj = _stacked(stack, (d, kv_heads, hd), ("embed", "kv_heads", "head_dim"), dtype)
        self.v_proj = _stacked(stack, (d, kv_heads, hd), ("embed", "kv_heads", "head_dim"), dtype)
        self.o_proj = _stacked(stack, (h, hd, d), ("q_heads", "head_dim", "embed"), dtype)
        if cfg.qkv_bias:
            self.q_bias = _stacked(stack, (h, hd), ("q_heads", "head_dim"), dtype)
            self.k_bias = _stacked(stack, (kv_heads, hd), ("kv_heads", "head_dim"), dtype)
            self.v_bias = _stacked(stack, (kv_heads, hd), ("kv_heads", "head_dim"), dtype)
        self.o_bias = _stacked(stack, (d,), ("embed",), dtype) if cfg.o_bias else None
        self.q_norm = (
            RMSNorm(hd, cfg.rms_norm_eps, dtype, stack, "head_dim") if cfg.qk_norm else None
        )
        self.k_norm = (
            RMSNorm(hd, cfg.rms_norm_eps, dtype, stack, "head_dim") if cfg.qk_norm else None
        )
        self.has_qkv_bias = cfg.qkv_bias

    def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
        """x [B, T, D] -> q [B, T, Hq, Dh], k and v [B, T, Hkv, Dh] (this device's heads)."""
        q = jnp.einsum("btd,dhk->bthk", x, self.q_proj[...])
        k = jnp.einsum("btd,dhk->bthk", x, self.k_proj[...])
        v = jnp.einsum("btd,dhk->bthk", x, self.v_proj[...])
        if self.has_qkv_bias:
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        if self.q_norm is not None:  # Qwen3: per-head RMSNorm before rope
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, attn: jax.Array) -> jax.Array:
        """attn [B, T, Hq, Dh] -> [B, T, D], summed over the tensor-parallel head shards."""
        y = jax.lax.psum(jnp.einsum("bthk,hkd->btd", attn, self.o_proj[...]), "tensor")
        return y if self.o_bias is None else y + self.o_bias[...]


class MLP(nnx.Module):
    def __init__(self, d: int, ffn: int, bias: bool, dtype, stack: tuple[int, ...]):
        # gate and up projections side by side, [D, 2, F]: one GEMM of width 2F instead of two
        # of width F (measured 1.2x faster at batch 32 on CPU); F is what tp splits.
        self.gate_up_proj = _stacked(stack, (d, 2, ffn), ("embed", None, "ffn"), dtype)
        self.down_proj = _stacked(stack, (ffn, d), ("ffn", "embed"), dtype)
        if bias:
            self.gate_up_bias = _stacked(stack, (2, ffn), (None, "ffn"), dtype)
            self.down_bias = _stacked(stack, (d,), ("embed",), dtype)
        self.bias = bias

    def partial_sum(self, x: jax.Array) -> jax.Array:
        """This tensor rank's share of the output (before the psum over "tensor")."""
        w = self.gate_up_proj[...]
        d, _, ffn = w.shape
        gate_up = (x @ w.reshape(d, 2 * ffn)).reshape(*x.shape[:-1], 2, ffn)
        if self.bias:
            gate_up = gate_up + self.gate_up_bias[...]
        return (jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]) @ self.down_proj[...]

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.psum(self.partial_sum(x), "tensor")
        return y + self.down_bias[...] if self.bias else y


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(rms(x)), then x + mlp(rms(x)). One slot, stacked over stages."""

    def __init__(self, cfg: ModelConfig, kv_heads: int, dtype, stack: tuple[int, ...]):
        d = cfg.hidden_size
        self.input_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, stack)
        self.attn = Attention(cfg, kv_heads, dtype, stack)
        self.post_attn_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, stack)
        if cfg.num_experts:
            from jaxpp.moe import MoEBlock  # noqa: PLC0415 - only MoE checkpoints need it

            self.mlp = MoEBlock(cfg, dtype, stack)
        else:
            self.mlp = MLP(d, cfg.intermediate_size, cfg.mlp_bias, dtype, stack)
        self.filled = LayerInfo(jnp.zeros(stack, jnp.bool_), logical_axes=STACK_AXES)
        self.window = LayerInfo(jnp.zeros(stack, jnp.int32), logical_axes=STACK_AXES)


class Transformer(nnx.Module):
    """Embedding, the decoder layer slots, final norm and LM head — the whole model."""

    def __init__(
        self, cfg: ModelConfig, stages: int, layers_per_stage: int, vocab: int, kv_heads: int, dtype
    ):
        self.embed = _param((vocab, cfg.hidden_size), ("vocab", "embed"), dtype)
        self.layers = nnx.List(
            [DecoderLayer(cfg, kv_heads, dtype, (stages,)) for _ in range(layers_per_stage)]
        )
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        # [V, D] like the embedding (and HF): logits = h . W^T measured 2x faster than h @ W
        # with W stored [D, V] for a 32 x 512 x 8192 head on CPU.
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else _param((vocab, cfg.hidden_size), ("vocab", "embed"), dtype)
        )


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half rope; cos/sin [B, T, Dh] broadcast over heads."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies in float32, with llama3 band scaling when configured."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))
    inv = inv.astype(np.float32)
    if cfg.rope_llama3 is not None:
        factor, low, high, orig = (np.float32(v) for v in cfg.rope_llama3)
        low_wl, high_wl = orig / low, orig / high
        wl = np.float32(2 * math.pi) / inv
        inv_l = np.where(wl > low_wl, inv / factor, inv)
        smooth_f = (orig / wl - low) / (high - low)
        smooth = (1 - smooth_f) * inv_l / factor + smooth_f * inv_l
        medium = ~(wl < high_wl) & ~(wl > low_wl)
        inv = np.where(medium, smooth, inv_l).astype(np.float32)
    return inv / np.float32(cfg.rope_linear_factor)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def vocab_shard_index() -> jax.Array:
    """This device's position along the vocab-parallel ("stage", "tensor") split."""
    return jax.lax.axis_index(VOCAB_AXES)


def embed_lookup(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """Vocab-parallel lookup: each device fills the rows it owns, one psum assembles them."""
    rows = table.shape[0]
    local = tokens - vocab_shard_index() * rows
    inside = (local >= 0) & (local < rows)
    found = jnp.where(inside[..., None], table[jnp.clip(local, 0, rows - 1)], 0)
    return jax.lax.psum(found, VOCAB_AXES)


def local_logits(model: Transformer, hidden: jax.Array, vocab_size: int) -> jax.Array:
    """Final norm + this device's vocab shard of the LM head, float32; padded ids get -inf."""
    h = model.final_norm(hidden)
    table = model.embed if model.lm_head is None else model.lm_head
    logits = jnp.einsum("...d,vd->...v", h, table[...]).astype(jnp.float32)
    width = logits.shape[-1]
    ids = vocab_shard_index() * width + jnp.arange(width)
    return jnp.where(ids < vocab_size, logits, -jnp.inf)
