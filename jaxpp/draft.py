"""A draft model's proposals for speculative decoding (`speculative_config={"model": DIR,
"num_speculative_tokens": k}`, vLLM's method "draft_model").

A small model with the target's vocabulary (any supported family) proposes each verifying
row's k drafts: its greedy continuation of the row's text. It runs where prompt lookup runs, at
the ring's entry, inside the forward program, in place of `speculation.propose`; the drafts
then ride the ring and are verified exactly as prompt lookup's are (speculation.py), so
greedy and seeded outputs are the target's whatever the draft proposes.

Placement over the stages: every stage holds ALL the draft's layers (its layer slots are
stacked [stages, ...] like the target's, with the same layer in every stage's slot: the
engine's own loader and shardings, a grid that repeats instead of partitioning). The entry is
computed on every stage today (each device works out the entering tokens from replicated
state, pipeline.py), and the draft runs where proposals are made, so each stage runs it on its
own copy with no transfer between stages; it is small (a 1-layer 256-wide draft of the demo
model is 1.7 M parameters, the embedding and head vocab-parallel like the target's, so split
over the stage and tensor devices). Tensor parallelism splits its heads and MLP columns as it
splits the target's.

No KV cache: each tick the draft reads the row's last `draft_window` (W) tokens (the row's
pages' tokens through its block table, `Ring.page_tokens`, then its next token: the text
prompt lookup searches) at their real positions, dense causal attention over that window,
then k - 1 incremental steps, each one new token attending over the window and the drafts
before it (the window's keys and values kept inside the program only). So there is no second
KV pool to size, nothing to rewind when a draft is rejected and nothing to keep in step with
preemption or the prefix cache; the price is W + k - 1 draft token-forwards per drafting row
per tick, where k passes over the whole window would cost k * W. Only the rows that have
draft slots run it: at most `disable_by_batch_size` per micro-batch (the scheduler verifies
only while that many requests decode), picked on the device, so a tick costs the same at any
max_num_seqs. A row that the cap leaves out gets no drafts (still exact).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpp.attention import MASKED
from jaxpp.config import ModelConfig, SpeculativeConfig
from jaxpp.layout import Layout, abstract_model, stored_kv_heads
from jaxpp.loading import load_params
from jaxpp.model import (
    embed_lookup,
    local_logits,
    merge_slots,
    param_specs,
    rope_inv_freq,
    rope_tables,
    vocab_shard_index,
)
from jaxpp.sampling import _sharded_argmax


@dataclasses.dataclass(frozen=True, eq=False)
class DraftModel:
    """What the forward program needs of the draft besides its parameters (its state)."""

    graphdef: object
    layer_graphdef: object
    specs: object  # the state's PartitionSpecs
    inv_freq: np.ndarray
    window: int  # W: tokens of its text a row's draft reads
    rows: int | None  # rows of a micro-batch drafted for at most (None: all)
    vocab_size: int

    def propose(self, state: nnx.State, text: jax.Array, position: jax.Array,
                limit: jax.Array, *, k: int) -> jax.Array:  # fmt: skip
        """i32 [R, k]: the drafts of rows whose text is `text` [R, L] (its next token at
        `position` [R]), at most `limit` [R] each, -1 past them (speculation.propose's
        contract): the draft model's k greedy tokens after the row's last W."""
        R, L = text.shape
        cap = min(self.rows or R, R)
        wanted = limit > 0
        picked = jnp.nonzero(wanted, size=cap, fill_value=0)[0]
        real = jnp.arange(cap) < jnp.sum(wanted)
        W = self.window
        # Positions of the window (the last ending at the next token), then of drafts 0..k-2.
        at = position[picked][:, None] + jnp.arange(W + k - 1) - (W - 1)
        window = jnp.take_along_axis(text[picked], jnp.clip(at[:, :W], 0, L - 1), axis=1)
        drafted = self._greedy(state, jnp.where(at[:, :W] >= 0, window, 0), at, k)
        drafted = jnp.where(jnp.arange(k) < limit[picked][:, None], drafted, -1)
        out = jnp.full((R, k), -1, jnp.int32)
        return out.at[jnp.where(real, picked, R)].set(drafted, mode="drop")

    def _greedy(self, state: nnx.State, window: jax.Array, at: jax.Array, k: int) -> jax.Array:
        """i32 [B, k]: the greedy tokens after each row's `window` [B, W] of tokens, the keys
        at positions `at` [B, W + k - 1] (< 0: none)."""
        model, layers = merge_slots(self.graphdef, self.layer_graphdef, state)
        width = model.embed.shape[0]  # this device's vocab shard
        ids = vocab_shard_index() * width + jnp.arange(width)
        caches = [None] * len(layers)
        x = embed_lookup(model.embed[...], window)
        start, drafts = 0, []
        for step in range(k):
            x, caches = self._layers(layers, x, at, start, caches)
            drafts.append(_sharded_argmax(local_logits(model, x[:, -1], self.vocab_size), ids))
            start += x.shape[1]
            if step + 1 < k:
                x = embed_lookup(model.embed[...], drafts[-1][:, None])
        return jnp.stack(drafts, axis=1)

    def _layers(self, layers: list, x: jax.Array, at: jax.Array, start: int, caches: list):
        """The draft's layers over x [B, n, D], the tokens at `at[:, start:start + n]`; each
        layer's keys and values go into its cache [B, W + k - 1, Hkv, Dh] at `start`, and
        every token attends to the cached ones at or before its position (in its window)."""
        B, n = x.shape[:2]
        q_at = at[:, start : start + n]
        cos, sin = rope_tables(jnp.maximum(q_at, 0), self.inv_freq, x.dtype)
        before = (at[:, None, :] <= q_at[:, :, None]) & (at[:, None, :] >= 0)  # [B, n, S]
        for i, layer in enumerate(layers):
            q, key, value = layer.attn.qkv(layer.input_norm(x), cos, sin)
            if caches[i] is None:
                shape = (B, at.shape[1]) + key.shape[2:]
                caches[i] = (jnp.zeros(shape, key.dtype), jnp.zeros(shape, value.dtype))
            kc, vc = caches[i]
            kc, vc = kc.at[:, start : start + n].set(key), vc.at[:, start : start + n].set(value)
            caches[i] = (kc, vc)
            window = layer.window[...]
            visible = before & ((window == 0) | (at[:, None, :] > q_at[:, :, None] - window))
            y = x + layer.attn.out(_attend(q, kc, vc, visible))
            h = layer.post_attn_norm(y)
            x = y + layer.mlp(h.reshape(1, B * n, -1)).reshape(B, n, -1)
        return x, caches


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
    """Dense attention of q [B, n, Hq, Dh] over k, v [B, S, Hkv, Dh] where visible [B, n, S]
    (GQA: query head j reads KV head j // (Hq / Hkv)); softmax in float32."""
    B, n, Hq, Dh = q.shape
    Hkv = k.shape[2]
    grouped = q.reshape(B, n, Hkv, Hq // Hkv, Dh)
    scores = jnp.einsum("bnhgd,bshd->bhgns", grouped, k).astype(jnp.float32) * Dh**-0.5
    scores = jnp.where(visible[:, None, None], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhgns,bshd->bnhgd", probs, v).reshape(B, n, Hq, Dh)


def load_draft(speculative: SpeculativeConfig, target: Layout, mesh: jax.sharding.Mesh
               ) -> tuple[DraftModel, nnx.State]:  # fmt: skip
    """The draft model of `speculative` on `mesh`, in the target's dtype, every layer on every
    stage; refused with the reason when it cannot draft for the target."""
    model_dir = Path(speculative.model)
    name = f"speculative_config model={speculative.model!r}"
    try:
        cfg = ModelConfig.from_dir(model_dir)
        kv_heads = stored_kv_heads(cfg, target.tp)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    if cfg.vocab_size != target.config.vocab_size:
        raise ValueError(
            f"{name} has vocab_size={cfg.vocab_size} but the model has "
            f"vocab_size={target.config.vocab_size}: a draft model must share its tokenizer"
        )
    grid = np.tile(np.arange(cfg.num_layers), (target.pp, 1))  # every layer on every stage
    layout = dataclasses.replace(
        target, config=cfg, partition=[cfg.num_layers] * target.pp, grid=grid, kv_heads=kv_heads
    )
    abstract = abstract_model(layout)
    graphdef, abstract_state = nnx.split(abstract)
    layer_graphdef, _ = nnx.split(abstract.layers[0])
    replicas = kv_heads // cfg.num_kv_heads
    state, _ = load_params(model_dir, abstract_state, cfg, mesh, grid, replicas, layout.windows)
    draft = DraftModel(
        graphdef=graphdef,
        layer_graphdef=layer_graphdef,
        specs=param_specs(state),
        inv_freq=rope_inv_freq(cfg),
        window=speculative.draft_window,
        rows=speculative.disable_by_batch_size,
        vocab_size=cfg.vocab_size,
    )
    return draft, state
