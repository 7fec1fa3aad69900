"""Time of one ring tick on given hardware: what each device reads, computes and sends.

A tick of the ring (pipeline.py) has static shapes: every stage computes every one of its layer
slots over the tick's T token slots (its bucket), padding and idle stages included (there is no
`cond` to skip them); attention reads the keys of each query group's own sequence. So a
tick's time is a function of its bucket and of the keys it reads. Every tick, on every device:

1. the vocab-parallel embedding of the entering tokens: one psum over ("stage", "tensor") of
   [T, D];
2. its stage's layer slots over those T tokens, each: the weight GEMMs, the new keys and
   values written into their pages, attention over the decode slots' and prompt groups' keys,
   and two psums over "tensor" of [T, D];
3. a psum over "stage" of the last stage's rows to sample ([mb, D]; all T when collecting
   logits), then its vocab shard of the LM head over them and the sharded argmax (a pmax and a
   pmin over the vocab devices);
4. a ppermute of [T, D] activations to the next stage.

Each compute part costs max(bytes read / bandwidth, FLOPs / peak). A collective over g devices
costs 2 (g - 1) / g x bytes / link bandwidth + 2 ceil(log2 g) x link latency (ring bandwidth,
tree latency); a ppermute bytes / bandwidth + latency. A group that spans nodes uses the
inter-node link. The bytes come from the abstract state's shard shapes (layout.py), never from
a parameter-count formula.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from flax import nnx

from jaxpp.attention import QUERY_BLOCK
from jaxpp.hardware import Hardware, Link
from jaxpp.layout import Layout, kv_bytes_per_page, param_leaves, shard_bytes
from jaxpp.pipeline import PipelineShape

EXPERT_LEAVES = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # [stages, E, ...] in MoE
MOE_ONLY = ("mlp.router", "mlp.shared.", "mlp.shared_gate")
DENSE_ONLY = ("mlp.dense.",)


@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """One layer slot's weights on one device, by when they are read."""

    always: int  # bytes: attention, norms, a dense model's MLP
    moe_only: int  # router and shared expert (MoE layers)
    dense_only: int  # the dense MLP of a model mixing dense and MoE layers
    experts: int  # every routed expert's slice
    always_macs: int  # multiply-accumulates per token (elements of the GEMM weights)
    moe_only_macs: int
    dense_only_macs: int
    expert_macs: int  # per token per chosen expert


@dataclasses.dataclass(frozen=True)
class TickCost:
    seconds: float
    compute: float  # the layers of a stage
    head: float  # LM head and sampling
    transfer: float  # activation ppermute to the next stage
    collectives: float  # embedding psum, tensor-parallel psums, the stage psum, argmax


