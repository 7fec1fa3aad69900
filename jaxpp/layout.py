"""The static shapes of a model split over a dp x pp x tp mesh, computed without weights or devices.

`LLM` builds its engine from these functions and `jaxpp plan` sizes a layout with the very same
ones, on a `jax.sharding.AbstractMesh`: the partition and layer grid, the abstract parameter
state (`nnx.eval_shape` of the real `Transformer`), the KV page pools (`pipeline.pool_shapes`),
the page count and the ring's `PipelineShape`. Bytes per device are read off the shardings
(`NamedSharding(mesh, spec).shard_shape(global_shape)`) with the specs of sharding.py's table,
exactly as the engine places its arrays, so a plan's figures cannot drift from what `LLM`
allocates: FP8 weights (fp8.py) count 1 byte per parameter, their scales 4 per scale.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from jaxpp.batch import Buckets
from jaxpp.config import EngineConfig, ModelConfig, SpeculativeConfig
from jaxpp.fp8 import FP8Storage, SlotFP8
from jaxpp.model import Transformer
from jaxpp.partition import layer_grid, layer_partition
from jaxpp.pipeline import KVCache, PipelineShape, pool_shapes
from jaxpp.sharding import MESH_AXES, logical_to_spec, padded_vocab
from jaxpp.weights import FP8_LINEARS, hf_modules, layer_sources

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DEFAULT_MAX_NUM_SEQS = 256  # rows: a few numbers each on the device, so vLLM's default
DEFAULT_BLOCK_SIZE = 16  # positions per KV page (vLLM's default)
# Tokens a micro-batch carries per tick when not told (vLLM: 2048, and 8192-16384 on GPUs
# with 70 GiB or more; an A100 got slower with the large budget, vLLM PR #17885).
DEFAULT_TOKEN_BUDGET = {"cpu": 2048, "gpu": 8192}
CPU_KV_CACHE_BYTES = 1 << 30  # KV budget of a CPU process when kv_cache_memory is not given
KV_MEMORY_FRACTION = 0.9  # of an accelerator's memory left after the weights (vLLM's default)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A model on a dp x pp x tp mesh: everything about it that does not need a weight."""

    config: ModelConfig
    dtype: jnp.dtype
    dp: int
    pp: int
    tp: int
    partition: list[int]  # layers per stage
    grid: np.ndarray  # [stages, layer slots]: layer index held, -1 for an empty slot
    microbatches: int
    max_model_len: int
    block_size: int  # positions per KV page
    token_budget: int  # max_num_batched_tokens: tokens a micro-batch carries per tick
    kv_heads: int  # KV heads stored (replicated up to tp when the model has fewer)
    vocab_padded: int  # vocabulary rounded up to split over the ("stage", "tensor") devices

    @property
    def pages_per_seq(self) -> int:
        """Block-table columns: the pages of a max_model_len sequence."""
        return -(-self.max_model_len // self.block_size)

    @property
    def layers_per_stage(self) -> int:
        return self.grid.shape[1]

    @property
    def devices(self) -> int:
        return self.dp * self.pp * self.tp

    @property
    def mesh(self) -> AbstractMesh:
        return abstract_mesh(self.dp, self.pp, self.tp)

    @property
    def windows(self) -> np.ndarray:
        """Sliding window of every layer slot [stages, slots] (0: full attention or empty)."""
        windows = np.array(self.config.sliding_windows + (0,))
        return np.where(self.grid >= 0, windows[self.grid], 0)


def abstract_mesh(dp: int, pp: int, tp: int) -> AbstractMesh:
    """The engine's ("data", "stage", "tensor") mesh with no devices behind it."""
    return AbstractMesh((dp, pp, tp), MESH_AXES)


def model_dtype(dtype: str | None, cfg: ModelConfig) -> jnp.dtype:
    """The dtype the engine computes in: `dtype`, or the checkpoint's when None."""
    name = dtype or cfg.dtype
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not supported: expected one of {list(DTYPES)}")
    return DTYPES[name]


def stored_kv_heads(cfg: ModelConfig, tp: int) -> int:
    """Validate the tp split; return how many KV heads are stored (replicated if < tp)."""
    if cfg.num_heads % tp:
        raise ValueError(
            f"tp={tp} is invalid: num_attention_heads={cfg.num_heads} is not divisible by it"
        )
    for name, size in (
        ("intermediate_size", cfg.intermediate_size),
        ("moe_intermediate_size", cfg.moe_intermediate_size),
        ("shared_expert_intermediate_size", cfg.shared_expert_intermediate_size),
    ):
        if size % tp:
            raise ValueError(f"tp={tp} is invalid: {name}={size} is not divisible by it")
    if cfg.num_kv_heads % tp == 0:
        return cfg.num_kv_heads
    if tp % cfg.num_kv_heads == 0:
        return tp
    raise ValueError(
        f"tp={tp} is invalid: num_key_value_heads={cfg.num_kv_heads} must divide tp "
        "or be divisible by it"
    )


def make_layout(cfg: ModelConfig, engine: EngineConfig, platform: str) -> Layout:
    """Validate an engine's layout against the model and derive its static shapes (LLM's
    rules); `platform` ("cpu", "gpu", ...) picks the token budget when none is given."""
    kv_heads = stored_kv_heads(cfg, engine.tp)
    partition = layer_partition(cfg.num_layers, engine.pp, engine.layer_partition)
    grid, _ = layer_grid(partition)
    microbatches = engine.num_microbatches or engine.pp
    if microbatches < engine.pp:
        raise ValueError(
            f"num_microbatches={engine.num_microbatches!r} is invalid: the ring needs at least "
            f"one micro-batch per stage (>= pp={engine.pp})"
        )
    max_len = engine.max_model_len or cfg.max_position_embeddings
    if max_len < 2 or max_len > cfg.max_position_embeddings:
        raise ValueError(
            f"max_model_len={max_len} is invalid: expected 2 .. the model's "
            f"max_position_embeddings={cfg.max_position_embeddings}"
        )
    return Layout(
        config=cfg,
        dtype=model_dtype(engine.dtype, cfg),
        dp=engine.dp,
        pp=engine.pp,
        tp=engine.tp,
        partition=partition,
        grid=grid,
        microbatches=microbatches,
        max_model_len=max_len,
        block_size=engine.block_size,
        token_budget=engine.max_num_batched_tokens or default_token_budget(platform),
        kv_heads=kv_heads,
        vocab_padded=padded_vocab(cfg.vocab_size, abstract_mesh(engine.dp, engine.pp, engine.tp)),
    )


def abstract_model(layout: Layout) -> Transformer:
    """The engine's `Transformer` for this layout, shapes only (no memory is allocated)."""
    cfg = layout.config
    return nnx.eval_shape(
        lambda: Transformer(
            cfg,
            layout.pp,
            layout.layers_per_stage,
            layout.vocab_padded,
            layout.kv_heads,
            layout.dtype,
            fp8_slots(layout),
        )
    )


def fp8_slots(layout: Layout) -> tuple[SlotFP8, ...] | None:
    """How each layer slot stores its linear weights in FP8 (None: the model has none).

    A weight has scales where any layer's checkpoint modules are all FP8 (or everywhere, for
    on-load quantization); a slot stores it in FP8 where every layer it holds has it so, and
    keeps it in the model's dtype where one of them is in the checkpoint's ignore list."""
    cfg, scheme = layout.config, layout.config.quantization
    if scheme is None:
        return None
    layers = range(cfg.num_layers)
    sources = layer_sources(cfg, 1)
    linears = [p for p in sources if p in FP8_LINEARS]
    # Per weight and layer: its modules all FP8, not all, or None where the layer has none.
    in_fp8 = {
        p: [_all_fp8(scheme, hf_modules(cfg, p, layer, sources)) for layer in layers]
        for p in linears
    }
    block = scheme.weight_block[1] if scheme.strategy == "block" else None
    storage = FP8Storage(
        params=frozenset(p for p in linears if True in in_fp8[p]),
        block_in=block,
        tensor=layout.tp,
        activations=scheme.activations,
        activation_scale_ub=scheme.activation_scale_ub,
    )
    return tuple(
        SlotFP8(
            storage,
            frozenset(
                p
                for p in storage.params
                if all(in_fp8[p][layer] is not False for layer in column if layer >= 0)
            ),
        )
        for column in layout.grid.T
    )


def _all_fp8(scheme, modules: list[str]) -> bool | None:
    return all(scheme.quantizes(m) for m in modules) if modules else None


def default_token_budget(platform: str) -> int:
    """max_num_batched_tokens when not given: vLLM's fallback on CPUs, its GPU figure else."""
    return DEFAULT_TOKEN_BUDGET["cpu" if platform == "cpu" else "gpu"]


def row_count(layout: Layout, requested: int | None) -> int:
    """Sequence rows: max_num_seqs (default 256) rounded up to a multiple of dp x M."""
    unit = layout.dp * layout.microbatches
    return unit * math.ceil((requested or DEFAULT_MAX_NUM_SEQS) / unit)


def pipeline_shape(layout: Layout, rows: int, pages: int, decode_chunk: int,
                   speculative: SpeculativeConfig | None = None) -> PipelineShape:  # fmt: skip
    """The ring's static shape for `rows` sequence rows and `pages` KV pages per replica."""
    mb = rows // (layout.dp * layout.microbatches)
    drafts = speculative.num_speculative_tokens if speculative else 0
    lookup = (0, 0)  # a draft model's proposals need no n-gram sizes
    if drafts and speculative.method == "ngram":
        lookup = (speculative.prompt_lookup_min, speculative.prompt_lookup_max)
    return PipelineShape(
        stages=layout.pp,
        microbatches=layout.microbatches,
        rows=mb,
        max_tokens=Buckets.of(mb * (drafts + 1), layout.token_budget).sizes[-1],
        drafts=drafts,
        lookup=lookup,
        block_size=layout.block_size,
        pages=pages,
        pages_per_seq=layout.pages_per_seq,
        log_ticks=decode_chunk * layout.microbatches,
        vocab_size=layout.config.vocab_size,
    )


def kv_pools(layout: Layout, shape: PipelineShape) -> KVCache:
    """(global shape, logical axes) of every K and V page pool the ring allocates."""
    return pool_shapes(
        shape, layout.layers_per_stage, layout.dp, layout.kv_heads, layout.config.head_dim
    )


def kv_bytes_per_page(layout: Layout) -> int:
    """KV bytes one page takes on each device of its replica (every layer slot's K and V),
    read off the pools' shardings."""
    one_page = pipeline_shape(layout, layout.dp * layout.microbatches, pages=1, decode_chunk=1)
    return cache_device_bytes(layout, one_page, layout.mesh)


def default_kv_budget(platform: str, devices: int, bytes_limit: int | None, in_use: int) -> int:
    """KV bytes per device when kv_cache_memory is not given: 90% of an accelerator's memory
    left after the weights (as vLLM's gpu_memory_utilization), or CPU_KV_CACHE_BYTES shared by
    the process's devices."""
    if platform != "cpu" and bytes_limit is not None:
        return int(KV_MEMORY_FRACTION * (bytes_limit - in_use))
    return CPU_KV_CACHE_BYTES // devices


def page_count(layout: Layout, budget: int) -> int:
    """KV pages per replica that `budget` bytes per device hold (at least one, or an error
    naming kv_cache_memory)."""
    per_page = kv_bytes_per_page(layout)
    pages = max(budget, 0) // per_page
    if pages < 1:
        raise ValueError(
            f"kv_cache_memory={budget} bytes per device holds no KV page: one page of "
            f"{layout.block_size} positions needs {per_page} bytes on each device "
            f"({layout.layers_per_stage} layer slots per stage); raise kv_cache_memory or "
            "lower block_size"
        )
    return pages


# --- bytes per device, read off the shardings -------------------------------------------------


def shard_bytes(mesh: Mesh | AbstractMesh, shape: tuple[int, ...], dtype, spec: PartitionSpec):
    """Bytes of the shard of a `shape` array that each device of `mesh` holds under `spec`."""
    local = NamedSharding(mesh, spec).shard_shape(tuple(shape))
    return math.prod(local) * np.dtype(dtype).itemsize


def param_leaves(
    state: nnx.State,
) -> Iterable[tuple[str, tuple[int, ...], np.dtype, PartitionSpec]]:
    """(path, global shape, dtype, spec) of every parameter leaf, as `load_state` places them."""
    for key, var in nnx.to_flat_state(state):
        value = var.get_value()
        spec = logical_to_spec(var.get_metadata()["logical_axes"])
        yield ".".join(str(k) for k in key), tuple(value.shape), np.dtype(value.dtype), spec


def params_device_bytes(state: nnx.State, mesh: Mesh | AbstractMesh) -> int:
    return sum(
        shard_bytes(mesh, shape, dtype, spec) for _, shape, dtype, spec in param_leaves(state)
    )


def cache_device_bytes(layout: Layout, shape: PipelineShape, mesh: Mesh | AbstractMesh) -> int:
    cache = kv_pools(layout, shape)
    return sum(
        shard_bytes(mesh, global_shape, layout.dtype, logical_to_spec(axes))
        for global_shape, axes in (*cache.k, *cache.v)
    )
