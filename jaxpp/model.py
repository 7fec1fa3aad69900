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
from jaxpp.fp8 import FP8, SlotFP8, project
from jaxpp.sharding import LOGICAL_TO_MESH, logical_to_spec

STACK_AXES = ("stage",)  # leading axis of every per-slot layer tensor
VOCAB_AXES = ("stage", "tensor")  # the devices a vocab-parallel table is split over


class LayerInfo(nnx.Variable):
    """Per-layer constants stacked with the parameters (filled-slot mask, sliding window)."""


def _param(shape: tuple[int, ...], axes: tuple[str | None, ...], dtype, value=0.0) -> nnx.Param:
    return nnx.Param(jnp.full(shape, value, dtype), logical_axes=axes)


def _stacked(stack: tuple[int, ...], shape: tuple[int, ...], axes: tuple, dtype, value=0.0):
    return _param(stack + shape, STACK_AXES[: len(stack)] + axes, dtype, value)


def _linear(
    module: nnx.Module,
    name: str,
    path: str,
    stack: tuple[int, ...],
    shape: tuple[int, ...],
    axes: tuple,
    n_in: int,
    dtype,
    fp8: SlotFP8 | None,
    n_batch: int = 0,
) -> None:
    """Linear weight `name` [*stack, *batch, *in, *out] of `module` (at `path` in the layer).
    Where the storage lists `path`, `<name>_scale` (and `<name>_input_scale` for static
    activation scales) sit beside it in every slot, and the weight is float8_e4m3fn in the
    slots that store it so (fp8.py); otherwise the scales are None and the weight is `dtype`.
    Every slot thus has one structure (pipeline.py merges them all with one graphdef)."""
    scaled = fp8 is not None and path in fp8.storage.params
    stored = FP8 if scaled and path in fp8.stored else dtype
    setattr(module, name, _stacked(stack, shape, axes, stored))
    scale = input_scale = None
    if scaled:
        ins = slice(n_batch, n_batch + n_in)
        sharded = LOGICAL_TO_MESH[axes[ins][-1]] == "tensor"
        grid = fp8.storage.scale_grid(shape[ins], sharded)
        grid_axes = tuple(a if g > 1 else None for a, g in zip(axes[ins], grid, strict=True))
        scale_shape = shape[:n_batch] + grid + shape[ins.stop :]
        scale_axes = axes[:n_batch] + grid_axes + axes[ins.stop :]
        scale = _stacked(stack, scale_shape, scale_axes, jnp.float32, 1.0)
        if fp8.storage.activations == "static" and n_batch == 0:
            input_scale = _stacked(stack, (), (), jnp.float32, 1.0)
    setattr(module, f"{name}_scale", scale)
    setattr(module, f"{name}_input_scale", input_scale)


def _project(module: nnx.Module, name: str, x: jax.Array, n_in: int) -> jax.Array:
    """x through `module`'s linear weight `name` (fp8.project), its scales included."""

    def value(attr: str):
        var = getattr(module, attr)
        return None if var is None else var[...]

    return project(
        x,
        value(name),
        n_in,
        value(f"{name}_scale"),
        module.fp8,
        value(f"{name}_input_scale"),
    )


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

    def __init__(
        self,
        cfg: ModelConfig,
        kv_heads: int,
        dtype,
        stack: tuple[int, ...],
        fp8: SlotFP8 | None = None,
    ):
        d, h, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        q_axes, kv_axes = ("embed", "q_heads", "head_dim"), ("embed", "kv_heads", "head_dim")
        for name, shape, axes in (
            ("q_proj", (d, h, hd), q_axes),
            ("k_proj", (d, kv_heads, hd), kv_axes),
            ("v_proj", (d, kv_heads, hd), kv_axes),
        ):
            _linear(self, name, f"attn.{name}", stack, shape, axes, 1, dtype, fp8)
        o_axes = ("q_heads", "head_dim", "embed")
        _linear(self, "o_proj", "attn.o_proj", stack, (h, hd, d), o_axes, 2, dtype, fp8)
        self.fp8 = None if fp8 is None else fp8.storage
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
        q, k, v = (_project(self, name, x, 1) for name in ("q_proj", "k_proj", "v_proj"))
        if self.has_qkv_bias:
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        if self.q_norm is not None:  # Qwen3: per-head RMSNorm before rope
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, attn: jax.Array) -> jax.Array:
        """attn [B, T, Hq, Dh] -> [B, T, D], summed over the tensor-parallel head shards."""
        y = jax.lax.psum(_project(self, "o_proj", attn, 2), "tensor")
        return y if self.o_bias is None else y + self.o_bias[...]


