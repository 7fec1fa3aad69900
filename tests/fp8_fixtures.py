"""Tiny FP8 checkpoints in the published formats, written from a tiny float checkpoint
(hf_fixtures.py), and the reference: the same model with its weights dequantized to float32.

The quantizer here follows the formats' own descriptions (shared/reference: round4 facts,
section 4), not jaxpp's code: q = clamp(w / s, -448, 448) rounded to float8_e4m3fn, w = q * s,
with s = amax / 448 per tensor, per output channel or per (rows x columns) block of the HF
[out, in] weight (edge blocks partial: the grid is rounded up).

    write_fp8_checkpoint(src, root, name, method, strategy, block=None, keep_float=...,
                         ignore=(), static_inputs=False, scale_dtype=np.float32)
        -> (fp8_dir, dequantized_dir)
    fake_quantized_copy(src, dst)   the float checkpoint with every decoder linear weight
                                    quantized per output channel and dequantized again (the
                                    reference of quantization="fp8" on load)
    replace_tensor(path, name, array_or_None)   break an FP8 file on purpose
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

FP8 = ml_dtypes.float8_e4m3fn
FP8_MAX = np.float32(448)


def is_linear(name: str) -> bool:
    """A Linear weight of the decoder or the LM head (embedding and norms are not Linear)."""
    return name.endswith(".weight") and name != "model.embed_tokens.weight" and "norm" not in name


def quantize(w: np.ndarray, strategy: str, block: tuple[int, int] | None, scale_dtype=np.float32):
    """(q, s, w_deq) of an [out, in] float32 weight: s (as `scale_dtype`) shaped (1, 1),
    (out, 1) or the block grid, and w_deq = q * s, in float32."""
    out, inputs = w.shape
    if strategy == "tensor":
        grid, cell = (1, 1), (out, inputs)
    elif strategy == "channel":
        grid, cell = (out, 1), (1, inputs)
    else:
        cell = block
        grid = (math.ceil(out / block[0]), math.ceil(inputs / block[1]))
    padded = np.zeros((grid[0] * cell[0], grid[1] * cell[1]), np.float32)
    padded[:out, :inputs] = np.abs(w)
    amax = padded.reshape(grid[0], cell[0], grid[1], cell[1]).max(axis=(1, 3))
    s = np.where(amax > 0, amax / FP8_MAX, 1).astype(scale_dtype)
    full = np.repeat(np.repeat(s.astype(np.float32), cell[0], 0), cell[1], 1)[:out, :inputs]
    q = np.clip(w / full, -FP8_MAX, FP8_MAX).astype(FP8)
    return q, s, q.astype(np.float32) * full


def _config(method, strategy, block, ignore, static_inputs) -> dict:
    if method == "compressed-tensors":
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy,
                   "dynamic": False}  # fmt: skip
        if block:
            weights["block_structure"] = list(block)
        inputs = (
            {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}
            if static_inputs
            else {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}
        )
        return {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": weights,
                    "input_activations": inputs,
                    "output_activations": None,
                }
            },
            "ignore": list(ignore),
        }
    if method == "fp8":
        return {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(block) if block else None,
            "modules_to_not_convert": list(ignore),
        }
    assert method == "fbgemm_fp8", method
    return {
        "quant_method": "fbgemm_fp8",
        "activation_scale_ub": 1200.0,
        "modules_to_not_convert": list(ignore),
    }


def write_fp8_checkpoint(
    src: Path,
    root: Path,
    name: str,
    method: str,
    strategy: str,
    block: tuple[int, int] | None = None,
    keep_float: Callable[[str], bool] = lambda module: module == "lm_head",
    ignore: tuple[str, ...] = ("lm_head",),
    static_inputs: bool = False,
    scale_dtype=np.float32,
) -> tuple[Path, Path]:
    """An FP8 copy of checkpoint `src` under root/name and its dequantized twin under
    root/name-dequantized. `keep_float(module)` says which Linear modules stay float: what
    `ignore` (written into quantization_config as given) means in the format's own rule."""
    fp8_dir, ref_dir = Path(root) / name, Path(root) / f"{name}-dequantized"
    if (fp8_dir / "config.json").exists():
        return fp8_dir, ref_dir
    for d in (fp8_dir, ref_dir):
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(src, d)
    tensors = load_file(str(src / "model.safetensors"))
    stored, dequantized = {}, {}
    rng = np.random.default_rng(7)
    scale_name = "weight_scale_inv" if method == "fp8" else "weight_scale"
    for key, w in tensors.items():
        module = key.removesuffix(".weight")
        stored[key], dequantized[key] = w, w
        if not is_linear(key) or keep_float(module):
            continue
        q, s, dequantized[key] = quantize(w.astype(np.float32), strategy, block, scale_dtype)
        if method == "fp8" and strategy == "tensor":
            s = s.reshape(())  # transformers' per-tensor weight_scale_inv is a scalar
        elif method == "compressed-tensors" and strategy == "tensor":
            s = s.reshape(1)
        stored[key], stored[f"{module}.{scale_name}"] = q, s
        if static_inputs:
            stored[f"{module}.input_scale"] = rng.uniform(0.01, 0.05, 1).astype(scale_dtype)
    save_file(stored, str(fp8_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(dequantized, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"] = _config(method, strategy, block, ignore, static_inputs)
    (fp8_dir / "config.json").write_text(json.dumps(config, indent=2))
    return fp8_dir, ref_dir


def fake_quantized_copy(src: Path, dst: Path) -> Path:
    """`src` with every decoder Linear weight (not the LM head, not an MoE router) quantized
    per output channel and dequantized again: what quantization="fp8" computes with."""
    if (dst / "config.json").exists():
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    for key, w in tensors.items():
        router = key.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))
        if key.startswith("model.layers.") and is_linear(key) and not router:
            # Fused experts are [E, out, in]: each expert's own channels.
            tensors[key] = np.stack([_fake(e) for e in w]) if w.ndim == 3 else _fake(w)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _fake(w: np.ndarray) -> np.ndarray:
    return quantize(w.astype(np.float32), "channel", None)[2]


def replace_tensor(path: Path, name: str, array: np.ndarray | None) -> None:
    """Rewrite one .safetensors file in place with tensor `name` replaced (None: dropped);
    through torch, whose safetensors reader knows float8 (numpy's does not)."""
    import torch
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    tensors = load_torch(str(path))
    assert name in tensors, sorted(tensors)
    if array is None:
        del tensors[name]
    else:
        tensors[name] = torch.from_numpy(np.ascontiguousarray(array))
    save_torch(tensors, str(path), metadata={"format": "pt"})
