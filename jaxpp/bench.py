"""Offline throughput benchmark, in the manner of vLLM's and SGLang's offline benchmarks.

Random prompts (token ids drawn uniformly from the vocabulary, seeded) are generated greedily with
`ignore_eos`, so every request produces exactly its requested number of tokens. A warm-up pass
runs one batch of every shape bucket the timed pass will use (so compilation is excluded), then
the timed pass runs every batch. Reported: duration, requests/s, input/output/total tokens/s,
time to first token and time per output token (mean, p50, p99), the pipeline's measured bubble
fraction, per-device memory, and how many XLA compilations happened during the timed pass (it
must be 0 after the warm-up, and in any case no more than the number of shape buckets).

    python -m jaxpp.bench --preset llama-32m --input-len 64 --output-len 128 \\
        --num-prompts 32 --dtype float32 --compare-hf
    jaxpp bench --model path/to/hf-dir --pp 2 --json

`--preset NAME` reads configs/NAME.json (or any path to a config.json-like file) and writes a
randomly initialised checkpoint for it once, with transformers' `from_config(...)
.save_pretrained`, into `~/.cache/jaxpp/presets/NAME-<hash>` (`--cache-dir` or
`$JAXPP_CACHE_DIR` to move it). No tokenizer is needed: prompts are token ids.

`--compare-hf` runs transformers `generate` on the same model, same prompts, same batches (left
padded, with an attention mask), greedy, in the same process, and prints the ratio of output
tokens/s jaxpp / transformers. `--measure-bandwidth` times a large device copy and reports the
decode step's achieved memory bandwidth against it; prefill MFU is reported when the peak
FLOP/s is known (`--peak-tflops`, or an H100/H200 in bf16).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CACHE = Path.home() / ".cache" / "jaxpp" / "presets"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# Peak dense bf16 FLOP/s (no sparsity) by device kind substring.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12}


# --------------------------------------------------------------------------------------------
# command line


def add_parser(subparsers) -> None:
    """Register the `bench` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser(
        "bench",
        help="offline throughput benchmark (random prompts, greedy, ignore_eos)",
        description=__doc__.split("\n\n")[0],
    )
    _add_arguments(p)
    p.set_defaults(func=run, handler=run)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local Hugging Face model directory")
    src.add_argument("--preset", help="name of configs/NAME.json (random weights), or a path")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where preset checkpoints are written (default ~/.cache/jaxpp/presets)",
    )
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument(
        "--range-ratio", type=float, default=0.0, help="lengths uniform in [len*(1-r), len*(1+r)]"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="prompts per generate call (default: all of them)",
    )
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--num-microbatches", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--decode-chunk", type=int, default=32)
    p.add_argument(
        "--compare-hf",
        action="store_true",
        help="also run transformers generate on the same model and prompts",
    )
    p.add_argument(
        "--hf-attn",
        default="eager",
        choices=["eager", "sdpa"],
        help="transformers attention implementation (default eager)",
    )
    p.add_argument("--hf-device", default="auto", help="torch device: auto, cpu, cuda")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch.set_num_threads for the transformers run (default: torch's)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed passes per engine; the fastest is reported (noisy machines)",
    )
    p.add_argument(
        "--measure-bandwidth",
        action="store_true",
        help="time a large device-to-device copy; report decode bandwidth vs it",
    )
    p.add_argument(
        "--bandwidth-mb",
        type=int,
        default=1024,
        help="size of the array --measure-bandwidth copies (MiB)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak dense FLOP/s of one device in TFLOP/s, for prefill MFU",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object, nothing else")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxpp.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(parser)
    return run(parser.parse_args(argv))


# --------------------------------------------------------------------------------------------
# inputs


@dataclasses.dataclass
class Request:
    prompt: list[int]
    output_len: int


def random_requests(
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    vocab_size: int,
    seed: int = 0,
) -> list[Request]:
    """vLLM's random dataset: lengths uniform in [len*(1-r), len*(1+r)], ids uniform."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--range-ratio={range_ratio} is invalid: expected 0 <= r < 1")
    rng = np.random.default_rng(seed)

    def lengths(n: int) -> np.ndarray:
        lo, hi = max(1, math.floor(n * (1 - range_ratio))), max(1, math.ceil(n * (1 + range_ratio)))
        return rng.integers(lo, hi + 1, size=num_prompts)

    ins, outs = lengths(input_len), lengths(output_len)
    return [
        Request(rng.integers(0, vocab_size, size=int(i)).tolist(), int(o))
        for i, o in zip(ins, outs, strict=True)
    ]


def preset_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A checkpoint dir with random weights for configs/NAME.json, written on first use."""
    path = Path(name)
    if not path.suffix == ".json":
        path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ValueError(f"preset {name!r} not found ({path}); known presets: {known}")
    text = path.read_text()
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    root = Path(cache_dir or os.environ.get("JAXPP_CACHE_DIR") or DEFAULT_CACHE)
    out = root / f"{path.stem}-{digest}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    _write_random_checkpoint(json.loads(text), out)
    return out


def _write_random_checkpoint(raw: dict, out: Path) -> None:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    arch = raw["architectures"][0]
    config_cls = transformers.AutoConfig.for_model(raw["model_type"]).__class__
    config = config_cls.from_dict(raw)
    dtype = getattr(torch, raw.get("dtype") or raw.get("torch_dtype") or "float32")
    torch.manual_seed(0)
    model = getattr(transformers, arch)._from_config(config, dtype=dtype).eval()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    del model
    gc.collect()
    if out.exists():  # another process finished first
        import shutil  # noqa: PLC0415

        shutil.rmtree(tmp, ignore_errors=True)
        return
    tmp.rename(out)


# --------------------------------------------------------------------------------------------
# compilation counter


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring duration events) while active."""

    _registered = False
    _active: list[CompileCounter] = []

    def __init__(self):
        self.count = 0
        self.names: list[str] = []
        self.seconds = 0.0

    @classmethod
    def _listener(cls, event: str, duration: float, **kwargs) -> None:
        if event != COMPILE_EVENT:
            return
        for counter in cls._active:
            counter.count += 1
            counter.seconds += duration
            counter.names.append(str(kwargs.get("fun_name", "?")))

    def __enter__(self) -> CompileCounter:
        import jax  # noqa: PLC0415

        if not CompileCounter._registered:
            jax.monitoring.register_event_duration_secs_listener(CompileCounter._listener)
            CompileCounter._registered = True
        CompileCounter._active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        CompileCounter._active.remove(self)


# --------------------------------------------------------------------------------------------
# the jaxpp run


def bucket_key(llm, batch: list[Request]) -> tuple:
    """The shapes `LLM._generate_wave` compiles for this batch."""
    lens = [len(r.prompt) for r in batch]
    budgets = [
        min(r.output_len, llm.max_model_len - n + 1) for r, n in zip(batch, lens, strict=True)
    ]
    return llm.wave_shape(lens, budgets)


def _batches(requests: list[Request], batch_size: int) -> list[list[Request]]:
    return [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]


def _params(batch: list[Request]):
    from jaxpp.config import SamplingParams  # noqa: PLC0415

    return [
        SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True) for r in batch
    ]


@dataclasses.dataclass
class PassResult:
    duration: float
    outputs: list  # RequestOutput per request, in request order
    stats: dict  # summed pipeline ticks over the waves
    compilations: int
    compiled: list[str]
    waves: list[dict]  # per wave: ttft, decode_time, decode_ticks, rows, cache_len


def run_jaxpp_pass(llm, batches: list[list[Request]]) -> PassResult:
    keys = ("prefill_ticks", "prefill_busy_stage_ticks", "decode_ticks", "decode_busy_stage_ticks")
    totals = dict.fromkeys(keys, 0)
    outputs, waves = [], []
    with CompileCounter() as counter:
        start = time.perf_counter()
        for batch in batches:
            outs = llm.generate([r.prompt for r in batch], _params(batch))
            for k in keys:
                totals[k] += int(llm.last_run_stats.get(k, 0))
            m = outs[0].metrics
            waves.append(
                {
                    "requests": len(batch),
                    "ttft": m.time_to_first_token,
                    "decode_time": m.decode_time,
                    "decode_ticks": int(llm.last_run_stats.get("decode_ticks", 0)),
                    "prefill_ticks": int(llm.last_run_stats.get("prefill_ticks", 0)),
                    "bucket": list(bucket_key(llm, batch)),
                }
            )
            outputs += outs
        duration = time.perf_counter() - start
    for name in ("prefill", "decode"):
        ticks, busy = totals[f"{name}_ticks"], totals[f"{name}_busy_stage_ticks"]
        totals[f"{name}_bubble_fraction"] = 1 - busy / (ticks * llm.pp) if ticks else 0.0
    return PassResult(duration, outputs, totals, counter.count, counter.names, waves)


def warm_up(llm, batches: list[list[Request]]) -> tuple[int, float, int]:
    """Run the first batch of each shape bucket. Returns (buckets, seconds, compilations)."""
    seen: dict[tuple, list[Request]] = {}
    for batch in batches:
        seen.setdefault(bucket_key(llm, batch), batch)
    start = time.perf_counter()
    with CompileCounter() as counter:
        for batch in seen.values():
            llm.generate([r.prompt for r in batch], _params(batch))
    return len(seen), time.perf_counter() - start, counter.count


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    a = np.asarray(values, np.float64)
    return {
        "mean": float(a.mean()),
        "p50": float(np.percentile(a, 50)),
        "p99": float(np.percentile(a, 99)),
    }


def summarize(requests: list[Request], result: PassResult) -> dict:
    input_tokens = sum(len(r.prompt) for r in requests)
    output_tokens = sum(len(o.outputs[0].token_ids) for o in result.outputs)
    ttft, tpot = [], []
    for o in result.outputs:
        n = len(o.outputs[0].token_ids)
        ttft.append(o.metrics.time_to_first_token)
        if n > 1:
            tpot.append(o.metrics.decode_time / (n - 1))
    d = result.duration
    decode_s = sum(w["decode_time"] for w in result.waves)
    return {
        "duration_s": d,
        "requests_per_s": len(requests) / d,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "input_tokens_per_s": input_tokens / d,
        "output_tokens_per_s": output_tokens / d,
        "total_tokens_per_s": (input_tokens + output_tokens) / d,
        # Tokens after each request's first, over the time the decode ring ran.
        "decode_tokens_per_s": (output_tokens - len(requests)) / decode_s if decode_s else None,
        "ttft_s": _percentiles(ttft),
        "tpot_s": _percentiles(tpot),
    }


# --------------------------------------------------------------------------------------------
# transformers


class HFRunner:
    """transformers `generate` on the same checkpoint: greedy, batched with left padding and an
    attention mask, `max(output_len)` new tokens per batch (eos ignored, as in the jaxpp run)."""

    def __init__(
        self,
        model_dir: Path,
        dtype: str,
        attn: str,
        device: str = "auto",
        threads: int | None = None,
    ):
        import torch  # noqa: PLC0415
        from transformers import AutoModelForCausalLM  # noqa: PLC0415

        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=getattr(torch, dtype), attn_implementation=attn
        )
        model.generation_config.eos_token_id = None  # ignore_eos
        self.model = model.to(device).eval()

    def generate_batch(self, batch: list[Request]) -> list[list[int]]:
        import torch  # noqa: PLC0415

        width = max(len(r.prompt) for r in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt) :] = 1
        new = max(r.output_len for r in batch)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                do_sample=False,
                max_new_tokens=new,
                min_new_tokens=new,
                eos_token_id=None,
                pad_token_id=0,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return [out[i, width : width + r.output_len].tolist() for i, r in enumerate(batch)]

    def run_pass(self, batches: list[list[Request]]) -> tuple[float, list[list[int]]]:
        start = time.perf_counter()
        tokens = []
        for batch in batches:
            tokens += self.generate_batch(batch)
        return time.perf_counter() - start, tokens


# --------------------------------------------------------------------------------------------
# roofline figures


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


def decode_bandwidth(llm, result: PassResult, dtype_bytes: int) -> dict:
    """Bytes one device reads per decode tick (its weight shard, its vocab shard of the LM head,
    the KV cache of the micro-batch it serves, over the whole cache length as the engine reads
    it), divided by the measured tick time."""
    nums = model_numbers(llm.config)
    n_dev = llm.pp * llm.tp
    ticks = sum(w["decode_ticks"] for w in result.waves)
    seconds = sum(w["decode_time"] for w in result.waves)
    if not ticks or not seconds:
        return {}
    moved = 0.0
    for w in result.waves:
        rows, _, cache_len, _ = w["bucket"]
        rows_per_tick = rows // llm.dp // llm.microbatches
        weights = (nums["layer_params"] + nums["head_params"]) / n_dev
        kv = nums["kv_elems_per_token"] / n_dev * rows_per_tick * cache_len
        moved += (weights + kv) * dtype_bytes * w["decode_ticks"]
    per_tick = moved / ticks
    tick_s = seconds / ticks
    return {
        "bytes_per_tick_per_device": per_tick,
        "tick_s": tick_s,
        "bytes_per_s_per_device": per_tick / tick_s,
    }


# --------------------------------------------------------------------------------------------
# main


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _ensure_cpu_devices(needed: int) -> None:
    """Simulate enough CPU devices for pp*tp*dp when JAX has not started yet."""
    import jax  # noqa: PLC0415
    from jax._src import xla_bridge  # noqa: PLC0415

    if (
        needed > 1
        and not xla_bridge.backends_are_initialized()
        and not os.environ.get("JAX_PLATFORMS", "").startswith(("cuda", "gpu", "tpu"))
    ):
        if jax.config.jax_num_cpu_devices < needed and "JAX_NUM_CPU_DEVICES" not in os.environ:
            jax.config.update("jax_num_cpu_devices", needed)


def run(args: argparse.Namespace) -> int:
    for name in ("input_len", "output_len", "num_prompts", "repeats"):
        if getattr(args, name) < 1:
            print(
                f"--{name.replace('_', '-')}={getattr(args, name)} is invalid: expected >= 1",
                file=sys.stderr,
            )
            return 2
    if args.batch_size is not None and args.batch_size < 1:
        print(f"--batch-size={args.batch_size} is invalid: expected >= 1", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    _ensure_cpu_devices(args.pp * args.tp * args.dp)
    import jax  # noqa: PLC0415

    from jaxpp.config import ModelConfig  # noqa: PLC0415
    from jaxpp.engine import LLM  # noqa: PLC0415

    log = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))
    try:
        model_dir = Path(args.model) if args.model else preset_dir(args.preset, args.cache_dir)
        cfg = ModelConfig.from_dir(model_dir)
        requests = random_requests(
            args.num_prompts,
            args.input_len,
            args.output_len,
            args.range_ratio,
            cfg.vocab_size,
            args.seed,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    batch_size = args.batch_size or len(requests)
    batches = _batches(requests, batch_size)
    log(
        f"model {model_dir} ({model_numbers(cfg)['params'] / 1e6:.1f}M params), "
        f"{len(requests)} prompts, batch {batch_size}, devices {jax.devices()[0].platform} "
        f"x{len(jax.devices())}"
    )

    t = time.perf_counter()
    llm = LLM(
        model_dir,
        dtype=args.dtype,
        pp=args.pp,
        tp=args.tp,
        dp=args.dp,
        num_microbatches=args.num_microbatches,
        max_model_len=args.max_model_len,
        decode_chunk=args.decode_chunk,
        max_num_seqs=max(batch_size, 1),
        seed=args.seed,
    )
    load_s = time.perf_counter() - t
    dtype_name = jax.numpy.dtype(llm.dtype).name
    log(
        f"loaded in {load_s:.1f}s: pp={llm.pp} tp={llm.tp} dp={llm.dp} "
        f"microbatches={llm.microbatches} dtype={dtype_name}"
    )

    longest = max(len(r.prompt) for r in requests)
    if longest > llm.max_model_len:
        print(
            f"error: a prompt has {longest} tokens, more than max_model_len="
            f"{llm.max_model_len}: lower --input-len/--range-ratio or raise --max-model-len",
            file=sys.stderr,
        )
        return 2
    buckets, warm_s, warm_compiles = warm_up(llm, batches)
    log(f"warm-up: {buckets} shape bucket(s), {warm_compiles} compilations, {warm_s:.1f}s")

    hf = None
    if args.compare_hf:
        hf = HFRunner(model_dir, dtype_name, args.hf_attn, args.hf_device, args.torch_threads)
        hf.generate_batch([dataclasses.replace(batches[0][0], output_len=2)])  # warm-up
        log(f"transformers loaded: attn={args.hf_attn} device={hf.device}")
    # Timed passes; with --compare-hf they alternate with the transformers passes, so that
    # both engines see the same machine load (the fastest pass of each is reported).
    results, hf_runs = [], []
    for i in range(args.repeats):
        results.append(run_jaxpp_pass(llm, batches))
        log(f"jaxpp pass {i + 1}/{args.repeats}: {results[-1].duration:.2f}s")
        if hf is not None:
            hf_runs.append(hf.run_pass(batches))
            log(f"transformers pass {i + 1}/{args.repeats}: {hf_runs[-1][0]:.2f}s")
    best = min(results, key=lambda r: r.duration)
    compilations = sum(r.compilations for r in results)
    report = {
        "engine": "jaxpp",
        "date": time.strftime("%Y-%m-%d"),
        "commit": _git_commit(),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "jax_backend": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind,
            "jax_devices": len(jax.devices()),
        },
        "model": str(model_dir),
        "params": model_numbers(cfg)["params"],
        "args": {k: v for k, v in vars(args).items() if k not in ("func", "handler")},
        "layout": {
            "pp": llm.pp,
            "tp": llm.tp,
            "dp": llm.dp,
            "microbatches": llm.microbatches,
            "partition": list(llm.partition),
            "dtype": dtype_name,
            "decode_chunk": llm.decode_chunk,
        },
        "num_prompts": len(requests),
        "batch_size": batch_size,
        "load_s": load_s,
        "warmup_s": warm_s,
        "warmup_compilations": warm_compiles,
        "shape_buckets": buckets,
        "compilations_timed": compilations,
        "compiled_timed": sorted(set(n for r in results for n in r.compiled)),
        "repeats": [r.duration for r in results],
        **summarize(requests, best),
        "pipeline": best.stats,
        "waves": best.waves,
        "device_memory": llm.device_memory(),
    }
    dtype_bytes = jax.numpy.dtype(llm.dtype).itemsize
    report["decode_bandwidth"] = decode_bandwidth(llm, best, dtype_bytes)
    peak = peak_flops(dtype_name, args.peak_tflops)
    prefill_s = sum(w["ttft"] for w in best.waves)
    flops = prefill_flops(cfg, [len(r.prompt) for r in requests])
    report["prefill"] = {
        "flops": flops,
        "seconds": prefill_s,
        "flops_per_s": flops / prefill_s if prefill_s else None,
        "peak_flops_per_s": peak,
        "mfu": flops / prefill_s / peak if peak and prefill_s else None,
    }
    if args.measure_bandwidth:
        bw = measure_bandwidth(args.bandwidth_mb)
        report["copy_bandwidth"] = bw
        if report["decode_bandwidth"]:
            report["decode_bandwidth"]["fraction_of_copy"] = (
                report["decode_bandwidth"]["bytes_per_s_per_device"] / bw["bytes_per_s"]
            )

    if hf is not None:
        hf_s, hf_tokens = min(hf_runs, key=lambda r: r[0])
        out_tokens = sum(r.output_len for r in requests)
        in_tokens = sum(len(r.prompt) for r in requests)
        same = sum(
            h == list(o.outputs[0].token_ids) for h, o in zip(hf_tokens, best.outputs, strict=True)
        )
        report["hf"] = {
            "engine": f"transformers {__import__('transformers').__version__} generate",
            "dtype": dtype_name,
            "attn_implementation": args.hf_attn,
            "device": hf.device,
            "torch_threads": hf.threads,
            "repeats": [r[0] for r in hf_runs],
            "duration_s": hf_s,
            "requests_per_s": len(requests) / hf_s,
            "output_tokens_per_s": out_tokens / hf_s,
            "total_tokens_per_s": (in_tokens + out_tokens) / hf_s,
            "same_tokens_fraction": same / len(requests),
        }
        report["ratio_output_tokens_per_s"] = (
            report["output_tokens_per_s"] / report["hf"]["output_tokens_per_s"]
        )
        report["ratio_total_tokens_per_s"] = (
            report["total_tokens_per_s"] / report["hf"]["total_tokens_per_s"]
        )
        del hf
        gc.collect()

    if args.json:
        print(json.dumps(report, default=_jsonable))
    else:
        _print_report(report)
    return 0


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    return str(x)


def _ms(x):
    return "n/a" if x is None else f"{1e3 * x:.2f}"


def _print_report(r: dict) -> None:
    lay = r["layout"]
    print(
        f"\n==== jaxpp offline throughput ({r['num_prompts']} prompts, batch {r['batch_size']},"
        f" pp={lay['pp']} tp={lay['tp']} dp={lay['dp']} M={lay['microbatches']}"
        f" {lay['dtype']}) ===="
    )
    print(
        f"duration               {r['duration_s']:.3f} s"
        + (
            f"  (passes: {', '.join(f'{d:.3f}' for d in r['repeats'])})"
            if len(r["repeats"]) > 1
            else ""
        )
    )
    print(f"requests/s             {r['requests_per_s']:.2f}")
    print(f"input tokens/s         {r['input_tokens_per_s']:.1f}  ({r['input_tokens']} tokens)")
    print(f"output tokens/s        {r['output_tokens_per_s']:.1f}  ({r['output_tokens']} tokens)")
    print(f"total tokens/s         {r['total_tokens_per_s']:.1f}")
    if r["decode_tokens_per_s"]:
        print(f"decode tokens/s        {r['decode_tokens_per_s']:.1f}  (decode ring time only)")
    for key, name in (("ttft_s", "TTFT"), ("tpot_s", "TPOT")):
        s = r[key]
        print(f"{name} ms mean/p50/p99  {_ms(s['mean'])} / {_ms(s['p50'])} / {_ms(s['p99'])}")
    p = r["pipeline"]
    print(
        f"prefill ticks {p['prefill_ticks']} busy stage-ticks {p['prefill_busy_stage_ticks']}"
        f" bubble {p['prefill_bubble_fraction']:.3f}"
    )
    print(
        f"decode  ticks {p['decode_ticks']} busy stage-ticks {p['decode_busy_stage_ticks']}"
        f" bubble {p['decode_bubble_fraction']:.3f}"
    )
    print(
        f"XLA compilations: warm-up {r['warmup_compilations']}, timed "
        f"{r['compilations_timed']} (shape buckets: {r['shape_buckets']})"
    )
    for m in r["device_memory"]:
        print(
            f"device {m['device']}: params {m['params'] / 2**20:.1f} MiB, "
            f"KV cache {m['kv_cache'] / 2**20:.1f} MiB"
        )
    bw = r.get("decode_bandwidth") or {}
    if bw:
        line = (
            f"decode: {bw['tick_s'] * 1e3:.2f} ms/tick, "
            f"{bw['bytes_per_tick_per_device'] / 2**20:.1f} MiB/tick/device -> "
            f"{bw['bytes_per_s_per_device'] / 1e9:.1f} GB/s per device"
        )
        if "fraction_of_copy" in bw:
            line += (
                f" = {100 * bw['fraction_of_copy']:.0f}% of copy bandwidth "
                f"{r['copy_bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s"
            )
        print(line)
    pf = r["prefill"]
    if pf["flops_per_s"]:
        line = f"prefill: {pf['flops_per_s'] / 1e12:.3f} TFLOP/s"
        if pf["mfu"] is not None:
            line += f", MFU {100 * pf['mfu']:.1f}% of {pf['peak_flops_per_s'] / 1e12:.0f} TFLOP/s"
        print(line)
    if "hf" in r:
        h = r["hf"]
        print(
            f"---- {h['engine']} ({h['dtype']}, attn={h['attn_implementation']}, "
            f"{h['device']}, {h['torch_threads']} threads) ----"
        )
        print(f"duration               {h['duration_s']:.3f} s")
        print(f"output tokens/s        {h['output_tokens_per_s']:.1f}")
        print(f"same greedy tokens     {100 * h['same_tokens_fraction']:.0f}% of requests")
        print(f"ratio jaxpp/transformers output tokens/s: {r['ratio_output_tokens_per_s']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
