"""Routed mixture-of-experts feed-forward (Qwen2-MoE, Qwen3-MoE), with sorted dispatch.

Router (transformers' rule): p = softmax_f32(x @ W_router) over ALL experts, keep the top-k,
renormalise if `norm_topk_prob`, cast to the model dtype. Each (token, expert) assignment is
sorted by expert so that `jax.lax.ragged_dot` runs every expert's matmul on its contiguous group
of rows — no dense all-experts compute. Qwen2-MoE adds a shared expert gated by
sigmoid(x @ w_gate).

Tensor parallelism splits every expert's intermediate dim over "tensor" (the "moe_ffn" row of
the table in sharding.py), like the dense MLP: each rank holds a slice of every expert and
routing is computed redundantly (the router is tiny). This keeps every rank's work balanced
whatever the router picks, which expert parallelism cannot promise. Each expert's output is
summed over the ranks (psum) BEFORE it is weighted and added to its token's others, and the
shared expert likewise, so that a token's sum runs in the same order at any tp: summing the
ranks' partial mixtures instead put Qwen2-MoE at tp=4 2.0e-5 of the logit scale away from
tp=1 (dense layouts: <= 3.2e-6).

Models that mix dense and MoE layers (`mlp_only_layers`, `decoder_sparse_step`) stack both
kinds of weights in every slot, compute both and keep the layer's own (a `lax.cond` would cost
a host round trip per layer on a GPU); the unused kind is zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpp.config import ModelConfig
from jaxpp.fp8 import FP8, SlotFP8, dequantize
from jaxpp.model import MLP, STACK_AXES, LayerInfo, _linear, _stacked


class MoEBlock(nnx.Module):
    """The routed experts in FP8 (fp8.py) are dequantized inside the program and multiplied by
    `ragged_dot` as float weights, whatever JAXPP_FP8_GEMM says."""

    def __init__(self, cfg: ModelConfig, dtype, stack: tuple[int, ...], fp8: SlotFP8 | None = None):
        d, e, f = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        self.router = _stacked(stack, (d, e), ("embed", "router"), dtype)
        in_axes, out_axes = ("experts", "embed", "moe_ffn"), ("experts", "moe_ffn", "embed")
        for name, shape, axes in (
            ("gate_proj", (e, d, f), in_axes),
            ("up_proj", (e, d, f), in_axes),
            ("down_proj", (e, f, d), out_axes),
        ):
            _linear(self, name, f"mlp.{name}", stack, shape, axes, 1, dtype, fp8, n_batch=1)
        fs = cfg.shared_expert_intermediate_size
        self.shared = MLP(d, fs, False, dtype, stack, fp8, "mlp.shared") if fs else None
        self.shared_gate = _stacked(stack, (d, 1), ("embed", None), dtype) if fs else None
        mixed = not all(cfg.is_moe_layer)
        ffn = cfg.intermediate_size
        self.dense = MLP(d, ffn, False, dtype, stack, fp8, "mlp.dense") if mixed else None
        self.is_moe = LayerInfo(jnp.ones(stack, jnp.bool_), logical_axes=STACK_AXES)
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.dense is None:
            return self.routed(x)
        return jnp.where(self.is_moe[...], self.routed(x), self.dense(x))

    def routed(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        tokens, experts = x.shape[0], self.router.shape[-1]
        probs = jax.nn.softmax((x @ self.router[...]).astype(jnp.float32), axis=-1)
        weights, chosen = jax.lax.top_k(probs, self.top_k)
        if self.norm_topk_prob:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        weights = weights.astype(x.dtype).reshape(-1)
        chosen = chosen.reshape(-1)
        owner = jnp.repeat(jnp.arange(tokens), self.top_k)
        order = jnp.argsort(chosen, stable=True)
        group_sizes = jnp.bincount(chosen, length=experts).astype(jnp.int32)
        rows = x[owner[order]]
        gate = jax.lax.ragged_dot(rows, self._experts("gate_proj", x.dtype), group_sizes)
        up = jax.lax.ragged_dot(rows, self._experts("up_proj", x.dtype), group_sizes)
        down = self._experts("down_proj", x.dtype)
        out = jax.lax.ragged_dot(jax.nn.silu(gate) * up, down, group_sizes)
        out = jax.lax.psum(out, "tensor") * weights[order][:, None]
        y = jnp.zeros_like(x).at[owner[order]].add(out)
        if self.shared is not None:
            shared = jax.lax.psum(self.shared.partial_sum(x), "tensor")
            y = y + jax.nn.sigmoid(x @ self.shared_gate[...]) * shared
        return y.reshape(shape)

    def _experts(self, name: str, dtype) -> jax.Array:
        """Every expert's weight `name` [E, in, out], dequantized when stored in FP8."""
        w = getattr(self, name)[...]
        return dequantize(w, getattr(self, f"{name}_scale")[...], dtype) if w.dtype == FP8 else w
