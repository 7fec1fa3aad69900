"""Serving benchmark: requests arrive (all at once, at a Poisson rate, or from a trace) and flow
through the continuous-batching ring; optionally transformers `generate` on the same model and
prompts in the same process, for a ratio.

Requests are greedy with `ignore_eos`, so each produces exactly its requested number of tokens:
random prompts (token ids drawn uniformly from the vocabulary, seeded; vLLM's random dataset)
or the lines of a trace in LLMServingSim's format (`--trace FILE.jsonl`: one request per line,
`{"input_toks": 512, "output_toks": 128, "arrival_time_ns": 0}`, optional `input_tok_ids`).
A warm-up compiles every program greedy traffic can meet (`LLM.warmup`: a forward program per
token bucket, the sampler's), so that no timed pass compiles. Then the timed pass admits each
request at its arrival time and prints an interval log in LLMServingSim's manner (`npu_mem` is
the parameters plus the KV pages in use on the fullest device), then:

- duration, requests/s, input/output/total tokens/s;
- TTFT, TPOT and end-to-end latency (mean, p50, p99), measured from each request's arrival;
- the most sequences decoding at once (`peak_running`), KV pages in all and at the peak,
  preemptions, prompt tokens computed, the mean tokens per busy stage-tick, row occupancy and
  the measured bubble fraction of the ring;
- the device's idle time between ring calls (an upper bound polled by the host), the step
  programs compiled and the XLA compilations during the timed pass;
- per-device memory, decode bandwidth and prefill FLOP/s.

    jaxpp bench --preset llama-32m --input-len 264 --output-len 132 --range-ratio 0.94 \\
        --num-prompts 256 --batch-size 32 --dtype float32 --compare-hf
    jaxpp bench --model path/to/hf-dir --pp 4 --trace requests.jsonl --json

`--preset NAME` reads configs/NAME.json (or any path to a config.json-like file) and writes a
randomly initialised checkpoint for it once (sharded safetensors, drawn on the GPU when torch
has one) into `~/.cache/jaxpp/presets/NAME-<hash>` (`--cache-dir` or `$JAXPP_CACHE_DIR` to move
it). No tokenizer is needed: prompts are token ids.

`--batch-size N` is what each engine may hold at once: jaxpp's sequences (max_num_seqs)
and transformers' batch (requests in arrival order, left padded, with an attention mask; its
default attention, sdpa). `--measure-bandwidth` times a large device copy and reports decode
bandwidth against it; prefill FLOP/s is reported with MFU when the peak is known
(`--peak-tflops`, or an H100/H200 in bf16).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from jaxpp.bench.figures import (
    decode_bandwidth,
    measure_bandwidth,
    model_numbers,
    peak_flops,
    prefill_flops,
)
from jaxpp.bench.hf import HFRunner
from jaxpp.bench.report import jsonable, print_report
from jaxpp.bench.serving import (
    CompileCounter,
    PassResult,
    format_interval,
    greedy_params,
    latency,
    prompt_rates,
    run_pass,
    serving_figures,
    summarize,
)
from jaxpp.bench.workloads import (
    Request,
    code_requests,
    multi_turn_requests,
    need_torch,
    preset_dir,
    preset_path,
    random_requests,
    read_trace,
    shared_prefix_requests,
)

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
    p.add_argument(
        "--shared-prefix-len",
        type=int,
        default=0,
        help="random requests start with one of --num-prefixes common prefixes of this many "
        "tokens (default 0: none)",
    )
    p.add_argument("--num-prefixes", type=int, default=1, help="common prefixes to draw from")
    p.add_argument(
        "--workload",
        choices=["random", "code", "retype"],
        default="random",
        help="random token ids (default); code: continue --input-len tokens of one of the "
        "package's Python files; retype: a function of the package, then the same function "
        "renamed (inputs that speculative decoding's prompt lookup finds again; these two "
        "need the model's tokenizer)",
    )
    p.add_argument(
        "--multi-turn",
        type=int,
        default=0,
        metavar="TURNS",
        help="--num-prompts conversations of TURNS turns: each turn's prompt is the previous "
        "prompt + its answer + a new question of --input-len tokens (default 0: off)",
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
    p.add_argument(
        "--quantization",
        choices=["fp8"],
        default=None,
        help="fp8: quantize the checkpoint's linear weights to FP8 on load (docs/fp8.md)",
    )
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument(
        "--speculative-config",
        metavar="JSON",
        default=None,
        help='speculative decoding (vLLM\'s keys): \'{"method": "ngram", '
        '"num_speculative_tokens": 3}\'; jaxpp only (docs/pipeline.md)',
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="tokens a micro-batch carries per tick (default: the engine's)",
    )
    p.add_argument("--block-size", type=int, default=None, help="positions per KV page")
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV pages of cached prompt prefixes (default: on; the cache is emptied "
        "before each timed pass)",
    )
    p.add_argument(
        "--kv-cache-memory", type=int, default=None, help="KV page pool per device, bytes"
    )
    p.add_argument(
        "--scale-lengths",
        type=float,
        default=1.0,
        help="multiply a trace's prompt and output lengths by this (e.g. 0.25)",
    )
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
    client = p.add_argument_group(
        "as a client of a running server (jaxpp/bench/client.py; --model/--preset give only "
        "the vocabulary for the prompts)"
    )
    client.add_argument(
        "--base-url",
        default=None,
        metavar="URL",
        help="send the requests to this OpenAI-compatible server (e.g. http://127.0.0.1:8000) "
        "instead of running the engine here",
    )
    client.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        metavar="N",
        help="requests in flight at most (default: no limit)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxpp.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(parser)
    return run(parser.parse_args(argv))


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


def _requests(args: argparse.Namespace, vocab_size: int, model_dir: Path) -> list[Request]:
    lengths = (args.input_len, args.output_len, args.range_ratio, vocab_size, args.seed)
    if args.workload != "random":
        from jaxpp.engine import load_tokenizer  # noqa: PLC0415

        tokenizer = load_tokenizer(model_dir)
        if tokenizer is None:
            raise ValueError(f"--workload {args.workload} needs a tokenizer in {model_dir}")
        return code_requests(args.num_prompts, args.input_len, args.output_len, tokenizer,
                             args.seed, retype=args.workload == "retype")  # fmt: skip
    if args.trace:
        return read_trace(args.trace, vocab_size, args.seed, args.scale_lengths)
    if args.multi_turn:
        return multi_turn_requests(args.num_prompts, args.multi_turn, *lengths)
    if args.shared_prefix_len:
        return shared_prefix_requests(
            args.num_prompts, args.shared_prefix_len, args.num_prefixes, *lengths,
            args.request_rate,
        )  # fmt: skip
    return random_requests(args.num_prompts, *lengths, args.request_rate)


def _run_client(args: argparse.Namespace, requests: list[Request], vocab: int, log) -> int:
    """--base-url: the same requests sent to a running server (jaxpp/bench/client.py)."""
    from jaxpp.bench.client import print_client_report, run_client  # noqa: PLC0415

    if args.multi_turn or args.compare_hf:
        raise ValueError("--base-url sends requests to a server: not with --multi-turn or "
                         "--compare-hf")  # fmt: skip
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency={args.max_concurrency} is invalid: expected >= 1")
    # Other token ids, the same lengths: the server compiles the same shapes and caches none
    # of the timed prompts' pages.
    warm_up = [dataclasses.replace(r, prompt=[(t + 1) % vocab for t in r.prompt]) for r in requests]
    try:
        report = run_client(args.base_url, requests, warm_up, args.max_concurrency, log)
    except (OSError, RuntimeError) as e:
        print(f"error: {args.base_url}: {e}", file=sys.stderr)
        return 1
    report.update(date=time.strftime("%Y-%m-%d"), commit=_git_commit(), base_url=args.base_url)
    if args.json:
        print(json.dumps(report, default=jsonable))
    else:
        print_client_report(report)
    return 0


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
    try:
        if args.compare_hf:  # before anything loads
            need_torch("--compare-hf runs transformers' generate")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ensure_cpu_devices(args.pp * args.tp * args.dp)
    import jax  # noqa: PLC0415

    from jaxpp.cli.flags import engine_config  # noqa: PLC0415
    from jaxpp.config import ModelConfig  # noqa: PLC0415
    from jaxpp.engine import LLM  # noqa: PLC0415

    log = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))
    try:
        model_dir = Path(args.model) if args.model else preset_dir(args.preset, args.cache_dir)
        cfg = ModelConfig.from_dir(model_dir)
        requests = _requests(args, cfg.vocab_size, model_dir)
        if args.base_url is not None:
            return _run_client(args, requests, cfg.vocab_size, log)
        t = time.perf_counter()
        llm = LLM(model_dir, engine_config(args, max_num_seqs=args.batch_size))
        if args.multi_turn and args.compare_hf:
            raise ValueError("--compare-hf runs static batches: not with --multi-turn")
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
        f"microbatches={llm.microbatches} max_num_seqs={llm.max_num_seqs} "
        f"budget={llm.max_num_batched_tokens} pages={llm.kv_pages}x{llm.block_size} "
        f"dtype={dtype_name}"
    )
    t = time.perf_counter()
    with CompileCounter() as counter:
        llm.warmup(log)
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
            "max_num_seqs": llm.max_num_seqs,
            "max_num_batched_tokens": llm.max_num_batched_tokens,
            "block_size": llm.block_size,
            "enable_prefix_caching": llm.enable_prefix_caching,
            "kv_pages": llm.kv_pages,
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
        **summarize(best),
        "pipeline": {k: v for k, v in best.stats.items() if not k.endswith("schedule")},
        "intervals": best.intervals,
        "device_memory": llm.device_memory(),
        "decode_bandwidth": decode_bandwidth(llm, best),
    }
    peak = peak_flops(dtype_name, args.peak_tflops)
    flops = prefill_flops(cfg, [len(r.prompt) for r in best.requests])
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
        print(json.dumps(report, default=jsonable))
    else:
        print_report(report)
    return 0


__all__ = [
    "CompileCounter",
    "PassResult",
    "Request",
    "add_parser",
    "ensure_cpu_devices",
    "format_interval",
    "greedy_params",
    "latency",
    "main",
    "preset_dir",
    "preset_path",
    "prompt_rates",
    "random_requests",
    "read_trace",
    "run",
    "run_pass",
    "serving_figures",
]
