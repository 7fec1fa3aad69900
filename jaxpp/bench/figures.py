"""Roofline figures: the device copy rate, parameter counts, prefill FLOPs and MFU, decode
bytes per tick."""

from __future__ import annotations

import time

import numpy as np

from jaxpp.bench.serving import PassResult

# Peak dense bf16 FLOP/s (no sparsity) by device kind substring.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12}


def measure_bandwidth(mbytes: int = 1024, iters: int = 10) -> dict:
    """Device memory bandwidth from a jitted elementwise copy of a large array (device 0).

    Bytes moved = read + write = 2 x size per call; the best of `iters` calls is kept.
    """
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    n = mbytes * 2**20 // 4
    dev = jax.devices()[0]
    x = jax.device_put(jnp.ones((n,), jnp.float32), dev)
    copy = jax.jit(lambda a: a + 1.0)
    copy(x).block_until_ready()
    best = float("inf")
    for _ in range(iters):
        t = time.perf_counter()
        copy(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    del x
    return {
        "bytes": 2 * n * 4,
        "seconds": best,
        "bytes_per_s": 2 * n * 4 / best,
        "device": str(dev.device_kind),
    }


def model_numbers(cfg) -> dict:
    """Parameter counts (per layer, LM head, embedding) and KV bytes per token per element."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    h, kv = cfg.num_heads, cfg.num_kv_heads
    per_layer = d * h * hd * 2 + d * kv * hd * 2 + 3 * d * f + 2 * d
    if cfg.qk_norm:
        per_layer += 2 * hd
    if cfg.qkv_bias:
        per_layer += (h + 2 * kv) * hd
    head = d * cfg.vocab_size
    embed = d * cfg.vocab_size
    total = per_layer * cfg.num_layers + embed + (0 if cfg.tie_word_embeddings else head) + d
    return {
        "params": total,
        "layer_params": per_layer * cfg.num_layers,
        "head_params": head,
        "kv_elems_per_token": 2 * cfg.num_layers * kv * hd,
    }


def prefill_flops(cfg, prompt_lens: list[int]) -> float:
    """Useful prefill FLOPs: 2*params*tokens for the layers, the LM head on the last token of
    each prompt (all the generate path computes), causal attention QK^T and PV."""
    nums = model_numbers(cfg)
    toks = sum(prompt_lens)
    attn = sum(
        2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * n * (n + 1) / 2 for n in prompt_lens
    )
    return 2 * nums["layer_params"] * toks + 2 * nums["head_params"] * len(prompt_lens) + attn


def peak_flops(dtype_name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    import jax  # noqa: PLC0415

    kind = jax.devices()[0].device_kind
    if dtype_name in ("bfloat16", "float16"):
        for key, value in PEAK_BF16_FLOPS.items():
            if key in kind:
                return value
    return None


def decode_bandwidth(llm, result: PassResult) -> dict:
    """Bytes one device reads per tick on average (its weight shard, its vocab shard of the LM
    head, the live KV of the rows it serves: each token attends to its position's worth of
    cache), divided by the measured tick time. Prefill chunks count as ticks too: this is a
    decode figure for runs whose prompts are short next to their outputs."""
    ticks = result.stats["ticks"]
    if not ticks:
        return {}
    nums = model_numbers(llm.config)
    devices = llm.pp * llm.tp
    dtype_bytes = np.dtype(llm.dtype).itemsize
    weights = (nums["layer_params"] + nums["head_params"]) / devices * dtype_bytes
    kv_read = sum(
        sum(len(r.prompt) + i for i in range(len(o.outputs[0].token_ids)))
        for r, o in zip(result.requests, result.outputs, strict=True)
    )
    kv = kv_read * nums["kv_elems_per_token"] * dtype_bytes / devices / llm.dp
    per_tick = weights + kv / ticks
    tick_s = result.duration / ticks
    return {
        "bytes_per_tick_per_device": per_tick,
        "tick_s": tick_s,
        "bytes_per_s_per_device": per_tick / tick_s,
    }
