"""Load a Hugging Face safetensors checkpoint straight into the sharded, stage-major layout.

Nothing is ever unpickled: only `*.safetensors` files are read, through a small reader of our own
(an 8-byte header length, a JSON header, raw little-endian data) that memory-maps the file. Every
header is validated before any weight moves, so a missing tensor, a wrong shape or a truncated
file fails fast with the file and tensor named.

Streaming: each parameter is built with `jax.make_array_from_callback`; the callback assembles
only the shard one device owns (e.g. one layer slot's q_proj on one stage), reading each source
tensor from the memory map. Host memory never holds a second copy of the model.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from jaxpp.config import ModelConfig
from jaxpp.sharding import logical_to_spec

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be loaded; the message names the culprit."""


class SafetensorsFile:
    """Validated header + lazy memory-mapped access to one .safetensors file."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors header "
                    f"(header says {header_len} bytes, file has {size})"
                )
            try:
                header = json.loads(f.read(header_len))
                assert isinstance(header, dict)
            except (ValueError, AssertionError):
                raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
        self.data_start = 8 + header_len
        self.tensors: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = np.dtype(_DTYPES[info["dtype"]])
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}") from None
            needed = int(np.prod(shape)) * dtype.itemsize
            if end - begin != needed:
                raise CheckpointError(
                    f"{path}: tensor {name!r} has {end - begin} bytes, "
                    f"but shape {shape} {info['dtype']} needs {needed}"
                )
            if self.data_start + end > size:
                raise CheckpointError(
                    f"{path}: truncated file: tensor {name!r} ends at byte "
                    f"{self.data_start + end} but the file has {size} bytes"
                )
            self.tensors[name] = (dtype, shape, self.data_start + begin)

    def read(self, name: str) -> np.ndarray:
        dtype, shape, offset = self.tensors[name]
        if int(np.prod(shape)) == 0:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape)


class Checkpoint:
    """All tensors of a HF model directory, by name."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: model directory not found")
        self.weight_map: dict[str, str] = {}  # tensor -> shard file, from the index if any
        files = self._weight_files()
        self.where: dict[str, SafetensorsFile] = {}
        for path in files:
            st = SafetensorsFile(path)
            for name in st.tensors:
                self.where[name] = st

    def _weight_files(self) -> list[Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                self.weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise CheckpointError(f"{index}: corrupt index (no weight_map)") from None
            files = [self.dir / f for f in sorted(set(self.weight_map.values()))]
            for f in files:
                if not f.is_file():
                    raise CheckpointError(
                        f"{index} lists {f.name}, which is missing from {self.dir}"
                    )
            return files
        files = sorted(self.dir.glob("*.safetensors"))
        if files:
            return files
        pickles = sorted(p.name for p in self.dir.glob("*.bin")) + sorted(
            p.name for p in self.dir.glob("*.pt*")
        )
        if pickles:
            raise CheckpointError(
                f"{self.dir}: holds only pickle weights ({', '.join(pickles)}); jaxpp never "
                "unpickles (it can run code). Convert them to .safetensors first."
            )
        raise CheckpointError(f"{self.dir}: no *.safetensors weight files found")

    def has(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        self._require(name)
        return self.where[name].tensors[name][1]

    def read(self, name: str) -> np.ndarray:
        self._require(name)
        return self.where[name].read(name)

    def _require(self, name: str) -> None:
        if name not in self.where:
            if name in self.weight_map:
                raise CheckpointError(
                    f"{self.dir / self.weight_map[name]}: tensor {name!r} is missing, although "
                    "model.safetensors.index.json lists it in this file"
                )
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")


# --- mapping HF tensors onto our parameters ---------------------------------------------------
#
# Each of our parameters has a loader: a function from the HF layer index (or None for a
# non-layer parameter) to the full numpy value of ONE layer's slice, in our axis order.


def _linear_in_out(ckpt: Checkpoint, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """HF stores Linear weights [out, in]; we keep [in, *out] so that y = x @ W."""
    w = ckpt.read(name)
    expected_hf = (int(np.prod(shape[1:])), shape[0])
    _check_shape(ckpt, name, w.shape, expected_hf)
    return w.T.reshape(shape)


def _linear_out_proj(ckpt: Checkpoint, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """o_proj / down_proj: HF [out, in] -> ours [*in, out]."""
    w = ckpt.read(name)
    expected_hf = (shape[-1], int(np.prod(shape[:-1])))
    _check_shape(ckpt, name, w.shape, expected_hf)
    return w.T.reshape(shape)


def _vector(ckpt: Checkpoint, name: str, shape: tuple[int, ...]) -> np.ndarray:
    w = ckpt.read(name)
    _check_shape(ckpt, name, w.shape, (int(np.prod(shape)),))
    return w.reshape(shape)


def _check_shape(ckpt: Checkpoint, name: str, found, expected) -> None:
    if tuple(found) != tuple(expected):
        raise CheckpointError(
            f"{ckpt.where[name].path}: tensor {name!r} has shape {tuple(found)}, "
            f"expected {tuple(expected)} from config.json"
        )


def _repeat_kv(read: Callable, replicas: int) -> Callable:
    """KV heads replicated `replicas` times so that every tensor rank owns a whole head."""
    if replicas == 1:
        return read
    return lambda ckpt, name, shape: np.repeat(
        read(ckpt, name, (shape[0], shape[1] // replicas, *shape[2:])), replicas, axis=1
    )


def _repeat_kv_bias(replicas: int) -> Callable:
    if replicas == 1:
        return _vector
    return lambda ckpt, name, shape: np.repeat(
        _vector(ckpt, name, (shape[0] // replicas, *shape[1:])), replicas, axis=0
    )


def gate_up(read: Callable) -> Callable:
    """Reader of our fused [.., 2, F] gate/up tensor: HF's `gate_proj` name is the source's
    template, its `up_proj` twin is read next to it (and validated with it, see _validate)."""

    def both(ckpt: Checkpoint, gate_name: str, shape: tuple[int, ...]) -> np.ndarray:
        one = shape[:-2] + shape[-1:]
        up_name = gate_name.replace("gate_proj", "up_proj")
        return np.stack([read(ckpt, gate_name, one), read(ckpt, up_name, one)], axis=-2)

    return both


def layer_sources(cfg: ModelConfig, kv_replicas: int) -> dict[str, tuple[str, Callable]]:
    """Our per-slot layer parameter path -> (HF name template with {l}, reader)."""
    p = "model.layers.{l}."
    src: dict[str, tuple[str, Callable]] = {
        "input_norm.weight": (p + "input_layernorm.weight", _vector),
        "post_attn_norm.weight": (p + "post_attention_layernorm.weight", _vector),
        "attn.q_proj": (p + "self_attn.q_proj.weight", _linear_in_out),
        "attn.k_proj": (p + "self_attn.k_proj.weight", _repeat_kv(_linear_in_out, kv_replicas)),
        "attn.v_proj": (p + "self_attn.v_proj.weight", _repeat_kv(_linear_in_out, kv_replicas)),
        "attn.o_proj": (p + "self_attn.o_proj.weight", _linear_out_proj),
    }
    if cfg.qkv_bias:
        src["attn.q_bias"] = (p + "self_attn.q_proj.bias", _vector)
        src["attn.k_bias"] = (p + "self_attn.k_proj.bias", _repeat_kv_bias(kv_replicas))
        src["attn.v_bias"] = (p + "self_attn.v_proj.bias", _repeat_kv_bias(kv_replicas))
    if cfg.o_bias:
        src["attn.o_bias"] = (p + "self_attn.o_proj.bias", _vector)
    if cfg.qk_norm:
        src["attn.q_norm.weight"] = (p + "self_attn.q_norm.weight", _vector)
        src["attn.k_norm.weight"] = (p + "self_attn.k_norm.weight", _vector)
    if cfg.num_experts:
        from jaxpp.moe import moe_sources  # noqa: PLC0415

        src.update(moe_sources(cfg, p))
    else:
        src["mlp.gate_up_proj"] = (p + "mlp.gate_proj.weight", gate_up(_linear_in_out))
        src["mlp.down_proj"] = (p + "mlp.down_proj.weight", _linear_out_proj)
        if cfg.mlp_bias:
            src["mlp.gate_up_bias"] = (p + "mlp.gate_proj.bias", gate_up(_vector))
            src["mlp.down_bias"] = (p + "mlp.down_proj.bias", _vector)
    return src


def _padded_rows(w: np.ndarray, rows: int) -> np.ndarray:
    """Vocab padding: zero rows past the real vocabulary (their logits are masked to -inf)."""
    if w.shape[0] == rows:
        return w
    out = np.zeros((rows, *w.shape[1:]), w.dtype)
    out[: w.shape[0]] = w
    return out


def load_state(
    abstract: nnx.State,
    cfg: ModelConfig,
    ckpt: Checkpoint,
    mesh: jax.sharding.Mesh,
    grid: np.ndarray,
    kv_replicas: int,
    windows: np.ndarray,
) -> nnx.State:
    """Fill an abstract (shape-only) model state from the checkpoint, shard by shard."""
    sources = layer_sources(cfg, kv_replicas)
    _validate(cfg, ckpt, sources, grid)
    flat = []
    for key, var in nnx.to_flat_state(abstract):
        path = ".".join(str(k) for k in key)  # "layers.3.attn.q_proj": slot 3's q_proj
        spec = logical_to_spec(var.get_metadata()["logical_axes"])
        sharding = jax.sharding.NamedSharding(mesh, spec)
        abstract_value = var.get_value()
        shape, dtype = abstract_value.shape, np.dtype(abstract_value.dtype)
        builder = _leaf_builder(path, shape, dtype, cfg, ckpt, sources, grid, windows)
        value = jax.make_array_from_callback(shape, sharding, builder)
        flat.append((key, var.replace(value)))
    return nnx.from_flat_state(flat)


def _leaf_builder(path, shape, dtype, cfg, ckpt, sources, grid, windows) -> Callable:
    """callback(index) -> the numpy shard `index` of parameter `path`."""
    if path.startswith("layers."):
        _, slot, name = path.split(".", 2)
        layers = grid[:, int(slot)]  # the layer each stage holds in this slot, -1 if none
        if name == "filled":
            return lambda index: (layers >= 0)[index]
        if name == "window":
            return lambda index: windows[:, int(slot)][index].astype(np.int32)
        if name == "mlp.is_moe":
            return lambda index: np.array(cfg.is_moe_layer + (False,))[layers][index]
        template, read = sources[name]
        one_layer = shape[1:]

        def slot_shard(index):
            stages, rest = index[0], index[1:]
            rows = []
            for s in range(*stages.indices(shape[0])):
                if layers[s] < 0:  # empty slot of an uneven partition: never computed
                    w = np.zeros(one_layer, dtype)[rest]
                else:
                    w = np.asarray(read(ckpt, template.format(l=int(layers[s])), one_layer)[rest])
                rows.append(w.astype(dtype))
            return np.stack(rows)

        return slot_shard
    if path == "embed":
        return lambda index: _padded_rows(_embedding(ckpt, cfg), shape[0])[index].astype(dtype)
    if path == "lm_head":

        def head(index):
            w = ckpt.read("lm_head.weight")
            _check_shape(ckpt, "lm_head.weight", w.shape, (cfg.vocab_size, cfg.hidden_size))
            return _padded_rows(w, shape[0])[index].astype(dtype)

        return head
    if path == "final_norm.weight":
        return lambda index: _vector(ckpt, "model.norm.weight", shape)[index].astype(dtype)
    raise KeyError(f"no checkpoint source for parameter {path}")


def _embedding(ckpt: Checkpoint, cfg: ModelConfig) -> np.ndarray:
    w = ckpt.read("model.embed_tokens.weight")
    _check_shape(ckpt, "model.embed_tokens.weight", w.shape, (cfg.vocab_size, cfg.hidden_size))
    return w


def _validate(cfg: ModelConfig, ckpt: Checkpoint, sources: dict, grid: np.ndarray) -> None:
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
        ckpt._require(name)