class CostModel:
    def __init__(self, layout: Layout, state: nnx.State, shape: PipelineShape, hw: Hardware):
        cfg = layout.config
        self.layout, self.shape, self.hw = layout, shape, hw
        mesh = layout.mesh
        self.itemsize = np.dtype(layout.dtype).itemsize
        self.dtype_name = np.dtype(layout.dtype).name
        share = layout.devices if hw.shared_host else 1
        self.bandwidth = hw.memory_bandwidth / share
        self.peak = hw.flops(self.dtype_name) / share
        # Per slot: a slot holding a layer an FP8 checkpoint leaves unquantized keeps that
        # weight in floats (layout.fp8_slots), so slots may differ in bytes.
        self.weights = [
            _layer_weights(state, mesh, cfg.num_experts, i) for i in range(layout.layers_per_stage)
        ]
        head_leaf = "embed" if cfg.tie_word_embeddings else "lm_head"
        head = next(leaf for leaf in param_leaves(state) if leaf[0] == head_leaf)
        self.head_bytes = shard_bytes(mesh, head[1], head[2], head[3])
        self.head_macs = self.head_bytes // self.itemsize
        # KV bytes per position of one layer on one device, off the pools' shardings.
        self.kv_position_bytes = kv_bytes_per_page(layout) / (
            layout.layers_per_stage * layout.block_size
        )
        self.attention_flops = 4 * (cfg.num_heads // layout.tp) * cfg.head_dim  # per query-key
        self.hidden_bytes = cfg.hidden_size * self.itemsize
        # Every slot is computed on every stage (an empty one is masked): the MoE kind of a
        # slot is that of its layer on the stage with the most MoE layers.
        self.slot_kinds = [
            any(cfg.is_moe_layer[layer] for layer in layout.grid[:, i] if layer >= 0)
            for i in range(layout.layers_per_stage)
        ]
        self.links = _links(layout, hw)

    @functools.lru_cache(maxsize=1 << 12)  # noqa: B019 - one model per plan, kept with it
    def tick(self, tokens: int, decode_keys: int, prompt_keys: int, head_rows: int) -> TickCost:
        """The time of one tick of `tokens` slots whose decode slots read `decode_keys` keys
        and whose prompt groups read `prompt_keys` (each by QUERY_BLOCK queries), sampling
        `head_rows` rows."""
        compute = 0.0
        for is_moe, weights in zip(self.slot_kinds, self.weights, strict=True):
            weight_bytes, macs = self._layer_gemms(is_moe, weights, tokens)
            # Keys read, and this tick's written; each read by 1 or QUERY_BLOCK queries.
            kv_bytes = (decode_keys + prompt_keys + tokens) * self.kv_position_bytes
            score_flops = (decode_keys + prompt_keys * QUERY_BLOCK) * self.attention_flops
            compute += max(weight_bytes / self.bandwidth, 2 * macs / self.peak)
            compute += max(kv_bytes / self.bandwidth, score_flops / self.peak)
        tensor = 2 * len(self.slot_kinds) * self._all_reduce("tensor", tokens * self.hidden_bytes)
        head = max(
            self.head_bytes / self.bandwidth, 2 * self.head_macs * head_rows / self.peak
        ) + 2 * self._all_reduce("vocab", 0)  # the sharded argmax: a pmax and a pmin
        collectives = (
            tensor
            + self._all_reduce("vocab", tokens * self.hidden_bytes)
            + self._all_reduce("stage", head_rows * self.hidden_bytes)
        )
        transfer = 0.0
        if self.layout.pp > 1:
            link = self.links["next_stage"]
            transfer = tokens * self.hidden_bytes / link.bandwidth + link.latency
        return TickCost(
            compute + head + collectives + transfer, compute, head, transfer, collectives
        )

    def _layer_gemms(self, is_moe: bool, w: LayerWeights, tokens: int) -> tuple[float, float]:
        weight_bytes, macs = float(w.always), float(w.always_macs * tokens)
        if not is_moe:
            return weight_bytes + w.dense_only, macs + w.dense_only_macs * tokens
        cfg = self.layout.config
        experts, chosen = cfg.num_experts, cfg.num_experts_per_tok
        # Experts some token routes to, routing uniform: each expert is missed by all tokens
        # with probability (1 - k/E)^tokens. A model mixing kinds computes both (moe.py).
        touched = experts * (1 - (1 - chosen / experts) ** tokens)
        weight_bytes += w.moe_only + w.dense_only + w.experts * touched / experts
        macs += (w.moe_only_macs + w.dense_only_macs + w.expert_macs * chosen) * tokens
        return weight_bytes, macs

    def _all_reduce(self, axis: str, nbytes: float) -> float:
        group = {
            "tensor": self.layout.tp,
            "stage": self.layout.pp,
            "vocab": self.layout.pp * self.layout.tp,
            "data": self.layout.dp,
        }[axis]
        if group == 1:
            return 0.0
        link = self.links[axis]
        return (
            2 * (group - 1) / group * nbytes / link.bandwidth
            + 2 * math.ceil(math.log2(group)) * link.latency
        )


def _layer_weights(state: nnx.State, mesh, num_experts: int, slot: int) -> LayerWeights:
    """Slot `slot`'s leaves on one device, by when they are read."""
    sums = dict.fromkeys(("always", "moe_only", "dense_only", "experts"), 0) | {
        f"{k}_macs": 0 for k in ("always", "moe_only", "dense_only", "expert")
    }
    for path, shape, dtype, spec in param_leaves(state):
        if not path.startswith(f"layers.{slot}."):
            continue
        name = path.removeprefix(f"layers.{slot}.")
        nbytes = shard_bytes(mesh, shape, dtype, spec)
        kind = "always"
        if num_experts and name.removesuffix("_scale") in EXPERT_LEAVES:
            kind = "experts"
        elif name.startswith(MOE_ONLY):
            kind = "moe_only"
        elif name.startswith(DENSE_ONLY):
            kind = "dense_only"
        sums[kind] += nbytes
        # GEMM weights [stages, in, ...] (FP8 ones: 1 byte per element); norms and flags are
        # [stages, d], an FP8 weight's scales are read but multiply nothing.
        if len(shape) >= 3 and not name.endswith("_scale"):
            macs = nbytes // np.dtype(dtype).itemsize
            if kind == "experts":
                sums["expert_macs"] += macs // num_experts
            else:
                sums[f"{kind}_macs"] += macs
    return LayerWeights(**sums)


def _links(layout: Layout, hw: Hardware) -> dict[str, Link]:
    """The link each collective of the ring runs over: inter-node when any of its device
    groups spans nodes. Device (d, s, r) of the mesh is device (d * pp + s) * tp + r."""
    dp, pp, tp = layout.dp, layout.pp, layout.tp
    index = np.arange(layout.devices).reshape(dp, pp, tp)
    node = index // hw.devices_per_node

    def spans(groups: np.ndarray) -> bool:  # groups [n_groups, group_size] of node ids
        return bool(np.any(groups.min(axis=1) != groups.max(axis=1)))

    return {
        "tensor": hw.link(spans(node.reshape(-1, tp))),
        "stage": hw.link(spans(node.transpose(0, 2, 1).reshape(-1, pp))),
        "vocab": hw.link(spans(node.reshape(dp, pp * tp))),
        "data": hw.link(spans(node.transpose(1, 2, 0).reshape(-1, dp))),
        "next_stage": hw.link(bool(np.any(node[:, 1:] != node[:, :-1]))),
    }
