"""FP8 weights on the device: how a layer slot stores them, and the matmul that reads them.

Storage. A linear weight [*batch, *in, *out] (batch: the experts of a MoE layer; in: the axes
a matmul contracts) is kept as float8_e4m3fn, 1 byte per parameter, next to a float32 scale
[*batch, *grid, *out]: one scale per output channel, and along the input axes either one
(per-tensor and per-channel checkpoints, on-load quantization) or one per run of `g` inputs of
the last input axis (block-wise checkpoints: `g` divides the checkpoint's input block and this
tensor rank's share of the axis, so the runs split over "tensor" like the weight). Every format
becomes this one layout on load (weights.py): per-tensor and per-block scales are repeated over
the output channels they cover, which costs 4 bytes per output channel (per run), against the
weight's 1 byte per parameter.

The matmul (`project`), chosen by JAXPP_FP8_GEMM when a step program is traced:

- "w8a16": the weight is dequantized inside the program, w = q * scale in float32 and cast to
  the activations' dtype, and multiplied as a float weight: exactly the model with dequantized
  weights (the parity tests' reference). XLA fuses the conversion into the GEMM's operand read
  where it can; on a GPU that is not measured yet (docs/fp8.md).
- "w8a8": the activations are quantized too, per token (or with the checkpoint's static
  per-tensor input_scale), and the GEMM takes both operands in FP8 with float32 results, scaled
  afterwards by the token's and the output channel's scales: the shape XLA rewrites into
  cuBLASLt's FP8 GEMM on GPUs of compute capability 8.9 and newer (its operand scales must be
  scalars, hence 1 and the scaling after). Weights with input-axis runs (block-wise), routed
  experts (`ragged_dot`) and weight-only checkpoints always take w8a16.
- "auto" (the default): w8a8 on an FP8-capable GPU (vLLM's choice there), w8a16 elsewhere.
  Not yet measured on a GPU: scripts/gpu_bench.py has the rows that decide it.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn; a cast above it gives NaN, so clamp first
FP8_GEMM_CHOICES = ("auto", "w8a16", "w8a8")


@dataclasses.dataclass(frozen=True)
class FP8Storage:
    """Which linear weights have scales, and how the scales are laid out: the same for every
    layer slot (their structure is one graphdef)."""

    params: frozenset[str]  # layer parameter paths ("attn.q_proj", "mlp.down_proj", ...)
    block_in: int | None  # inputs per scale along the input axes (None: one per channel)
    tensor: int  # tensor-parallel ways: a scale's runs split over "tensor" like its weight
    activations: str | None  # quantization.FP8Scheme.activations
    activation_scale_ub: float | None = None

    def scale_grid(self, in_shape: tuple[int, ...], sharded: bool) -> tuple[int, ...]:
        """The scale's extent along a weight's input axes `in_shape` (`sharded`: the last
        input axis splits over "tensor"). All ones: one scale per output channel."""
        if self.block_in is None or self.block_in >= math.prod(in_shape):
            return (1,) * len(in_shape)
        last = in_shape[-1]
        run = math.gcd(self.block_in, last // (self.tensor if sharded else 1))
        return (*in_shape[:-1], last // run)


@dataclasses.dataclass(frozen=True)
class SlotFP8:
    """One layer slot's FP8 weights: the storage, and which of its scaled weights the slot
    holds in FP8. A slot that holds a layer whose checkpoint leaves a weight unquantized keeps
    that weight in the model's dtype, for every layer of the slot (its scales go unused)."""

    storage: FP8Storage
    stored: frozenset[str]


# --- host: quantization on load ---------------------------------------------------------------


def channel_scale(amax: np.ndarray) -> np.ndarray:
    """Scales that map each channel's largest |weight| to FP8_MAX (1 for an all-zero one)."""
    amax = np.asarray(amax, np.float32)
    return np.where(amax > 0, amax / np.float32(FP8_MAX), np.float32(1)).astype(np.float32)


def quantize(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """values / scale, clamped to +-FP8_MAX and rounded to the nearest float8_e4m3fn."""
    scaled = np.asarray(values, np.float32) / scale
    return np.clip(scaled, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)


# --- device: the matmul ---------------------------------------------------------------------


def gemm_mode() -> str:
    """ "w8a16" or "w8a8", from JAXPP_FP8_GEMM and the platform; read when a program is traced."""
    choice = os.environ.get("JAXPP_FP8_GEMM", "auto")
    if choice not in FP8_GEMM_CHOICES:
        raise ValueError(f"JAXPP_FP8_GEMM={choice!r}: expected one of {FP8_GEMM_CHOICES}")
    if choice != "auto":
        return choice
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None) if device.platform == "gpu" else None
    major_minor = tuple(int(p) for p in str(capability).split(".")[:2]) if capability else ()
    return "w8a8" if major_minor >= (8, 9) else "w8a16"


def dequantize(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """q * scale in float32, as `dtype`: the scale repeated over the inputs of each run."""
    for axis in range(scale.ndim):
        if 1 < scale.shape[axis] < q.shape[axis]:
            scale = jnp.repeat(scale, q.shape[axis] // scale.shape[axis], axis=axis)
    return (q.astype(jnp.float32) * scale).astype(dtype)


def project(
    x: jax.Array,
    w: jax.Array,
    n_in: int,
    scale: jax.Array | None = None,
    fp8: FP8Storage | None = None,
    input_scale: jax.Array | None = None,
) -> jax.Array:
    """y[..., *out] = sum over the weight's input axes of x[..., *in] w[*in, *out], with `w`
    dequantized by `scale` when it is FP8 (see the module docstring for the two ways)."""
    dims = ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ()))
    if w.dtype != FP8:
        return jax.lax.dot_general(x, w, dims)
    whole_channels = math.prod(scale.shape[:n_in]) == 1
    if fp8.activations is not None and whole_channels and gemm_mode() == "w8a8":
        return _fp8_gemm(x, w, n_in, scale, fp8, input_scale, dims)
    return jax.lax.dot_general(x, dequantize(w, scale, x.dtype), dims)


def _fp8_gemm(x, w, n_in, scale, fp8: FP8Storage, input_scale, dims) -> jax.Array:
    """Both operands FP8: x per token (or by the static input_scale), results in float32."""
    x32 = x.astype(jnp.float32)
    if input_scale is not None:
        x_scale = input_scale
    else:
        amax = jnp.max(jnp.abs(x32), axis=tuple(range(x.ndim - n_in, x.ndim)), keepdims=True)
        if fp8.activation_scale_ub is not None:
            amax = jnp.minimum(amax, fp8.activation_scale_ub)
        x_scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
    xq = jnp.clip(x32 / x_scale, -FP8_MAX, FP8_MAX).astype(FP8)
    y = jax.lax.dot_general(xq, w, dims, preferred_element_type=jnp.float32)
    out_shape = w.shape[n_in:]
    if jnp.ndim(x_scale):  # per token: [..., 1 (x n_in)] -> [..., 1 (x outputs)]
        x_scale = x_scale.reshape(x.shape[: x.ndim - n_in] + (1,) * len(out_shape))
    return (y * x_scale * scale.reshape(out_shape)).astype(x.dtype)
