"""Where each of our parameters comes from in a Hugging Face checkpoint: THE weight mapping, for
the dense and the mixture-of-experts families alike.

A source is read lazily: `Lazy(shape, take)` is one layer's value in OUR axis order, and
`take(index)` reads only the block `index` (a tuple of slices) of it from the files. Transposes
and reshapes are views of the memory-mapped tensor, so a device's shard (one tensor rank's
heads, one vocab range) costs the bytes of that shard, not of the tensor. Stacking (gate/up,
experts), KV-head replication and vocab padding are done block-wise on top.

A linear weight is read as one of three PARTS: "value" (the weight as floats: dequantized when
the file stores it in FP8), "fp8" (the stored float8_e4m3fn weight) and "scale" (its scale in
the engine's layout, fp8.py: [*grid, *out], one per output channel and input run). Stacking
and KV-head replication act on batch and output axes only, so the same readers compose the
weight and its scale alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import ml_dtypes
import numpy as np

from jaxpp.checkpoint import Checkpoint, CheckpointError
from jaxpp.config import ModelConfig
from jaxpp.quantization import FP8Scheme

Index = tuple[slice, ...]
FP8_DTYPE = np.dtype(ml_dtypes.float8_e4m3fn)
# Our layer parameters that are linear weights a checkpoint may store in FP8 (the routers stay
# in the model's dtype, as in vLLM: they are small and decide which experts run).
FP8_LINEARS = frozenset(
    {
        "attn.q_proj",
        "attn.k_proj",
        "attn.v_proj",
        "attn.o_proj",
        "mlp.gate_up_proj",
        "mlp.down_proj",  # a dense model's, or the routed experts' [E, F, D]
        "mlp.gate_proj",  # routed experts [E, D, F]
        "mlp.up_proj",
        "mlp.shared.gate_up_proj",
        "mlp.shared.down_proj",
        "mlp.dense.gate_up_proj",
        "mlp.dense.down_proj",
    }
)


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


def _array(values: np.ndarray) -> Lazy:
    """A small array already in memory (a weight's scales)."""
    return Lazy(values.shape, lambda index: values[index])


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


def _linear(scheme: FP8Scheme | None, out_proj: bool) -> Callable:
    """The reader of a Linear weight's parts: HF stores it [out, in]; we keep [in, *out] (q, k,
    v, gate, up: y = x @ W) or, for o_proj and down_proj, [*in, out]."""

    def read(ckpt: Checkpoint, name: str, shape: tuple[int, ...], part: str = "value") -> Lazy:
        n_in = len(shape) - 1 if out_proj else 1
        out = math.prod(shape[n_in:])
        if part == "scale":  # shape: the scale's, [*grid, *out]
            w = ckpt.view(name)
            _fp8_only(ckpt, name, w, scheme)
            if w.ndim != 2 or w.shape[0] != out:
                raise CheckpointError(
                    f"{ckpt.path_of(name)}: tensor {name!r} has shape {tuple(w.shape)}, "
                    f"expected ({out}, ...) from config.json"
                )
            return _array(_grid_scales(ckpt, name, scheme, shape[:n_in], shape[n_in:]))
        w = _checked(ckpt, name, (out, math.prod(shape[:n_in])))
        view = np.reshape(w.T, shape, copy=False)
        if part == "fp8":
            _fp8_only(ckpt, name, w, scheme)
            return _stored(ckpt, view)
        if w.dtype != FP8_DTYPE:
            return _stored(ckpt, view)
        # An FP8 tensor read as floats (a slot that keeps this weight in the model dtype, or a
        # router): each block multiplied by its scales.
        _fp8_only(ckpt, name, w, scheme)
        scales = _ScaleTable(ckpt, name, scheme)

        def take(index: Index) -> np.ndarray:
            ins = _flat(index[:n_in], shape[:n_in])
            outs = _flat(index[n_in:], shape[n_in:])
            block = ckpt.copy(view[index]).astype(np.float32)
            return block * scales.at(outs, ins).T.reshape(block.shape)

        return Lazy(shape, take)

    return read


def _fp8_only(ckpt: Checkpoint, name: str, w: np.ndarray, scheme: FP8Scheme | None) -> None:
    """A weight read as FP8 must be stored as float8_e4m3fn, under a quantization_config."""
    if scheme is None or scheme.method == "online":
        raise CheckpointError(
            f"{ckpt.path_of(name)}: tensor {name!r} is {w.dtype}, but config.json has no FP8 "
            "quantization_config to read its scales from"
        )
    if w.dtype != FP8_DTYPE:
        raise CheckpointError(
            f"{ckpt.path_of(name)}: tensor {name!r} is {w.dtype}, but config.json's "
            f"quantization_config ({scheme.method}) says this module is float8_e4m3fn "
            "(it is not in its ignore list)"
        )


class _ScaleTable:
    """The scale tensor beside an FP8 weight [out, in], as [rows, columns] float32, its shape
    checked against the scheme: (1, 1) per tensor, (out, 1) per channel, the block grid."""

    def __init__(self, ckpt: Checkpoint, name: str, scheme: FP8Scheme):
        out, inputs = ckpt.view(name).shape
        scale_name = name.removesuffix("weight") + scheme.scale_name
        stored = ckpt.view(scale_name)
        self.block = scheme.weight_block if scheme.strategy == "block" else None
        if self.block:
            expected = (-(-out // self.block[0]), -(-inputs // self.block[1]))
        else:
            expected = (out if scheme.strategy == "channel" else 1, 1)
        values = np.asarray(ckpt.copy(stored), np.float32)
        if values.size != math.prod(expected) or (values.ndim == 2 and values.shape != expected):
            raise CheckpointError(
                f"{ckpt.path_of(scale_name)}: tensor {scale_name!r} has shape "
                f"{tuple(stored.shape)}, expected {expected} for {scheme.strategy} scales of a "
                f"{out} x {inputs} weight ({scheme.method})"
            )
        self.values = values.reshape(expected)

    def at(self, outs: np.ndarray, ins: np.ndarray) -> np.ndarray:
        """[len(outs), len(ins)]: the scale of each (output, input) of the HF weight."""
        rows, cols = outs, ins
        if self.block:
            rows, cols = outs // self.block[0], ins // self.block[1]
        rows = rows if self.values.shape[0] > 1 else np.zeros_like(outs)
        cols = cols if self.values.shape[1] > 1 else np.zeros_like(ins)
        return self.values[np.ix_(rows, cols)]


def _flat(index: Index, sizes: tuple[int, ...]) -> np.ndarray:
    """Row-major flat positions of the block `index` of an array of `sizes`: the HF input (or
    output) index of each of our input (or output) positions."""
    flat = np.zeros((), np.int64)
    for s, n in zip(index, sizes, strict=True):
        lo, hi = _bounds(s, n)
        flat = np.add.outer(flat * n, np.arange(lo, hi))
    return flat.ravel()


def _grid_scales(ckpt, name, scheme, grid: tuple[int, ...], out_shape: tuple[int, ...]):
    """The scales of weight `name` in our layout [*grid, *out_shape] (fp8.FP8Storage.
    scale_grid: the leading input axes whole or 1, runs of the last): each cell's first
    input's scale, per output channel."""
    table = _ScaleTable(ckpt, name, scheme)
    inputs = ckpt.view(name).shape[1]
    if math.prod(grid) == 1:
        firsts = np.zeros(1, np.int64)
    else:  # our input axes: the grid's leading ones, then the last one, in runs
        leading = math.prod(grid[:-1])
        last = inputs // leading
        run = last // grid[-1]
        firsts = np.add.outer(np.arange(leading) * last, np.arange(grid[-1]) * run).ravel()
    per_cell = table.at(np.arange(math.prod(out_shape)), firsts)  # [out, cells]
    return np.ascontiguousarray(per_cell.T.reshape(*grid, *out_shape))


def _vector(ckpt: Checkpoint, name: str, shape: tuple[int, ...], part: str = "value") -> Lazy:
    w = _checked(ckpt, name, (int(np.prod(shape)),))
    return _stored(ckpt, np.reshape(w, shape, copy=False))


def _repeat_kv(read: Callable, replicas: int, axis: int) -> Callable:
    """A reader of KV heads replicated `replicas` times along our `axis`."""

    def repeated(ckpt: Checkpoint, name: str, shape: tuple[int, ...], part="value") -> Lazy:
        stored = list(shape)
        stored[axis] //= replicas
        return _repeat(read(ckpt, name, tuple(stored), part), replicas, axis)

    return repeated


def _gate_up(read: Callable) -> Callable:
    """Reader of our fused [.., 2, F] gate/up tensor: HF's `gate_proj` name is the source's
    template, its `up_proj` twin is read next to it."""

    def both(ckpt: Checkpoint, gate_name: str, shape: tuple[int, ...], part="value") -> Lazy:
        one = shape[:-2] + shape[-1:]
        up_name = gate_name.replace("gate_proj", "up_proj")
        return _stack([read(ckpt, gate_name, one, part), read(ckpt, up_name, one, part)], axis=-2)

    return both


def _layer_of(name: str) -> int:
    return int(name.split(".")[2])  # "model.layers.{l}. ..."


def _only(cfg: ModelConfig, moe: bool, read: Callable) -> Callable:
    """A reader for MoE (or dense) layers only: zeros in the other kind of layer."""

    def guarded(ckpt: Checkpoint, name: str, shape: tuple[int, ...], part="value") -> Lazy:
        if cfg.is_moe_layer[_layer_of(name)] != moe:
            return _zeros(shape)
        return read(ckpt, name, shape, part)

    return guarded


def _experts(cfg: ModelConfig, which: str) -> Callable:
    """Our [E, in, out] expert weights from per-expert or fused HF tensors."""

    def read(ckpt: Checkpoint, prefix: str, shape: tuple[int, ...], part="value") -> Lazy:
        f, e = cfg.moe_intermediate_size, cfg.num_experts
        if ckpt.has(f"{prefix}.gate_up_proj") or ckpt.has(f"{prefix}.down_proj"):
            name = f"{prefix}.{'down_proj' if which == 'down_proj' else 'gate_up_proj'}"
            if part != "value" or ckpt.view(name).dtype == FP8_DTYPE:
                raise CheckpointError(
                    f"{ckpt.path_of(name)}: FP8 experts in the fused layout ({name!r}) are not "
                    "supported; jaxpp reads FP8 experts stored one tensor per expert"
                )
            if which == "down_proj":
                w = _checked(ckpt, name, (e, shape[2], f))  # [E, D, F]
                return _stored(ckpt, np.swapaxes(w, 1, 2))
            w = _checked(ckpt, name, (e, 2 * f, shape[1]))  # [E, 2F, D], gate rows first
            half = w[:, :f] if which == "gate_proj" else w[:, f:]
            return _stored(ckpt, np.swapaxes(half, 1, 2))
        one = shape[1:]
        reader = _linear(cfg.quantization, out_proj=which == "down_proj")
        names = [f"{prefix}.{i}.{which}.weight" for i in range(e)]
        return _stack([reader(ckpt, name, one, part) for name in names], 0)

    return _only(cfg, True, read)


def _moe_sources(cfg: ModelConfig, p: str) -> dict[str, tuple[str, Callable]]:
    in_out, out_proj = _linear(cfg.quantization, False), _linear(cfg.quantization, True)
    src = {
        "mlp.router": (p + "mlp.gate.weight", _only(cfg, True, in_out)),
        "mlp.gate_proj": (p + "mlp.experts", _experts(cfg, "gate_proj")),
        "mlp.up_proj": (p + "mlp.experts", _experts(cfg, "up_proj")),
        "mlp.down_proj": (p + "mlp.experts", _experts(cfg, "down_proj")),
    }
    if cfg.shared_expert_intermediate_size:
        s = p + "mlp.shared_expert."
        src["mlp.shared.gate_up_proj"] = (
            s + "gate_proj.weight",
            _gate_up(_only(cfg, True, in_out)),
        )
        src["mlp.shared.down_proj"] = (s + "down_proj.weight", _only(cfg, True, out_proj))
        src["mlp.shared_gate"] = (
            p + "mlp.shared_expert_gate.weight",
            _only(cfg, True, in_out),
        )
    if not all(cfg.is_moe_layer):
        src["mlp.dense.gate_up_proj"] = (
            p + "mlp.gate_proj.weight",
            _gate_up(_only(cfg, False, in_out)),
        )
        src["mlp.dense.down_proj"] = (p + "mlp.down_proj.weight", _only(cfg, False, out_proj))
    return src


def layer_sources(cfg: ModelConfig, kv_replicas: int) -> dict[str, tuple[str, Callable]]:
    """Our per-slot layer parameter path -> (HF name template with {l}, reader)."""
    p = "model.layers.{l}."
    in_out, out_proj = _linear(cfg.quantization, False), _linear(cfg.quantization, True)
    src: dict[str, tuple[str, Callable]] = {
        "input_norm.weight": (p + "input_layernorm.weight", _vector),
        "post_attn_norm.weight": (p + "post_attention_layernorm.weight", _vector),
        "attn.q_proj": (p + "self_attn.q_proj.weight", in_out),
        "attn.k_proj": (p + "self_attn.k_proj.weight", _repeat_kv(in_out, kv_replicas, 1)),
        "attn.v_proj": (p + "self_attn.v_proj.weight", _repeat_kv(in_out, kv_replicas, 1)),
        "attn.o_proj": (p + "self_attn.o_proj.weight", out_proj),
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
        src["mlp.gate_up_proj"] = (p + "mlp.gate_proj.weight", _gate_up(in_out))
        src["mlp.down_proj"] = (p + "mlp.down_proj.weight", out_proj)
        if cfg.mlp_bias:
            src["mlp.gate_up_bias"] = (p + "mlp.gate_proj.bias", _gate_up(_vector))
            src["mlp.down_bias"] = (p + "mlp.down_proj.bias", _vector)
    return src


def vocab_table(ckpt: Checkpoint, cfg: ModelConfig, name: str, rows: int) -> Lazy:
    """The embedding or LM head [vocab, hidden], padded to `rows` (an LM head a checkpoint
    stores in FP8 is dequantized: the engine keeps both tables in its dtype)."""
    w = _checked(ckpt, name, (cfg.vocab_size, cfg.hidden_size))
    if w.dtype != FP8_DTYPE:
        return padded_rows(_stored(ckpt, w), rows)
    transposed = _linear(cfg.quantization, out_proj=True)(ckpt, name, w.shape[::-1])
    table = Lazy(w.shape, lambda index: transposed.take(index[::-1]).T)
    return padded_rows(table, rows)


def final_norm(ckpt: Checkpoint, shape: tuple[int, ...]) -> Lazy:
    return _vector(ckpt, "model.norm.weight", shape)


def hf_modules(cfg: ModelConfig, path: str, layer: int, sources: dict | None = None) -> list[str]:
    """The HF Linear modules our layer parameter `path` of `layer` is read from (none where the
    layer does not have it: the other kind of layer of a model mixing dense and MoE ones).
    `sources`: `layer_sources(cfg, ...)` when the caller has it."""
    template = (sources or layer_sources(cfg, 1))[path][0].format(l=layer)
    if cfg.num_experts and path.startswith("mlp."):
        if cfg.is_moe_layer[layer] == path.startswith("mlp.dense."):
            return []
        if path in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            which = path.removeprefix("mlp.")
            return [f"{template}.{e}.{which}" for e in range(cfg.num_experts)]
    module = template.removesuffix(".weight")
    return [module, module.replace("gate_proj", "up_proj")] if "gate_up" in path else [module]


def input_scale(ckpt: Checkpoint, modules: list[str]) -> np.float32:
    """The static activation scale of a weight read from `modules`: the largest of theirs, so
    that no module's inputs overflow (vLLM's rule for fused projections)."""
    scales = [np.float32(ckpt.copy(ckpt.view(f"{m}.input_scale")).max()) for m in modules]
    return max(scales, default=np.float32(1))


def validate(cfg: ModelConfig, ckpt: Checkpoint, sources: dict) -> None:
    """Every tensor the model needs is present, and every weight the quantization_config
    says is FP8 is, before any weight is read.

    MoE feed-forward tensors are left to their readers: which names exist depends on the
    checkpoint's expert layout (per expert or fused) and on which layers are MoE.
    """
    needed = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        needed.append("lm_head.weight")
    scheme = cfg.quantization
    for path, (template, _) in sources.items():
        if cfg.num_experts and path.startswith("mlp."):
            continue
        for layer in range(cfg.num_layers):
            needed.append(template.format(l=layer))
            if "gate_proj" in template:  # a fused gate/up source reads the up_proj twin too
                needed.append(template.replace("gate_proj", "up_proj").format(l=layer))
            if scheme is None or scheme.method == "online" or path not in FP8_LINEARS:
                continue
            for module in hf_modules(cfg, path, layer):
                if scheme.quantizes(module):
                    ckpt.require(f"{module}.weight")
                    _fp8_only(ckpt, f"{module}.weight", ckpt.view(f"{module}.weight"), scheme)
                    needed.append(f"{module}.{scheme.scale_name}")
                    if scheme.activations == "static":
                        needed.append(f"{module}.input_scale")
    for name in needed:
        ckpt.require(name)
