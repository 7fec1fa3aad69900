"""The device mesh and THE table that decides where every tensor lives.

Every parameter (and the KV cache) names its axes logically — ("stage", "embed",
"q_heads", "head_dim") — and `LOGICAL_TO_MESH` below is the one place that turns those names into
mesh axes. Changing a sharding decision means changing one row here.

Mesh axes:
    data    independent pipeline replicas; sequence rows and KV pages are split over them
    stage   pipeline stages; axis 0 of every layer slot's tensors, so the partition IS the spec
    tensor  Megatron tensor parallelism inside a stage (heads / ffn columns)
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "stage", "tensor")

LOGICAL_TO_MESH: dict[str, str | tuple[str, ...] | None] = {
    "stage": "stage",  # every layer slot's tensors [stages, ...]: the pipeline partition
    "vocab": ("stage", "tensor"),  # embedding and LM head: vocab-parallel over every device
    "embed": None,  # the residual stream is replicated inside a stage
    "q_heads": "tensor",  # attention is split by heads ...
    "kv_heads": "tensor",  # ... KV heads too (replicated first when fewer than tp)
    "head_dim": None,
    "ffn": "tensor",  # MLP split by intermediate columns; one psum after down_proj
    "experts": None,  # every expert on every tensor rank, each rank owning a slice ...
    "moe_ffn": "tensor",  # ... of every expert's intermediate dim (see docs/parallelism.md)
    "router": None,
    "batch": "data",  # sequence rows: split over pipeline replicas
    "pages": ("stage", "data"),  # KV page pools: one per stage and replica (layers' share)
    "seq": None,
}


def logical_to_spec(axes: tuple[str | None, ...]) -> PartitionSpec:
    return PartitionSpec(*(None if a is None else LOGICAL_TO_MESH[a] for a in axes))


def make_mesh(dp: int, pp: int, tp: int) -> Mesh:
    """A ("data", "stage", "tensor") mesh over the first dp*pp*tp devices."""
    for name, value in (("dp", dp), ("pp", pp), ("tp", tp)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: expected a positive integer")
    devices = jax.devices()
    needed = dp * pp * tp
    if needed > len(devices):
        raise ValueError(
            f"dp*pp*tp = {dp}*{pp}*{tp} = {needed} devices requested but only "
            f"{len(devices)} are present"
        )
    grid = np.array(devices[:needed]).reshape(dp, pp, tp)
    return Mesh(grid, MESH_AXES)


def named(mesh: Mesh, axes: tuple[str | None, ...]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes))


def padded_vocab(vocab_size: int, mesh: Mesh) -> int:
    """Vocab rounded up so that it splits evenly over the ("stage", "tensor") devices."""
    shards = mesh.shape["stage"] * mesh.shape["tensor"]
    return math.ceil(vocab_size / shards) * shards
