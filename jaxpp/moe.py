"""Routed mixture-of-experts feed-forward (Qwen2-MoE, Qwen3-MoE), with sorted dispatch.

Router (transformers' rule): p = softmax_f32(x @ W_router) over ALL experts, keep the top-k,
renormalise if `norm_topk_prob`, cast to the model dtype. Each (token, expert) assignment is
sorted by expert so that `jax.lax.ragged_dot` runs every expert's matmul on its contiguous group
of rows — no dense all-experts compute. Qwen2-MoE adds a shared expert gated by
sigmoid(x @ w_gate).

Tensor parallelism splits every expert's intermediate dim over "tensor" (the "moe_ffn" row of
the table in sharding.py), like the dense MLP: each rank holds a slice of every expert, routing
is computed redundantly (the router is tiny), and one psum after the down projections combines
the routed and the shared expert. This keeps every rank's work balanced whatever the router
picks, which expert parallelism cannot promise.

Models that mix dense and MoE layers (`mlp_only_layers`, `decoder_sparse_step`) stack both
kinds of weights in every slot and pick per layer with `lax.cond`; the unused kind is zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpp.checkpoint import CheckpointError, _linear_in_out, _linear_out_proj, gate_up
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
        return jax.lax.cond(self.is_moe[...], self.routed, self.dense, x)

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
        out = out * weights[order][:, None]
        y = jnp.zeros_like(x).at[owner[order]].add(out)
        if self.shared is not None:
            shared = self.shared.partial_sum(x)
            y = y + jax.nn.sigmoid(x @ self.shared_gate[...]) * shared
        return jax.lax.psum(y, "tensor").reshape(shape)


# --- checkpoint sources ------------------------------------------------------------------------


def _layer_of(name: str) -> int:
    return int(name.split(".")[2])  # "model.layers.{l}. ..."


def _experts_reader(cfg: ModelConfig, which: str):
    """Our [E, in, out] expert weights from per-expert or fused HF tensors."""

    def read(ckpt, prefix: str, shape: tuple[int, ...]) -> np.ndarray:
        if not cfg.is_moe_layer[_layer_of(prefix)]:
            return np.zeros(shape, np.float32)  # a dense layer of a mixed model
        f = cfg.moe_intermediate_size
        if ckpt.has(f"{prefix}.gate_up_proj") or ckpt.has(f"{prefix}.down_proj"):
            if which == "down_proj":
                w = ckpt.read(f"{prefix}.down_proj")  # [E, D, F]
                _expect(ckpt, f"{prefix}.down_proj", w.shape, (cfg.num_experts, shape[2], f))
                return np.swapaxes(w, 1, 2)
            w = ckpt.read(f"{prefix}.gate_up_proj")  # [E, 2F, D], gate rows first
            _expect(ckpt, f"{prefix}.gate_up_proj", w.shape, (cfg.num_experts, 2 * f, shape[1]))
            half = w[:, :f] if which == "gate_proj" else w[:, f:]
            return np.swapaxes(half, 1, 2)
        one = shape[1:]
        reader = _linear_out_proj if which == "down_proj" else _linear_in_out
        return np.stack(
            [reader(ckpt, f"{prefix}.{e}.{which}.weight", one) for e in range(cfg.num_experts)]
        )

    return read


def _expect(ckpt, name, found, expected) -> None:
    if tuple(found) != tuple(expected):
        raise CheckpointError(
            f"{ckpt.where[name].path}: tensor {name!r} has shape {tuple(found)}, "
            f"expected {tuple(expected)} from config.json"
        )


def _only_moe(cfg: ModelConfig, read):
    def guarded(ckpt, name, shape):
        if not cfg.is_moe_layer[_layer_of(name)]:
            return np.zeros(shape, np.float32)
        return read(ckpt, name, shape)

    return guarded


def _only_dense(cfg: ModelConfig, read):
    def guarded(ckpt, name, shape):
        if cfg.is_moe_layer[_layer_of(name)]:
            return np.zeros(shape, np.float32)
        return read(ckpt, name, shape)

    return guarded


def moe_sources(cfg: ModelConfig, p: str) -> dict:
    """Our MoE parameter paths -> (HF name template, reader); see checkpoint.layer_sources."""
    src = {
        "mlp.router": (p + "mlp.gate.weight", _only_moe(cfg, _linear_in_out)),
        "mlp.gate_proj": (p + "mlp.experts", _experts_reader(cfg, "gate_proj")),
        "mlp.up_proj": (p + "mlp.experts", _experts_reader(cfg, "up_proj")),
        "mlp.down_proj": (p + "mlp.experts", _experts_reader(cfg, "down_proj")),
    }
    if cfg.shared_expert_intermediate_size:
        s = p + "mlp.shared_expert."
        src["mlp.shared.gate_up_proj"] = (
            s + "gate_proj.weight",
            gate_up(_only_moe(cfg, _linear_in_out)),
        )
        src["mlp.shared.down_proj"] = (s + "down_proj.weight", _only_moe(cfg, _linear_out_proj))
        src["mlp.shared_gate"] = (
            p + "mlp.shared_expert_gate.weight",
            _only_moe(cfg, _linear_in_out),
        )
    if not all(cfg.is_moe_layer):
        src["mlp.dense.gate_up_proj"] = (
            p + "mlp.gate_proj.weight",
            gate_up(_only_dense(cfg, _linear_in_out)),
        )
        src["mlp.dense.down_proj"] = (
            p + "mlp.down_proj.weight",
            _only_dense(cfg, _linear_out_proj),
        )
    return src
