"""Serving benchmark: requests arrive (all at once, at a Poisson rate, or from a trace) and flow
through the continuous-batching ring; optionally transformers `generate` on the same model and
prompts in the same process, for a ratio.

Requests are greedy with `ignore_eos`, so each produces exactly its requested number of tokens:
random prompts (token ids drawn uniformly from the vocabulary, seeded; vLLM's random dataset)
or the lines of a trace in LLMServingSim's format (`--trace FILE.jsonl`: one request per line,
`{"input_toks": 512, "output_toks": 128, "arrival_time_ns": 0}`, optional `input_tok_ids`).
A warm-up compiles every step program the run can use (one per decode width, a fixed set), then
the timed pass admits each request at its arrival time and prints an interval log in
LLMServingSim's manner, then:

- duration, requests/s, input/output/total tokens/s;
- TTFT, TPOT and end-to-end latency (mean, p50, p99), measured from each request's arrival;
- slot occupancy (decode rows that produced a token / decode rows that left the last stage),
  also while requests were queued, and the measured bubble fraction of the ring;
- the device's idle time between ring calls (an upper bound polled by the host), the step
  programs compiled and the XLA compilations during the timed pass (0 after the warm-up);
- per-device memory, decode bandwidth and prefill FLOP/s.

    jaxpp bench --preset llama-32m --input-len 264 --output-len 132 --range-ratio 0.94 \\
        --num-prompts 256 --batch-size 32 --dtype float32 --compare-hf
    jaxpp bench --model path/to/hf-dir --pp 4 --trace requests.jsonl --json

`--preset NAME` reads configs/NAME.json (or any path to a config.json-like file) and writes a
randomly initialised checkpoint for it once (sharded safetensors, drawn on the GPU when torch
has one) into `~/.cache/jaxpp/presets/NAME-<hash>` (`--cache-dir` or `$JAXPP_CACHE_DIR` to move
it). No tokenizer is needed: prompts are token ids.

`--batch-size N` is what each engine may hold at once: jaxpp's sequence slots (max_num_seqs)
and transformers' batch (requests in arrival order, left padded, with an attention mask; its
default attention, sdpa). `--measure-bandwidth` times a large device copy and reports decode
bandwidth against it; prefill FLOP/s is reported with MFU when the peak is known
(`--peak-tflops`, or an H100/H200 in bf16).
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
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CACHE = Path.home() / ".cache" / "jaxpp" / "presets"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# Peak dense bf16 FLOP/s (no sparsity) by device kind substring.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12}
TRACE_FIELDS = ("input_toks", "output_toks", "arrival_time_ns")


# --------------------------------------------------------------------------------------------
# command line


def add_parser(subparsers) -> None:
    """Register the `bench` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser(
        "bench",
        help="serving benchmark (random or traced requests, greedy, ignore_eos)",
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
    p.add_argument("--trace", help="JSONL trace of requests (LLMServingSim format)")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument(
        "--range-ratio", type=float, default=0.0, help="lengths uniform in [len*(1-r), len*(1+r)]"
    )
    p.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="random requests arrive as a Poisson process of this rate (req/s; default: all at"
        " once)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="sequences each engine holds at once: jaxpp's slots, transformers' batch "
        "(default: jaxpp's default slots, transformers 32)",
    )
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--num-microbatches", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per chunk")
    p.add_argument("--decode-chunk", type=int, default=16, help="ring rounds per call at most")
    p.add_argument(
        "--log-interval", type=float, default=5.0, help="seconds between interval log lines"
    )
    p.add_argument(
        "--compare-hf",
        action="store_true",
        help="also run transformers generate on the same model and prompts",
    )
    p.add_argument(
        "--hf-attn",
        default="sdpa",
        choices=["eager", "sdpa"],
        help="transformers attention implementation (default sdpa, what a user gets)",
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
    arrival: float = 0.0  # seconds after the start of the run


def random_requests(
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    vocab_size: int,
    seed: int = 0,
    request_rate: float = math.inf,
) -> list[Request]:
    """vLLM's random dataset: lengths uniform in [len*(1-r), len*(1+r)], ids uniform; arrivals
    all at 0, or a Poisson process of `request_rate` per second."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--range-ratio={range_ratio} is invalid: expected 0 <= r < 1")
    if not request_rate > 0:
        raise ValueError(f"--request-rate={request_rate} is invalid: expected > 0")
    rng = np.random.default_rng(seed)

    def lengths(n: int) -> np.ndarray:
        lo, hi = max(1, math.floor(n * (1 - range_ratio))), max(1, math.ceil(n * (1 + range_ratio)))
        return rng.integers(lo, hi + 1, size=num_prompts)

    ins, outs = lengths(input_len), lengths(output_len)
    arrivals = np.zeros(num_prompts)
    if math.isfinite(request_rate):
        arrivals = np.cumsum(rng.exponential(1 / request_rate, size=num_prompts))
    return [
        Request(rng.integers(0, vocab_size, size=int(i)).tolist(), int(o), float(a))
        for i, o, a in zip(ins, outs, arrivals, strict=True)
    ]


def read_trace(path: str | os.PathLike, vocab_size: int, seed: int = 0) -> list[Request]:
    """Requests from an LLMServingSim trace, in arrival order. Prompts without `input_tok_ids`
    get random ids (seeded). Any bad line is refused with its line number and field."""
    rng = np.random.default_rng(seed)
    requests = []
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--trace {path}: cannot read it ({e})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--trace {path} line {number}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{where}: invalid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object")
        for name in TRACE_FIELDS:
            value = obj.get(name)
            if value is None:
                raise ValueError(f"{where}: missing {name!r}")
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{where}: {name}={value!r} is not an integer")
            if value < (0 if name == "arrival_time_ns" else 1):
                raise ValueError(f"{where}: {name}={value} is out of range")
        ids = obj.get("input_tok_ids")
        if ids is None:
            ids = rng.integers(0, vocab_size, size=obj["input_toks"]).tolist()
        elif (
            not isinstance(ids, list)
            or len(ids) != obj["input_toks"]
            or not all(isinstance(t, int) and 0 <= t < vocab_size for t in ids)
        ):
            raise ValueError(
                f"{where}: input_tok_ids must be {obj['input_toks']} token ids in [0, {vocab_size})"
            )
        requests.append(Request(ids, obj["output_toks"], obj["arrival_time_ns"] / 1e9))
    if not requests:
        raise ValueError(f"--trace {path}: no requests")
    return sorted(requests, key=lambda r: r.arrival)


def preset_path(name: str | os.PathLike) -> Path:
    """configs/NAME.json, or NAME itself when it is a path to a .json file."""
    path = Path(name)
    if not path.suffix == ".json":
        path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ValueError(f"preset {str(name)!r} not found ({path}); known presets: {known}")
    return path


def preset_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A checkpoint dir with random weights for configs/NAME.json, written on first use."""
    path = preset_path(name)
    text = path.read_text()
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    root = Path(cache_dir or os.environ.get("JAXPP_CACHE_DIR") or DEFAULT_CACHE)
    out = root / f"{path.stem}-{digest}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    _write_random_checkpoint(json.loads(text), out)
    return out


def _write_random_checkpoint(raw: dict, out: Path, shard_bytes: float = 4e9) -> None:
    """Random weights for `raw` as sharded safetensors that transformers and jaxpp both load:
    normal(0, initializer_range) matrices, unit norms, zero biases. The tensors are drawn on the
    GPU when torch has one (an 8B model in about 25 s instead of minutes through transformers'
    own init and save_pretrained); the model itself is built on the meta device, for its names."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    config = transformers.AutoConfig.for_model(raw["model_type"]).__class__.from_dict(raw)
    dtype = getattr(torch, raw.get("dtype") or raw.get("torch_dtype") or "float32")
    with torch.device("meta"):
        model = getattr(transformers, raw["architectures"][0])(config)
    # named_parameters lists a tied weight once, under the name transformers saves it as.
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    del model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(0)
    std = raw.get("initializer_range", 0.02)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    weight_map, shard, size, total = {}, {}, 0, 0

    def flush() -> None:
        nonlocal shard, size
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(tmp / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=dtype)
        elif name.endswith(".bias"):
            t = torch.zeros(shape, dtype=dtype)
        else:
            t = torch.randn(shape, device=device, generator=generator) * std
            t = t.to(dtype).cpu()
        shard[name] = t
        size += t.numel() * t.element_size()
        total += t.numel() * t.element_size()
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp / "config.json").write_text(json.dumps(raw, indent=2))
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


def greedy_params(r: Request):
    from jaxpp.config import SamplingParams  # noqa: PLC0415

    return SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True)


@dataclasses.dataclass
class PassResult:
    duration: float
    outputs: list  # RequestOutput per request, in request order
    latencies: list[dict]  # per request: ttft, tpot, e2e seconds, measured from its arrival
    stats: dict  # the ring's counters over the pass (scheduler.RunStats.as_dict)
    intervals: list[dict]
    compilations: int
    compiled: list[str]
    device_idle_s: float


def run_pass(
    llm, requests: list[Request], log_interval: float = 5.0, log: Callable = print
) -> PassResult:
    """Admit each request at its arrival time and step the engine until every one is done,
    logging an interval line every `log_interval` seconds."""
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival)
    outputs: list = [None] * len(requests)
    latencies: list = [None] * len(requests)
    owner: dict[str, int] = {}
    llm.scheduler.reset_stats()
    idle_before = llm.device_idle_s
    intervals: list[dict] = []
    with CompileCounter() as counter:
        start = time.perf_counter()
        mark = {"t": start, "calls": 0, "tokens": 0, "prompt_tokens": 0}
        added = 0
        while added < len(order) or llm.has_unfinished_requests():
            now = time.perf_counter()
            while added < len(order) and start + requests[order[added]].arrival <= now:
                i = order[added]
                owner[llm.add_request(requests[i].prompt, greedy_params(requests[i]))] = i
                added += 1
            if not llm.has_unfinished_requests():
                time.sleep(max(0.0, start + requests[order[added]].arrival - now))
                continue
            for out in llm.step():
                i = owner.pop(out.request_id)
                outputs[i] = out
                m = out.metrics
                latencies[i] = latency(
                    start + requests[i].arrival,
                    m.first_token_time,
                    m.finished_time,
                    len(out.outputs[0].token_ids),
                )
            if time.perf_counter() - mark["t"] >= log_interval:
                intervals.append(_interval(llm, start, mark, log))
        duration = time.perf_counter() - start
    intervals.append(_interval(llm, start, mark, log))
    return PassResult(
        duration,
        outputs,
        latencies,
        llm.scheduler.stats.as_dict(),
        intervals,
        counter.count,
        counter.names,
        llm.device_idle_s - idle_before,
    )


def latency(arrival: float, first_token: float, finished: float, tokens: int) -> dict:
    """TTFT, TPOT and end-to-end seconds of one request, measured from its arrival."""
    return {
        "ttft": first_token - arrival,
        "tpot": (finished - first_token) / (tokens - 1) if tokens > 1 else None,
        "e2e": finished - arrival,
    }


def _interval(llm, start: float, mark: dict, log: Callable) -> dict:
    """One line of LLMServingSim's log: calls so far, requests decoding, prompt and decode
    token rates over the interval, the fullest device's memory."""
    now = time.perf_counter()
    stats = llm.scheduler.stats
    span = max(now - mark["t"], 1e-9)
    memory = max(d["params"] + d["kv_cache"] for d in llm.device_memory())
    line = {
        "t": now - start,
        "step": stats.calls,
        "batch": llm.scheduler.decoding,
        "queue": len(llm.scheduler.waiting),
        "prompt_t": (stats.prompt_tokens - mark["prompt_tokens"]) / span,
        "decode_t": (stats.tokens - mark["tokens"]) / span,
        "npu_mem": memory / 1e9,
    }
    mark.update(t=now, calls=stats.calls, tokens=stats.tokens, prompt_tokens=stats.prompt_tokens)
    log(format_interval(line))
    return line


def format_interval(line: dict) -> str:
    """An interval record as LLMServingSim prints it (plus the queue length)."""
    return (
        f"[{line['t']:7.1f}s] step={line['step']} batch={line['batch']} "
        f"prompt_t={line['prompt_t']:.1f} tok/s decode_t={line['decode_t']:.1f} tok/s "
        f"npu_mem={line['npu_mem']:.2f} GB queue={line['queue']}"
    )


def percentiles(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    a = np.asarray(values, np.float64)
    return {
        "mean": float(a.mean()),
        "p50": float(np.percentile(a, 50)),
        "p99": float(np.percentile(a, 99)),
    }


def serving_figures(
    requests: int, input_tokens: int, output_tokens: int, duration: float, latencies: list[dict]
) -> dict:
    """Throughput and latency percentiles of a run: what `jaxpp bench` and the modelled
    replay of `jaxpp plan` both report."""
    d = duration
    return {
        "duration_s": d,
        "requests_per_s": requests / d,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "input_tokens_per_s": input_tokens / d,
        "output_tokens_per_s": output_tokens / d,
        "total_tokens_per_s": (input_tokens + output_tokens) / d,
        "ttft_s": percentiles([x["ttft"] for x in latencies]),
        "tpot_s": percentiles([x["tpot"] for x in latencies]),
        "e2e_s": percentiles([x["e2e"] for x in latencies]),
    }


def summarize(requests: list[Request], result: PassResult) -> dict:
    stats = result.stats
    d = result.duration
    return {
        **serving_figures(
            len(requests),
            sum(len(r.prompt) for r in requests),
            sum(len(o.outputs[0].token_ids) for o in result.outputs),
            d,
            result.latencies,
        ),
        "tick_s": d / stats["ticks"] if stats["ticks"] else None,
        "occupancy": stats["occupancy"],
        "queued_occupancy": stats["queued_occupancy"],
        "bubble_fraction": stats["bubble_fraction"],
        "device_idle_fraction": result.device_idle_s / d,
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


def decode_bandwidth(llm, requests: list[Request], result: PassResult) -> dict:
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
        for r, o in zip(requests, result.outputs, strict=True)
    )
    kv = kv_read * nums["kv_elems_per_token"] * dtype_bytes / devices / llm.dp
    per_tick = weights + kv / ticks
    tick_s = result.duration / ticks
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


def ensure_cpu_devices(needed: int) -> None:
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
    for name in ("input_len", "output_len", "num_prompts", "repeats", "prefill_chunk"):
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
    ensure_cpu_devices(args.pp * args.tp * args.dp)
    import jax  # noqa: PLC0415

    from jaxpp.config import ModelConfig  # noqa: PLC0415
    from jaxpp.engine import LLM  # noqa: PLC0415

    log = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))
    try:
        model_dir = Path(args.model) if args.model else preset_dir(args.preset, args.cache_dir)
        cfg = ModelConfig.from_dir(model_dir)
        if args.trace:
            requests = read_trace(args.trace, cfg.vocab_size, args.seed)
        else:
            requests = random_requests(
                args.num_prompts,
                args.input_len,
                args.output_len,
                args.range_ratio,
                cfg.vocab_size,
                args.seed,
                args.request_rate,
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
            max_num_seqs=args.batch_size,
            prefill_chunk=args.prefill_chunk,
            decode_chunk=args.decode_chunk,
            seed=args.seed,
        )
        load_s = time.perf_counter() - t
        longest = max(len(r.prompt) for r in requests)
        if longest > llm.max_model_len:
            raise ValueError(
                f"a prompt has {longest} tokens, more than max_model_len={llm.max_model_len}: "
                "lower --input-len/--range-ratio or raise --max-model-len"
            )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype_name = jax.numpy.dtype(llm.dtype).name
    log(
        f"model {model_dir} ({model_numbers(cfg)['params'] / 1e6:.1f}M params), "
        f"{len(requests)} requests, devices {jax.devices()[0].platform} x{len(jax.devices())}"
    )
    log(
        f"loaded in {load_s:.1f}s: pp={llm.pp} tp={llm.tp} dp={llm.dp} "
        f"microbatches={llm.microbatches} slots={llm.max_num_seqs} "
        f"chunk={llm.prefill_chunk} dtype={dtype_name}"
    )
    t = time.perf_counter()
    with CompileCounter() as counter:
        llm.warm_up(greedy_params(requests[0]))
    warm_s = time.perf_counter() - t
    log(
        f"warm-up: {llm.compiled_programs} step programs, {counter.count} compilations, "
        f"{warm_s:.1f}s"
    )

    hf = None
    hf_batch = args.batch_size or 32
    batches = [requests[i : i + hf_batch] for i in range(0, len(requests), hf_batch)]
    if args.compare_hf:
        hf = HFRunner(model_dir, dtype_name, args.hf_attn, args.hf_device, args.torch_threads)
        hf.generate_batch([dataclasses.replace(requests[0], output_len=2)])  # warm-up
        log(f"transformers loaded: attn={args.hf_attn} device={hf.device} batch={hf_batch}")
    # Timed passes; with --compare-hf they alternate with the transformers passes, so that
    # both engines see the same machine load (the fastest pass of each is reported).
    results, hf_runs = [], []
    for i in range(args.repeats):
        results.append(run_pass(llm, requests, args.log_interval, log))
        log(f"jaxpp pass {i + 1}/{args.repeats}: {results[-1].duration:.2f}s")
        if hf is not None:
            hf_runs.append(hf.run_pass(batches))
            log(f"transformers pass {i + 1}/{args.repeats}: {hf_runs[-1][0]:.2f}s")
    best = min(results, key=lambda r: r.duration)
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
            "slots": llm.max_num_seqs,
            "prefill_chunk": llm.prefill_chunk,
            "decode_chunk": llm.decode_chunk,
            "max_model_len": llm.max_model_len,
        },
        "num_prompts": len(requests),
        "load_s": load_s,
        "warmup_s": warm_s,
        "warmup_compilations": counter.count,
        "step_programs": llm.compiled_programs,
        "compilations_timed": sum(r.compilations for r in results),
        "compiled_timed": sorted(set(n for r in results for n in r.compiled)),
        "repeats": [r.duration for r in results],
        **summarize(requests, best),
        "pipeline": {k: v for k, v in best.stats.items() if k != "schedule"},
        "intervals": best.intervals,
        "device_memory": llm.device_memory(),
        "decode_bandwidth": decode_bandwidth(llm, requests, best),
    }
    peak = peak_flops(dtype_name, args.peak_tflops)
    flops = prefill_flops(cfg, [len(r.prompt) for r in requests])
    report["prefill"] = {
        "flops": flops,
        # Over the whole pass: a prefill figure for runs of one-token outputs.
        "flops_per_s": flops / best.duration,
        "peak_flops_per_s": peak,
        "mfu": flops / best.duration / peak if peak else None,
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
            "batch_size": hf_batch,
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
        f"\n==== jaxpp serving ({r['num_prompts']} requests, {lay['slots']} slots,"
        f" pp={lay['pp']} tp={lay['tp']} dp={lay['dp']} M={lay['microbatches']}"
        f" chunk={lay['prefill_chunk']} {lay['dtype']}) ===="
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
    for key, name in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "E2E ")):
        s = r[key]
        print(f"{name} ms mean/p50/p99  {_ms(s['mean'])} / {_ms(s['p50'])} / {_ms(s['p99'])}")
    p = r["pipeline"]
    queued = p["queued_occupancy"]
    print(
        f"ring: {p['calls']} calls, {p['ticks']} ticks ({_ms(r['tick_s'])} ms each), bubble "
        f"{p['bubble_fraction']:.3f}, occupancy {p['occupancy']:.3f}"
        + ("" if queued is None else f" ({queued:.3f} while requests queued)")
    )
    print(f"device idle between calls <= {100 * r['device_idle_fraction']:.2f}% of the run")
    print(
        f"step programs {r['step_programs']}; XLA compilations: warm-up "
        f"{r['warmup_compilations']}, timed {r['compilations_timed']}"
    )
    for m in r["device_memory"]:
        print(
            f"device {m['device']}: params {m['params'] / 2**20:.1f} MiB, "
            f"KV cache {m['kv_cache'] / 2**20:.1f} MiB"
        )
    bw = r.get("decode_bandwidth") or {}
    if bw:
        line = (
            f"per tick: {bw['bytes_per_tick_per_device'] / 2**20:.1f} MiB/device read -> "
            f"{bw['bytes_per_s_per_device'] / 1e9:.1f} GB/s per device"
        )
        if "fraction_of_copy" in bw:
            line += (
                f" = {100 * bw['fraction_of_copy']:.0f}% of copy bandwidth "
                f"{r['copy_bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s"
            )
        print(line)
    pf = r["prefill"]
    line = f"prefill FLOPs over the pass: {pf['flops_per_s'] / 1e12:.3f} TFLOP/s"
    if pf["mfu"] is not None:
        line += f", MFU {100 * pf['mfu']:.1f}% of {pf['peak_flops_per_s'] / 1e12:.0f} TFLOP/s"
    print(line)
    if "hf" in r:
        h = r["hf"]
        print(
            f"---- {h['engine']} ({h['dtype']}, attn={h['attn_implementation']}, "
            f"{h['device']}, {h['torch_threads']} threads, batch {h['batch_size']}) ----"
        )
        print(f"duration               {h['duration_s']:.3f} s")
        print(f"output tokens/s        {h['output_tokens_per_s']:.1f}")
        print(f"same greedy tokens     {100 * h['same_tokens_fraction']:.0f}% of requests")
        print(f"ratio jaxpp/transformers output tokens/s: {r['ratio_output_tokens_per_s']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
