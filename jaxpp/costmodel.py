"""Time of one ring tick on given hardware: what each device reads, computes and sends.

The ring (pipeline.py) runs, every tick, on every device:

1. the vocab-parallel embedding of the entering tokens: one psum over ("stage", "tensor") of
   [w + C, D];
2. its stage's filled layer slots over the micro-batch it serves (w decode rows, plus C chunk
   rows when a prompt chunk rides along), each layer two psums over "tensor" of [n, D]; empty
   slots and idle stages are skipped;
3. a psum over "stage" of the last stage's [w + 1, D] output, then its vocab shard of the LM head
   over those rows and the sharded argmax (a pmax and a pmin over the vocab devices);
4. a ppermute of [mb + C, D] activations to the next stage.

Each compute part costs max(bytes read / bandwidth, FLOPs / peak), taken separately for the
weight GEMMs and for attention (whose bytes are the KV blocks it reads, in KV_BLOCK positions as
far as the live keys go, `rows_per_read` rows at a time: model.attend_cache). A collective over
g devices costs 2 (g - 1) / g x bytes / link bandwidth + 2 ceil(log2 g) x link latency (ring
bandwidth, tree latency); a ppermute bytes / bandwidth + latency. A group that spans nodes uses
the inter-node link. The bytes come from the abstract state's shard shapes (layout.py), never
from a parameter-count formula.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from flax import nnx

from jaxpp.hardware import Hardware, Link
from jaxpp.layout import Layout, kv_bytes_per_slot, param_leaves, shard_bytes
from jaxpp.model import KV_BLOCK
from jaxpp.pipeline import PipelineShape, rows_per_read

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
    compute: float  # the slowest stage's layers
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
        self.weights = _layer_weights(state, mesh, cfg.num_experts)
        head_leaf = "embed" if cfg.tie_word_embeddings else "lm_head"
        head = next(leaf for leaf in param_leaves(state) if leaf[0] == head_leaf)
        self.head_bytes = shard_bytes(mesh, head[1], head[2], head[3])
        self.head_macs = self.head_bytes // self.itemsize
        # KV bytes per cached position of one layer on one device, off the cache's shardings.
        per_slot = kv_bytes_per_slot(layout, shape.cache_len)
        self.kv_position_bytes = per_slot / (layout.layers_per_stage * shape.cache_len)
        self.attention_flops = 4 * (cfg.num_heads // layout.tp) * cfg.head_dim  # per query-key
        self.rows_per_read = rows_per_read(hw.platform, shape.rows)
        self.hidden_bytes = cfg.hidden_size * self.itemsize
        self.stage_layers = [
            tuple(
                (cfg.is_moe_layer[layer], cfg.sliding_windows[layer])
                for layer in layout.grid[s]
                if layer >= 0
            )
            for s in range(layout.pp)
        ]
        self.links = _links(layout, hw)

    # --- per stage -------------------------------------------------------------------------

    def stage_seconds(
        self, stage: int, width: int, keys: tuple[int, ...], chunk_start: int | None
    ) -> float:
        """Stage `stage`'s layers over `width` decode rows whose caches hold `keys` positions
        (0 for a dead row) and, unless chunk_start is None, a chunk starting at chunk_start."""
        return self._stage_seconds(self.stage_layers[stage], width, keys, chunk_start)

    @functools.lru_cache(maxsize=1 << 16)  # noqa: B019 - one model per plan, kept with it
    def _stage_seconds(self, layers, width, keys, chunk_start) -> float:
        chunk = self.shape.chunk if chunk_start is not None else 0
        tokens = width + chunk
        seconds = 0.0
        for is_moe, window in layers:
            weight_bytes, macs = self._layer_gemms(is_moe, tokens)
            kv_positions, score_keys = self._attention_reads(width, keys, chunk_start, window)
            # The positions read, and this tick's keys and values written.
            kv_bytes = (kv_positions + tokens) * self.kv_position_bytes
            seconds += max(weight_bytes / self.bandwidth, 2 * macs / self.peak)
            seconds += max(kv_bytes / self.bandwidth, score_keys * self.attention_flops / self.peak)
            seconds += 2 * self._all_reduce("tensor", tokens * self.hidden_bytes)
        return seconds

    def _layer_gemms(self, is_moe: bool, tokens: int) -> tuple[float, float]:
        w = self.weights
        weight_bytes, macs = float(w.always), float(w.always_macs * tokens)
        if not is_moe:
            return weight_bytes + w.dense_only, macs + w.dense_only_macs * tokens
        cfg = self.layout.config
        experts, chosen = cfg.num_experts, cfg.num_experts_per_tok
        # Experts some token routes to, routing uniform: each expert is missed by all tokens
        # with probability (1 - k/E)^tokens.
        touched = experts * (1 - (1 - chosen / experts) ** tokens)
        weight_bytes += w.moe_only + w.experts * touched / experts
        macs += (w.moe_only_macs + w.expert_macs * chosen) * tokens
        return weight_bytes, macs

    def _attention_reads(
        self, width: int, keys: tuple[int, ...], chunk_start: int | None, window: int
    ) -> tuple[int, int]:
        """(cached positions read, query-key scores computed) of one layer: the decode rows in
        groups of rows_per_read, each as far as its longest row, from the first block inside
        the window; the chunk over its row's prefix, and causally over itself (all C x C)."""
        read = scores = 0
        if width:
            group = math.gcd(width, self.rows_per_read)
            for start in range(0, width, group):
                rows = keys[start : start + group]
                blocks = _blocks(max(rows), window)
                read += blocks * KV_BLOCK * group
                scores += blocks * KV_BLOCK * group + group  # + each row's own key
        if chunk_start is not None:
            chunk = self.shape.chunk
            blocks = _blocks(chunk_start, window)
            read += blocks * KV_BLOCK
            scores += chunk * (blocks * KV_BLOCK + chunk)
        return read, scores

    # --- the whole tick ----------------------------------------------------------------------

    def tick(self, stage_seconds: float, width: int) -> TickCost:
        """A tick whose slowest stage takes `stage_seconds`, computing `width` decode rows."""
        chunk, rows = self.shape.chunk, self.shape.rows
        head_rows = width + 1
        head = max(
            self.head_bytes / self.bandwidth, 2 * self.head_macs * head_rows / self.peak
        ) + 2 * self._all_reduce("vocab", 0)  # the sharded argmax: a pmax and a pmin
        collectives = (
            self._all_reduce("vocab", (width + chunk) * self.hidden_bytes)
            + self._all_reduce("stage", head_rows * self.hidden_bytes)
            + 4 * self._all_reduce("data", 0)  # busy and chunk counts, the loop's condition
        )
        transfer = 0.0
        if self.layout.pp > 1:
            link = self.links["next_stage"]
            transfer = (rows + chunk) * self.hidden_bytes / link.bandwidth + link.latency
        return TickCost(
            stage_seconds + head + collectives + transfer,
            stage_seconds,
            head,
            transfer,
            collectives,
        )

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


def _blocks(keys: int, window: int) -> int:
    """KV blocks attend_cache reads for a row with `keys` cached positions."""
    last = -(-keys // KV_BLOCK)
    first = max(keys - window + 1, 0) // KV_BLOCK if window else 0
    return max(last - first, 0)


def _layer_weights(state: nnx.State, mesh, num_experts: int) -> LayerWeights:
    """Slot 0's leaves (every slot has the same) on one device, by when they are read."""
    sums = dict.fromkeys(("always", "moe_only", "dense_only", "experts"), 0) | {
        f"{k}_macs": 0 for k in ("always", "moe_only", "dense_only", "expert")
    }
    for path, shape, dtype, spec in param_leaves(state):
        if not path.startswith("layers.0."):
            continue
        name = path.removeprefix("layers.0.")
        nbytes = shard_bytes(mesh, shape, dtype, spec)
        kind = "always"
        if num_experts and name in EXPERT_LEAVES:
            kind = "experts"
        elif name.startswith(MOE_ONLY):
            kind = "moe_only"
        elif name.startswith(DENSE_ONLY):
            kind = "dense_only"
        sums[kind] += nbytes
        if len(shape) >= 3:  # GEMM weights [stages, in, ...]; norms and flags are [stages, d]
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
