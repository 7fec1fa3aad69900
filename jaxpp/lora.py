"""LoRA: low-rank adapters trained through the pipeline while the model's own weights stay frozen.

A target weight W of a layer (named as in Hugging Face checkpoints: `TARGETS`) gets two factors,
a [in, r] (random) and b [r, out] (zeros, so that training starts from the model itself), and the
layer computes with W + (alpha / r) a b. The factors are float32 whatever the model's dtype (an
optimizer's updates to them are small), stacked over stages and sharded like W: a takes W's input
axes, b its output axes, so that a b is this device's shard of the update under tensor
parallelism too (q/k/v/gate/up split their outputs over "tensor", o/down their inputs).

The update is added to W inside each tick rather than computed beside it (x W + (x a) b): the
layers are model.py's own code, which takes whole weights, so one implementation of each layer
serves both training modes. What that costs: the backward forms dL/d(W + a b) (one weight-sized
matmul per target, dropped once dL/da and dL/db are taken from it), never a gradient kept for
W -- the gradients carried between ticks, returned and handed to an optimizer are the factors'
only (docs/pipeline.md, "LoRA").

The factors of model layer l are drawn from (seed, l, target), whatever the partition, so that
every layout starts from the same adapters.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpp.sharding import named

# Hugging Face name: (sub-module, weight, input axes of the weight, half of the fused [D, 2, F]
# gate/up weight or None).
TARGETS: dict[str, tuple[str, str, int, int | None]] = {
    "q_proj": ("attn", "q_proj", 1, None),
    "k_proj": ("attn", "k_proj", 1, None),
    "v_proj": ("attn", "v_proj", 1, None),
    "o_proj": ("attn", "o_proj", 2, None),
    "gate_proj": ("mlp", "gate_up_proj", 1, 0),
    "up_proj": ("mlp", "gate_up_proj", 1, 1),
    "down_proj": ("mlp", "down_proj", 1, None),
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Adapters of rank `rank` on the `targets` weights of every layer, scaled by alpha / rank
    (alpha defaults to the rank: a scale of 1); `seed` draws the a factors."""

    rank: int
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    alpha: float | None = None
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.targets, str) or not all(isinstance(t, str) for t in self.targets):
            raise ValueError(f"LoraConfig targets={self.targets!r}: expected a tuple of names")
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"LoraConfig rank={self.rank!r} is invalid: expected an int >= 1")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets or len(set(self.targets)) < len(self.targets):
            raise ValueError(
                f"LoraConfig targets={self.targets!r} is invalid: expected distinct names "
                f"among {tuple(TARGETS)}"
            )

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank


class Adapter(nnx.Module):
    """The two factors of one target weight in one layer slot, stacked over stages."""

    def __init__(self, a: nnx.Param, b: nnx.Param):
        self.a = a
        self.b = b


class Adapters(nnx.Module):
    """Per layer slot, the adapters of each target (the slots of model.py's Transformer)."""

    def __init__(self, slots: list[dict[str, Adapter]]):
        self.slots = nnx.List([nnx.Dict(slot) for slot in slots])


def new_adapters(model, grid: np.ndarray, mesh, config: LoraConfig):
    """(graphdef, state) of fresh adapters for `model` (a Transformer whose layer slots follow
    `grid` [stages, slots] of model layer indices, -1 for an empty slot) on `mesh`."""
    mlp = {"gate_proj", "up_proj", "down_proj"} & set(config.targets)
    if mlp and not hasattr(model.layers[0].mlp, "gate_up_proj"):
        raise ValueError(
            f"LoraConfig targets {sorted(mlp)}: this model's feed-forward layers are mixtures "
            "of experts, which take no adapters here; target the attention projections "
            "(q_proj, k_proj, v_proj, o_proj)"
        )
    slots = []
    for i, layer in enumerate(model.layers):
        slot = {}
        for name in config.targets:
            module, weight, n_in, part = TARGETS[name]
            w = getattr(getattr(layer, module), weight)
            axes = w.get_metadata()["logical_axes"]
            out_from = 1 + n_in + (part is not None)
            a = np.zeros((grid.shape[0], *w.shape[1 : 1 + n_in], config.rank), np.float32)
            bound = float(np.prod(w.shape[1 : 1 + n_in])) ** -0.5
            for s, index in enumerate(grid[:, i]):
                if index >= 0:
                    seed = (config.seed, int(index), list(TARGETS).index(name))
                    rng = np.random.default_rng(seed)
                    a[s] = rng.uniform(-bound, bound, a.shape[1:])
            b = np.zeros((grid.shape[0], config.rank, *w.shape[out_from:]), np.float32)
            a_axes = ("stage", *axes[1 : 1 + n_in], None)
            b_axes = ("stage", None, *axes[out_from:])
            slot[name] = Adapter(
                nnx.Param(jax.device_put(a, named(mesh, a_axes)), logical_axes=a_axes),
                nnx.Param(jax.device_put(b, named(mesh, b_axes)), logical_axes=b_axes),
            )
        slots.append(slot)
    return nnx.split(Adapters(slots))


def merged_slot(params: nnx.State, adapters: nnx.State, config: LoraConfig) -> nnx.State:
    """A layer slot's parameters (stacked over stages: all of them, or one device's [1, ...])
    with each target weight W replaced by W + scale * a b; `params` itself is left alone."""
    out = jax.tree.map(lambda v: v, params)
    for name in config.targets:
        module, weight, n_in, part = TARGETS[name]
        w = out[module][weight]
        a, b = adapters[name]["a"][...], adapters[name]["b"][...]
        stages, rank = a.shape[0], a.shape[-1]
        delta = jnp.einsum(
            "sir,sro->sio", a.reshape(stages, -1, rank), b.reshape(stages, rank, -1)
        ).reshape(stages, *a.shape[1:-1], *b.shape[2:])
        delta = (config.scale * delta).astype(w.dtype)
        if part is None:
            value = w[...] + delta
        else:
            value = w[...].at[(slice(None),) * (1 + n_in) + (part,)].add(delta)
        out[module][weight] = w.replace(value)
    return out
