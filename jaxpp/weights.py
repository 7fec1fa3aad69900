"""Where each of our parameters comes from in a Hugging Face checkpoint: THE weight mapping, for
the dense and the mixture-of-experts families alike.

A source is read lazily: `Lazy(shape, take)` is one layer's value in OUR axis order, and
`take(index)` reads only the block `index` (a tuple of slices) of it from the files. Transposes
and reshapes are views of the memory-mapped tensor, so a device's shard (one tensor rank's
heads, one vocab range) costs the bytes of that shard, not of the tensor. Stacking (gate/up,
experts), KV-head replication and vocab padding are done block-wise on top.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from jaxpp.checkpoint import Checkpoint, CheckpointError
from jaxpp.config import ModelConfig

Index = tuple[slice, ...]


class Lazy(NamedTuple):
    """A tensor not read yet: its shape, and `take(index)` to read one block of it."""

    shape: tuple[int, ...]
    take: Callable[[Index], np.ndarray]


def _bounds(s: slice, n: int) -> tuple[int, int]:
    start, stop, step = s.indices(n)
    assert step == 1, "shards are contiguous blocks"
    return start, stop


def _stored(ckpt: Checkpoint, view: np.ndarray) -> Lazy:
    """`view` (a view of a tensor's memory map) read block by block."""
    return Lazy(view.shape, lambda index: ckpt.copy(view[index]))


def _zeros(shape: tuple[int, ...]) -> Lazy:
    """A parameter the layer does not have (the other kind of a mixed dense/MoE model)."""

    def take(index: Index) -> np.ndarray:
        return np.zeros(
            [len(range(*s.indices(n))) for s, n in zip(index, shape, strict=True)], np.float32
        )

    return Lazy(shape, take)


def _stack(parts: list[Lazy], axis: int) -> Lazy:
    """np.stack(parts, axis), reading only the parts and blocks asked for."""
    one = parts[0].shape
    axis = axis % (len(one) + 1)
    shape = (*one[:axis], len(parts), *one[axis:])

    def take(index: Index) -> np.ndarray:
        lo, hi = _bounds(index[axis], len(parts))
        rest = index[:axis] + index[axis + 1 :]
        return np.stack([parts[i].take(rest) for i in range(lo, hi)], axis=axis)

    return Lazy(shape, take)


def _repeat(source: Lazy, replicas: int, axis: int) -> Lazy:
    """np.repeat(source, replicas, axis): KV heads replicated so every tensor rank owns one."""
    if replicas == 1:
        return source
    shape = list(source.shape)
    shape[axis] *= replicas

    def take(index: Index) -> np.ndarray:
        lo, hi = _bounds(index[axis], shape[axis])
        first = lo // replicas
        inner = list(index)
        inner[axis] = slice(first, -(-hi // replicas))
        block = np.repeat(source.take(tuple(inner)), replicas, axis=axis)
        return np.take(block, range(lo - first * replicas, hi - first * replicas), axis=axis)

    return Lazy(tuple(shape), take)


def padded_rows(source: Lazy, rows: int) -> Lazy:
    """Vocab padding: zero rows past the real vocabulary (their logits are masked to -inf)."""
    real = source.shape[0]

    def take(index: Index) -> np.ndarray:
        lo, hi = _bounds(index[0], rows)
        block = source.take((slice(min(lo, real), min(hi, real)), *index[1:]))
        out = np.zeros((hi - lo, *block.shape[1:]), block.dtype)
        out[: block.shape[0]] = block
        return out

    return Lazy((rows, *source.shape[1:]), take)


# --- readers: (checkpoint, HF name, our shape of one layer) -> Lazy ----------------------------


def _checked(ckpt: Checkpoint, name: str, expected: tuple[int, ...]) -> np.ndarray:
    w = ckpt.view(name)
    if tuple(w.shape) != tuple(expected):
        raise CheckpointError(
            f"{ckpt.path_of(name)}: tensor {name!r} has shape {tuple(w.shape)}, "
            f"expected {tuple(expected)} from config.json"
        )
    return w


def _linear_in_out(ckpt: Checkpoint, name: str, shape: tuple[int, ...]) -> Lazy:
    """HF stores Linear weights [out, in]; we keep [in, *out] so that y = x @ W."""
    w = _checked(ckpt, name, (int(np.prod(shape[1:])), shape[0]))
    return _stored(ckpt, np.reshape(w.T, shape, copy=False))


def _linear_out_proj(ckpt: Checkpoint, name: str, shape: tuple[int, ...]) -> Lazy:
    """o_proj / down_proj: HF [out, in] -> ours [*in, out]."""
    w = _checked(ckpt, name, (shape[-1], int(np.prod(shape[:-1]))))
    return _stored(ckpt, np.reshape(w.T, shape, copy=False))


def _vector(ckpt: Checkpoint, name: str, shape: tuple[int, ...]) -> Lazy:
    w = _checked(ckpt, name, (int(np.prod(shape)),))
    return _stored(ckpt, np.reshape(w, shape, copy=False))


def _repeat_kv(read: Callable, replicas: int, axis: int) -> Callable:
    """A reader of KV heads replicated `replicas` times along our `axis`."""

    def repeated(ckpt: Checkpoint, name: str, shape: tuple[int, ...]) -> Lazy:
        stored = list(shape)
        stored[axis] //= replicas
        return _repeat(read(ckpt, name, tuple(stored)), replicas, axis)

    return repeated


def _gate_up(read: Callable) -> Callable:
    """Reader of our fused [.., 2, F] gate/up tensor: HF's `gate_proj` name is the source's
    template, its `up_proj` twin is read next to it."""

    def both(ckpt: Checkpoint, gate_name: str, shape: tuple[int, ...]) -> Lazy:
        one = shape[:-2] + shape[-1:]
        up_name = gate_name.replace("gate_proj", "up_proj")
        return _stack([read(ckpt, gate_name, one), read(ckpt, up_name, one)], axis=-2)

    return both


def _layer_of(name: str) -> int:
    return int(name.split(".")[2])  # "model.layers.{l}. ..."


def _only(cfg: ModelConfig, moe: bool, read: Callable) -> Callable:
    """A reader for MoE (or dense) layers only: zeros in the other kind of layer."""

    def guarded(ckpt: Checkpoint, name: str, shape: tuple[int, ...]) -> Lazy:
        if cfg.is_moe_layer[_layer_of(name)] != moe:
            return _zeros(shape)
        return read(ckpt, name, shape)

    return guarded


def _experts(cfg: ModelConfig, which: str) -> Callable:
    """Our [E, in, out] expert weights from per-expert or fused HF tensors."""

    def read(ckpt: Checkpoint, prefix: str, shape: tuple[int, ...]) -> Lazy:
        f, e = cfg.moe_intermediate_size, cfg.num_experts
        if ckpt.has(f"{prefix}.gate_up_proj") or ckpt.has(f"{prefix}.down_proj"):
            if which == "down_proj":
                name = f"{prefix}.down_proj"
                w = _checked(ckpt, name, (e, shape[2], f))  # [E, D, F]
                return _stored(ckpt, np.swapaxes(w, 1, 2))
            name = f"{prefix}.gate_up_proj"
            w = _checked(ckpt, name, (e, 2 * f, shape[1]))  # [E, 2F, D], gate rows first
            half = w[:, :f] if which == "gate_proj" else w[:, f:]
            return _stored(ckpt, np.swapaxes(half, 1, 2))
        one = shape[1:]
        reader = _linear_out_proj if which == "down_proj" else _linear_in_out
        return _stack([reader(ckpt, f"{prefix}.{i}.{which}.weight", one) for i in range(e)], 0)

    return _only(cfg, True, read)


def _moe_sources(cfg: ModelConfig, p: str) -> dict[str, tuple[str, Callable]]:
    src = {
        "mlp.router": (p + "mlp.gate.weight", _only(cfg, True, _linear_in_out)),
        "mlp.gate_proj": (p + "mlp.experts", _experts(cfg, "gate_proj")),
        "mlp.up_proj": (p + "mlp.experts", _experts(cfg, "up_proj")),
        "mlp.down_proj": (p + "mlp.experts", _experts(cfg, "down_proj")),
    }
    if cfg.shared_expert_intermediate_size:
        s = p + "mlp.shared_expert."
        src["mlp.shared.gate_up_proj"] = (
            s + "gate_proj.weight",
            _gate_up(_only(cfg, True, _linear_in_out)),
        )
        src["mlp.shared.down_proj"] = (s + "down_proj.weight", _only(cfg, True, _linear_out_proj))
        src["mlp.shared_gate"] = (
            p + "mlp.shared_expert_gate.weight",
            _only(cfg, True, _linear_in_out),
        )
    if not all(cfg.is_moe_layer):
        src["mlp.dense.gate_up_proj"] = (
            p + "mlp.gate_proj.weight",
            _gate_up(_only(cfg, False, _linear_in_out)),
        )
        src["mlp.dense.down_proj"] = (
            p + "mlp.down_proj.weight",
            _only(cfg, False, _linear_out_proj),
        )
    return src


def layer_sources(cfg: ModelConfig, kv_replicas: int) -> dict[str, tuple[str, Callable]]:
    """Our per-slot layer parameter path -> (HF name template with {l}, reader)."""
    p = "model.layers.{l}."
    src: dict[str, tuple[str, Callable]] = {
        "input_norm.weight": (p + "input_layernorm.weight", _vector),
        "post_attn_norm.weight": (p + "post_attention_layernorm.weight", _vector),
        "attn.q_proj": (p + "self_attn.q_proj.weight", _linear_in_out),
        "attn.k_proj": (p + "self_attn.k_proj.weight", _repeat_kv(_linear_in_out, kv_replicas, 1)),
        "attn.v_proj": (p + "self_attn.v_proj.weight", _repeat_kv(_linear_in_out, kv_replicas, 1)),
        "attn.o_proj": (p + "self_attn.o_proj.weight", _linear_out_proj),
    }
    if cfg.qkv_bias:
        src["attn.q_bias"] = (p + "self_attn.q_proj.bias", _vector)
        src["attn.k_bias"] = (p + "self_attn.k_proj.bias", _repeat_kv(_vector, kv_replicas, 0))
        src["attn.v_bias"] = (p + "self_attn.v_proj.bias", _repeat_kv(_vector, kv_replicas, 0))
    if cfg.o_bias:
        src["attn.o_bias"] = (p + "self_attn.o_proj.bias", _vector)
    if cfg.qk_norm:
        src["attn.q_norm.weight"] = (p + "self_attn.q_norm.weight", _vector)
        src["attn.k_norm.weight"] = (p + "self_attn.k_norm.weight", _vector)
    if cfg.num_experts:
        src.update(_moe_sources(cfg, p))
    else:
        src["mlp.gate_up_proj"] = (p + "mlp.gate_proj.weight", _gate_up(_linear_in_out))
        src["mlp.down_proj"] = (p + "mlp.down_proj.weight", _linear_out_proj)
        if cfg.mlp_bias:
            src["mlp.gate_up_bias"] = (p + "mlp.gate_proj.bias", _gate_up(_vector))
            src["mlp.down_bias"] = (p + "mlp.down_proj.bias", _vector)
    return src


def vocab_table(ckpt: Checkpoint, cfg: ModelConfig, name: str, rows: int) -> Lazy:
    """The embedding or LM head [vocab, hidden], padded to `rows`."""
    w = _checked(ckpt, name, (cfg.vocab_size, cfg.hidden_size))
    return padded_rows(_stored(ckpt, w), rows)


def final_norm(ckpt: Checkpoint, shape: tuple[int, ...]) -> Lazy:
    return _vector(ckpt, "model.norm.weight", shape)


def validate(cfg: ModelConfig, ckpt: Checkpoint, sources: dict) -> None:
    """Every tensor the model needs is present, before any weight is read.

    MoE feed-forward tensors are left to their readers: which names exist depends on the
    checkpoint's expert layout (per expert or fused) and on which layers are MoE.
    """
    needed = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        needed.append("lm_head.weight")
    for path, (template, _) in sources.items():
        if cfg.num_experts and path.startswith("mlp."):
            continue
        for layer in range(cfg.num_layers):
            needed.append(template.format(l=layer))
            if "gate_proj" in template:  # a fused gate/up source reads the up_proj twin too
                needed.append(template.replace("gate_proj", "up_proj").format(l=layer))
    for name in needed:
        ckpt.require(name)
