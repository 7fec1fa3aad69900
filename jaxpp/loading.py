"""Put the model's parameters on the mesh, each process reading only the shards its own devices
hold: from a Hugging Face safetensors directory, or from an orbax checkpoint already in the
engine's layout (`jaxpp convert`).

Safetensors: each parameter is built with `jax.make_array_from_callback`, which asks only for
the blocks of this process's devices (one layer slot's q_proj on one stage, one vocab range of
the embedding); the weight mapping (weights.py) reads just those bytes from the memory maps.
With pp=4 over two processes each reads half the layers and half the vocabulary.

Orbax: the checkpoint holds the engine's own stacked, stage-major arrays, so orbax restores
each device's shard straight from its files (no host ever holds a full copy). It is tied to the
layout it was converted for (stages, layer partition, padded vocabulary, stored KV heads), which
`ENGINE_LAYOUT` records; another layout is refused with what to pass.

FP8 weights (fp8.py) are read as stored, with their scales in the engine's layout; a weight
the engine keeps in FP8 that the checkpoint stores in floats is quantized here, block by block
as it streams from the files, with per-output-channel scales of the whole layer's weight
(`LLM(quantization="fp8")`): no process ever holds more than one layer's tensor of it.

Either way the result comes with `load_stats`: bytes read by this process, the checkpoint's
bytes on disk and the seconds it took.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpp.checkpoint import Checkpoint, CheckpointError
from jaxpp.config import ModelConfig
from jaxpp.fp8 import FP8, channel_scale, quantize
from jaxpp.sharding import logical_to_spec
from jaxpp.weights import (
    Lazy,
    final_norm,
    hf_modules,
    input_scale,
    layer_sources,
    validate,
    vocab_table,
)

ENGINE_LAYOUT = "jaxpp_layout.json"  # marks an orbax checkpoint in the engine's layout
PARAMS = "params"  # its orbax directory


def is_engine_checkpoint(model_dir: Path) -> bool:
    return (model_dir / ENGINE_LAYOUT).is_file()


def model_identity(model_dir: Path) -> str:
    """What must be the same model in every process: config.json and every file's name and
    size (the weights are too large to hash at start-up)."""
    if not model_dir.is_dir():
        return f"missing {model_dir}"
    config = model_dir / "config.json"
    files = sorted(
        (str(f.relative_to(model_dir)), f.stat().st_size)
        for f in model_dir.rglob("*")
        if f.is_file()
    )
    return repr((config.read_text() if config.is_file() else None, files))


def load_params(
    model_dir: Path,
    abstract: nnx.State,
    cfg: ModelConfig,
    mesh: jax.sharding.Mesh,
    grid: np.ndarray,
    kv_replicas: int,
    windows: np.ndarray,
) -> tuple[nnx.State, dict]:
    """The parameters of `abstract` (a shape-only state) on `mesh`, and this process's load
    stats {"bytes_read", "checkpoint_bytes", "seconds"}."""
    started = time.perf_counter()
    if is_engine_checkpoint(model_dir):
        state, read, total = _restore(model_dir, abstract, mesh, grid)
    else:
        state, read, total = _from_safetensors(
            Checkpoint(model_dir), abstract, cfg, mesh, grid, kv_replicas, windows
        )
    stats = {
        "bytes_read": read,
        "checkpoint_bytes": total,
        "seconds": time.perf_counter() - started,
    }
    return state, stats


def _sharding(mesh: jax.sharding.Mesh, var) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(mesh, logical_to_spec(var.get_metadata()["logical_axes"]))


def _path(key: tuple) -> str:
    return ".".join(str(k) for k in key)  # "layers.3.attn.q_proj": slot 3's q_proj


# --- safetensors ------------------------------------------------------------------------------


def _from_safetensors(ckpt, abstract, cfg, mesh, grid, kv_replicas, windows):
    sources = layer_sources(cfg, kv_replicas)
    validate(cfg, ckpt, sources)
    state = list(nnx.to_flat_state(abstract))
    layer = _LayerReader(ckpt, cfg, sources, {_path(k): v.get_value() for k, v in state})
    flat = []
    for key, var in state:
        value = var.get_value()
        shape, dtype = value.shape, np.dtype(value.dtype)
        block = _block_reader(_path(key), shape, dtype, cfg, ckpt, layer, grid, windows)
        # Devices holding the same block (replicas over "tensor" or "data") share one read.
        blocks: dict[str, np.ndarray] = {}

        def once(index, block=block, blocks=blocks):
            k = repr(index)
            if k not in blocks:
                blocks[k] = block(index)
            return blocks[k]

        array = jax.make_array_from_callback(shape, _sharding(mesh, var), once)
        flat.append((key, var.replace(array)))
    return nnx.from_flat_state(flat), ckpt.bytes_read, ckpt.total_bytes


def _block_reader(path, shape, dtype, cfg, ckpt, layer, grid, windows) -> Callable:
    """index -> the numpy block `index` of parameter `path`, read from the checkpoint."""
    if path.startswith("layers."):
        _, slot, name = path.split(".", 2)
        layers = grid[:, int(slot)]  # the layer each stage holds in this slot, -1 if none
        if name == "filled":
            return lambda index: (layers >= 0)[index]
        if name == "window":
            return lambda index: windows[:, int(slot)][index].astype(np.int32)
        if name == "mlp.is_moe":
            return lambda index: np.array(cfg.is_moe_layer + (False,))[layers][index]
        one_layer = shape[1:]

        def slot_block(index):
            stages, rest = index[0], index[1:]
            rows = []
            for s in range(*stages.indices(shape[0])):
                if layers[s] < 0:  # empty slot of an uneven partition: never computed
                    rows.append(np.zeros(one_layer, dtype)[rest])
                else:
                    block = layer(slot, name, int(layers[s]), one_layer, rest)
                    rows.append(block.astype(dtype))
            return np.stack(rows)

        return slot_block
    tables: dict[str, Callable[[], Lazy]] = {
        "embed": lambda: vocab_table(ckpt, cfg, "model.embed_tokens.weight", shape[0]),
        "lm_head": lambda: vocab_table(ckpt, cfg, "lm_head.weight", shape[0]),
        "final_norm.weight": lambda: final_norm(ckpt, shape),
    }
    if path not in tables:
        raise KeyError(f"no checkpoint source for parameter {path}")
    return lambda index: tables[path]().take(index).astype(dtype)


class _LayerReader:
    """One layer's block of a layer-slot parameter: a weight as the engine stores it (floats,
    or FP8: read as stored, or quantized on load), or an FP8 weight's scales."""

    def __init__(self, ckpt: Checkpoint, cfg: ModelConfig, sources: dict, params: dict):
        self.ckpt, self.cfg, self.sources, self.params = ckpt, cfg, sources, params
        self.online = cfg.quantization is not None and cfg.quantization.method == "online"
        self.scales: dict[tuple[str, int], np.ndarray] = {}  # on-load scales per weight, layer

    def __call__(self, slot: str, name: str, layer: int, shape, index) -> np.ndarray:
        weight = name.removesuffix("_input_scale").removesuffix("_scale")
        in_fp8 = self.params[f"layers.{slot}.{weight}"].dtype == FP8
        if name != weight and not in_fp8:
            return np.ones(shape, np.float32)[index]  # a slot keeping this weight in floats
        if name.endswith("_input_scale"):
            modules = hf_modules(self.cfg, weight, layer)
            return np.full(shape, input_scale(self.ckpt, modules), np.float32)[index]
        if not in_fp8:
            return self._source(name, layer, shape, "value").take(index)
        if not self.online:
            part = "fp8" if name == weight else "scale"
            return self._source(weight, layer, shape, part).take(index)
        weight_shape = self.params[f"layers.{slot}.{weight}"].shape[1:]
        scale_shape = self.params[f"layers.{slot}.{weight}_scale"].shape[1:]
        scale = self._online_scale(weight, layer, weight_shape, scale_shape)
        if name != weight:
            return scale[index]
        at = tuple(i if n > 1 else slice(None) for i, n in zip(index, scale.shape, strict=True))
        return quantize(self._source(name, layer, shape, "value").take(index), scale[at])

    def _source(self, name: str, layer: int, shape, part: str) -> Lazy:
        template, read = self.sources[name]
        return read(self.ckpt, template.format(l=layer), shape, part)

    def _online_scale(self, name: str, layer: int, shape, scale_shape) -> np.ndarray:
        """Per-output-channel scales of weight `name` of `layer` [*batch, *in, *out], from the
        largest |w| over its input axes (where its scale has extent 1), read in slices of
        64 MiB along the first: the whole layer's, so that the scales, hence the answers, do
        not depend on how the weight is split over devices."""
        if (name, layer) not in self.scales:
            source = self._source(name, layer, shape, "value")
            pairs = enumerate(zip(shape, scale_shape, strict=True))
            axes = tuple(a for a, (n, m) in pairs if m == 1 < n)
            first = axes[0] if axes else 0
            rows = max(1, (64 << 20) // (4 * math.prod(shape) // shape[first]))
            amax = np.zeros(scale_shape, np.float32)
            for lo in range(0, shape[first], rows):
                index = [slice(None)] * len(shape)
                index[first] = slice(lo, min(lo + rows, shape[first]))
                block = np.abs(source.take(tuple(index)).astype(np.float32))
                amax = np.maximum(amax, block.max(axis=axes, keepdims=True))
            self.scales[(name, layer)] = channel_scale(amax)
        return self.scales[(name, layer)]


# --- orbax, in the engine's layout --------------------------------------------------------------


def layout_record(abstract: nnx.State, grid: np.ndarray) -> dict:
    """What an engine checkpoint is tied to: the layer grid, every parameter's shape, and
    which are FP8 (listed only when some are: records of float models stay as they were)."""
    flat = list(nnx.to_flat_state(abstract))
    record = {
        "layer_grid": grid.tolist(),
        "shapes": {_path(k): list(v.get_value().shape) for k, v in flat},
    }
    fp8 = [_path(k) for k, v in flat if v.get_value().dtype == FP8]
    return record | ({"fp8": fp8} if fp8 else {})


def save_engine_checkpoint(state: nnx.State, grid: np.ndarray, out_dir: Path) -> None:
    """Write `state` (the engine's parameters) as an orbax checkpoint under `out_dir`."""
    import orbax.checkpoint as ocp  # noqa: PLC0415 - slow import, only for orbax checkpoints

    flat = {_path(k): v.get_value() for k, v in nnx.to_flat_state(state)}
    with ocp.StandardCheckpointer() as saver:
        saver.save((out_dir / PARAMS).resolve(), flat)
    if jax.process_index() == 0:
        (out_dir / ENGINE_LAYOUT).write_text(json.dumps(layout_record(state, grid)) + "\n")


def save_engine_dir(llm, out_dir: Path) -> None:
    """`llm`'s weights as a model dir `jaxpp.LLM` loads: the orbax checkpoint in its layout,
    and the model dir's other files (config with the engine's dtype, tokenizer, ...)."""
    from jaxpp.partition import layer_grid  # noqa: PLC0415

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_engine_checkpoint(llm.state, layer_grid(llm.partition)[0], out_dir)
    source = Path(llm.model_dir)
    for f in source.iterdir():
        if f.is_file() and not f.name.endswith(
            (".safetensors", ".safetensors.index.json", ENGINE_LAYOUT)
        ):
            shutil.copy(f, out_dir / f.name)
    config = json.loads((source / "config.json").read_text())
    config["dtype"] = jnp.dtype(llm.dtype).name  # read before torch_dtype (config.py)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _restore(model_dir: Path, abstract: nnx.State, mesh, grid: np.ndarray):
    import orbax.checkpoint as ocp  # noqa: PLC0415

    stored = json.loads((model_dir / ENGINE_LAYOUT).read_text())
    wanted = layout_record(abstract, grid)
    if stored != wanted:
        partition = [int((row >= 0).sum()) for row in np.array(stored["layer_grid"])]
        fp8 = "FP8 weights" if stored.get("fp8") else "no FP8 weights"
        raise CheckpointError(
            f"{model_dir}: this orbax checkpoint was converted for pp={len(partition)} with "
            f"layer_partition={partition} (and its tp's vocabulary padding and KV heads) and "
            f"{fp8}, which this engine's layout does not match: pass the layout it was "
            "converted for (quantization='fp8' for a model quantized on conversion), or "
            "convert the Hugging Face model again for this one"
        )
    flat = list(nnx.to_flat_state(abstract))
    target = {
        _path(k): jax.ShapeDtypeStruct(
            v.get_value().shape, v.get_value().dtype, sharding=_sharding(mesh, v)
        )
        for k, v in flat
    }
    with ocp.StandardCheckpointer() as restorer:
        values = restorer.restore((model_dir / PARAMS).resolve(), target)
    state = nnx.from_flat_state([(k, v.replace(values[_path(k)])) for k, v in flat])
    read = 0
    for leaf in values.values():  # a block held by several local devices was read once
        blocks = {repr(shard.index): shard.data.nbytes for shard in leaf.addressable_shards}
        read += sum(blocks.values())
    total = sum(f.stat().st_size for f in (model_dir / PARAMS).rglob("*") if f.is_file())
    return state, read, total