class MLP(nnx.Module):
    def __init__(
        self,
        d: int,
        ffn: int,
        bias: bool,
        dtype,
        stack: tuple[int, ...],
        fp8: SlotFP8 | None = None,
        path: str = "mlp",
    ):
        # gate and up projections side by side, [D, 2, F]: one GEMM of width 2F instead of two
        # of width F (measured 1.2x faster at batch 32 on CPU); F is what tp splits.
        gate_up_axes = ("embed", None, "ffn")
        _linear(
            self, "gate_up_proj", f"{path}.gate_up_proj", stack, (d, 2, ffn), gate_up_axes, 1,
            dtype, fp8,
        )  # fmt: skip
        down_axes = ("ffn", "embed")
        _linear(self, "down_proj", f"{path}.down_proj", stack, (ffn, d), down_axes, 1, dtype, fp8)
        self.fp8 = None if fp8 is None else fp8.storage
        if bias:
            self.gate_up_bias = _stacked(stack, (2, ffn), (None, "ffn"), dtype)
            self.down_bias = _stacked(stack, (d,), ("embed",), dtype)
        self.bias = bias

    def partial_sum(self, x: jax.Array) -> jax.Array:
        """This tensor rank's share of the output (before the psum over "tensor")."""
        gate_up = _project(self, "gate_up_proj", x, 1)  # [..., 2, F]: one GEMM of width 2F
        if self.bias:
            gate_up = gate_up + self.gate_up_bias[...]
        return _project(self, "down_proj", jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :], 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.psum(self.partial_sum(x), "tensor")
        return y + self.down_bias[...] if self.bias else y


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(rms(x)), then x + mlp(rms(x)). One slot, stacked over stages."""

    def __init__(
        self,
        cfg: ModelConfig,
        kv_heads: int,
        dtype,
        stack: tuple[int, ...],
        fp8: SlotFP8 | None = None,
    ):
        d = cfg.hidden_size
        self.input_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, stack)
        self.attn = Attention(cfg, kv_heads, dtype, stack, fp8)
        self.post_attn_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, stack)
        if cfg.num_experts:
            from jaxpp.moe import MoEBlock  # noqa: PLC0415 - only MoE checkpoints need it

            self.mlp = MoEBlock(cfg, dtype, stack, fp8)
        else:
            self.mlp = MLP(d, cfg.intermediate_size, cfg.mlp_bias, dtype, stack, fp8)
        self.filled = LayerInfo(jnp.zeros(stack, jnp.bool_), logical_axes=STACK_AXES)
        self.window = LayerInfo(jnp.zeros(stack, jnp.int32), logical_axes=STACK_AXES)


class Transformer(nnx.Module):
    """Embedding, the decoder layer slots, final norm and LM head — the whole model.

    `fp8[i]`: how slot i stores its linear weights in FP8 (None: it has none); the embedding
    and the LM head always keep `dtype`."""

    def __init__(
        self,
        cfg: ModelConfig,
        stages: int,
        layers_per_stage: int,
        vocab: int,
        kv_heads: int,
        dtype,
        fp8: tuple[SlotFP8, ...] | None = None,
    ):
        self.embed = _param((vocab, cfg.hidden_size), ("vocab", "embed"), dtype)
        fp8 = fp8 or (None,) * layers_per_stage
        self.layers = nnx.List(
            [DecoderLayer(cfg, kv_heads, dtype, (stages,), fp8[i]) for i in range(layers_per_stage)]
        )
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        # [V, D] like the embedding (and HF): logits = h . W^T measured 2x faster than h @ W
        # with W stored [D, V] for a 32 x 512 x 8192 head on CPU.
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else _param((vocab, cfg.hidden_size), ("vocab", "embed"), dtype)
        )


def param_specs(state: nnx.State):
    """The PartitionSpec of every parameter of `state`, from its logical axes."""
    return jax.tree.map(
        lambda v: logical_to_spec(v.get_metadata()["logical_axes"]),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def merge_slots(graphdef, layer_graphdef, state: nnx.State) -> tuple[Transformer, list]:
    """The local model (embedding, final norm, head) and one `DecoderLayer` per layer slot,
    each this device's [1, ...] shard of the slot's stack squeezed to one layer's weights;
    called inside the programs, at trace time."""
    model = nnx.merge(graphdef, state)
    layers = [
        nnx.merge(layer_graphdef, jax.tree.map(lambda a: a[0], nnx.state(slot)))
        for slot in model.layers
    ]
    return model, layers


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
