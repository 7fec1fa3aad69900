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
from jaxpp.model import MLP, STACK_AXES, LayerInfo, _stacked


class MoEBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, stack: tuple[int, ...]):
        d, e, f = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        self.router = _stacked(stack, (d, e), ("embed", "router"), dtype)
        self.gate_proj = _stacked(stack, (e, d, f), ("experts", "embed", "moe_ffn"), dtype)
        self.up_proj = _stacked(stack, (e, d, f), ("experts", "embed", "moe_ffn"), dtype)
        self.down_proj = _stacked(stack, (e, f, d), ("experts", "moe_ffn", "embed"), dtype)
        fs = cfg.shared_expert_intermediate_size
        self.shared = MLP(d, fs, False, dtype, stack) if fs else None
        self.shared_gate = _stacked(stack, (d, 1), ("embed", None), dtype) if fs else None
        mixed = not all(cfg.is_moe_layer)
        self.dense = MLP(d, cfg.intermediate_size, False, dtype, stack) if mixed else None
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
        gate = jax.lax.ragged_dot(rows, self.gate_proj[...], group_sizes)
        up = jax.lax.ragged_dot(rows, self.up_proj[...], group_sizes)
        out = jax.lax.ragged_dot(jax.nn.silu(gate) * up, self.down_proj[...], group_sizes)
        out = jax.lax.psum(out, "tensor") * weights[order][:, None]
        y = jnp.zeros_like(x).at[owner[order]].add(out)
        if self.shared is not None:
            shared = jax.lax.psum(self.shared.partial_sum(x), "tensor")
            y = y + jax.nn.sigmoid(x @ self.shared_gate[...]) * shared
        return y.reshape(shape)
