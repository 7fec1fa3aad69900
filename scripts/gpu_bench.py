"""The GPU table of docs/performance.md, measured in ONE process on one H100/H200 (about 5
minutes, checkpoint included): jaxpp and transformers `generate` (sdpa, bf16) on the same random
Llama-3.1-8B-shape checkpoint, the same prompts, the same GPU.

Rows (greedy, ignore_eos, all requests at t=0):
    decode_b1        1 x 128 prompt tokens -> 256 new
    decode_b64      64 x 128 -> 256
    decode_b256    256 x 128 -> 128
    long_8x3968      8 x 3,968 -> 128 (TTFT, then the decode tick)
    prefill_1x2048   1 x 2,048 -> 1  (TFLOP/s and MFU of the pass)
    prefill_4x2048   4 x 2,048 -> 1
    serving_1000     1,000 requests of ShareGPT-like lengths (prompts 860 +-50%, outputs 650
                     +-50%) all at once: output tok/s against the 16,000 bar (no transformers
                     run: SGLang 16,215 and vLLM 12,553 published on one H100)
    decode_b64_pp2   decode_b64 at pp=2, where the machine has two GPUs (skipped otherwise)
    decode_b1_fp8, decode_b64_fp8            decode_b1 / decode_b64 with the weights quantized
    decode_b1_fp8_w8a8, decode_b64_fp8_w8a8  to FP8 on load (docs/fp8.md): W8A16 (weights
                     dequantized in the matmul), then W8A8 (FP8 x FP8 GEMMs); against the bf16
                     row (speed-up, same tokens), not against transformers
    float32          logits of the demo model in float32 against transformers float32 (eager)
    attention        one layer's paged attention alone, the XLA path against the Pallas kernel
                     (paged_kernel.py) on the rows' shapes: which backend wins where

--attention {auto,xla,pallas} sets JAXPP_ATTENTION for the engine rows (auto: the kernel on a GPU).

Decode rows report the whole run's tick and the steady decode tick (calls during which no prompt
token rode the ring), the bytes one steady tick must read (weights + live KV) and their rate
against a device-to-device copy measured here. After decode_b64 a profiler trace of a few steady
decode calls is summarised by kernel (where the tick goes).

Usage (from the project root; writes OUT/gpu_bench.json after every row, prints the table last):
    python scripts/gpu_bench.py --out OUT [--preset llama-3.1-8b] [--peak-tflops 989]
    python scripts/gpu_bench.py --small --out /tmp/gb     # CPU dry run on llama-32m
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# JAX and PyTorch share the GPU: JAX must not take 75% of it. Half of an H200 holds the 16 GB of
# weights and a KV page pool of 90% of what they leave; transformers gets the rest.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxpp  # noqa: E402
from jaxpp.bench import (  # noqa: E402
    HFRunner,
    Request,
    greedy_params,
    measure_bandwidth,
    model_numbers,
    peak_flops,
    prefill_flops,
    preset_dir,
    random_requests,
    run_pass,
    summarize,
)

# name: (engine, requests, prompt tokens, new tokens); --small shrinks them for a CPU dry run.
ROWS = {
    "decode_b1": ("short", 1, 128, 256),
    "decode_b64": ("short", 64, 128, 256),
    "decode_b256": ("short", 256, 128, 128),
    "long_8x3968": ("long", 8, 3968, 128),
    "prefill_1x2048": ("long", 1, 2048, 1),
    "prefill_4x2048": ("long", 4, 2048, 1),
    "serving_1000": ("serve", 1000, 860, 650),
    "decode_b64_pp2": ("short_pp2", 64, 128, 256),
    "decode_b1_fp8": ("short_fp8", 1, 128, 256),
    "decode_b64_fp8": ("short_fp8", 64, 128, 256),
    "decode_b1_fp8_w8a8": ("short_fp8_w8a8", 1, 128, 256),
    "decode_b64_fp8_w8a8": ("short_fp8_w8a8", 64, 128, 256),
}
SMALL_ROWS = {
    "decode_b1": ("short", 1, 16, 8),
    "decode_b64": ("short", 8, 16, 8),
    "decode_b256": ("short", 16, 16, 8),
    "long_8x3968": ("long", 2, 200, 4),
    "prefill_1x2048": ("long", 1, 256, 1),
    "prefill_4x2048": ("long", 2, 256, 1),
    "serving_1000": ("serve", 24, 32, 16),
    "decode_b64_pp2": ("short_pp2", 8, 16, 8),
    "decode_b1_fp8": ("short_fp8", 1, 16, 8),
    "decode_b64_fp8": ("short_fp8", 8, 16, 8),
    "decode_b1_fp8_w8a8": ("short_fp8_w8a8", 1, 16, 8),
    "decode_b64_fp8_w8a8": ("short_fp8_w8a8", 8, 16, 8),
}
# FP8 rows -> the bf16 row they are measured against (same requests, same engine shape).
FP8_ROWS = {
    "decode_b1_fp8": "decode_b1",
    "decode_b64_fp8": "decode_b64",
    "decode_b1_fp8_w8a8": "decode_b1",
    "decode_b64_fp8_w8a8": "decode_b64",
}
SPREAD = {"serving_1000": 0.5}  # length spread of a row's requests (range ratio); else 0
NO_TRANSFORMERS = {"serving_1000", *FP8_ROWS}  # rows against published figures or bf16
SERVING_BAR = 16_000  # output tok/s of serving_1000 to clear on one H200
ENGINES = {
    "short": dict(max_num_seqs=256, max_model_len=512, max_num_batched_tokens=8192),
    "long": dict(max_num_seqs=8, max_model_len=4096 + 128, max_num_batched_tokens=8192),
    "serve": dict(max_num_seqs=512, max_model_len=2304, max_num_batched_tokens=8192),
    "short_pp2": dict(max_num_seqs=256, max_model_len=512, max_num_batched_tokens=8192, pp=2),
}
SMALL_ENGINES = {
    "short": dict(max_num_seqs=16, max_model_len=64, max_num_batched_tokens=64),
    "long": dict(max_num_seqs=2, max_model_len=512, max_num_batched_tokens=256),
    "serve": dict(max_num_seqs=16, max_model_len=128, max_num_batched_tokens=128),
    "short_pp2": dict(max_num_seqs=16, max_model_len=64, max_num_batched_tokens=64, pp=2),
}
# "gemm": JAXPP_FP8_GEMM while the engine's programs compile (fp8.py reads it when tracing).
for table in (ENGINES, SMALL_ENGINES):
    table["short_fp8"] = dict(table["short"], quantization="fp8", gemm="w8a16")
    table["short_fp8_w8a8"] = dict(table["short"], quantization="fp8", gemm="w8a8")


def log(*a) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s]", *a, flush=True)


T0 = time.perf_counter()


def steady_decode(llm, requests: list[Request]) -> dict:
    """Serve `requests` once, timing the calls during which no prompt token rode the ring. A call's
    log is read one step() after its dispatch, so the gap between two step() returns is one
    call's device time once the ring is steady."""
    for r in requests:
        llm.add_request(r.prompt, greedy_params(r))
    stats = llm.scheduler.stats
    marks = []
    while llm.has_unfinished_requests():
        llm.step()
        marks.append((time.perf_counter(), stats.ticks, stats.prompt_tokens))
    seconds = ticks = 0
    for (t0, k0, c0), (t1, k1, c1) in zip(marks, marks[1:], strict=False):
        if c1 == c0 and k1 > k0:
            seconds, ticks = seconds + t1 - t0, ticks + k1 - k0
    return {"tick_s": seconds / ticks if ticks else None, "ticks": ticks}


def decode_bytes(llm, batch: int, mean_position: float) -> float:
    """Bytes one steady decode tick reads: every weight of the layers and the LM head once (an
    FP8 weight 1 byte per parameter, plus its scales), and the live KV of `batch` rows at
    their mean position."""
    from flax import nnx  # noqa: PLC0415

    skip = () if llm.config.tie_word_embeddings else ("embed",)  # a lookup reads one row
    weights = sum(v.get_value().nbytes for k, v in nnx.to_flat_state(llm.state) if k[0] not in skip)
    nums = model_numbers(llm.config)
    return (
        weights + batch * mean_position * nums["kv_elems_per_token"] * np.dtype(llm.dtype).itemsize
    )


def against_bf16(row: dict, bf16: dict, tokens: dict, name: str) -> dict:
    """An FP8 row against its bf16 row: output tok/s and steady tick ratios, and the share of
    requests whose greedy tokens are the same."""
    ticks = (bf16.get("steady") or {}).get("tick_s"), (row.get("steady") or {}).get("tick_s")
    ours, theirs = tokens[name], tokens[FP8_ROWS[name]]
    return {
        "speedup": row["jaxpp"]["output_tokens_per_s"] / bf16["jaxpp"]["output_tokens_per_s"],
        "steady_tick_speedup": ticks[0] / ticks[1] if all(ticks) else None,
        "same_tokens": sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(ours),
    }


def profile_decode(llm, requests: list[Request], out: Path, calls: int = 6) -> list[dict]:
    """A profiler trace of `calls` steady decode calls, summarised by device op (top 25)."""
    ids = [llm.add_request(r.prompt, greedy_params(r)) for r in requests]
    stats = llm.scheduler.stats
    quiet = 0
    while quiet < 3:  # three calls in a row without prompt tokens: every prompt is in
        before = stats.prompt_tokens
        llm.step()
        quiet = quiet + 1 if stats.prompt_tokens == before else 0
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(calls):
                llm.step()
            jax.effects_barrier()
        traces = list(Path(tmp).rglob("perfetto_trace.json.gz"))
        if not traces:
            return []
        if traces[0].stat().st_size < 15 * 2**20:
            (out / "decode_trace.json.gz").write_bytes(traces[0].read_bytes())
        events = json.loads(gzip.decompress(traces[0].read_bytes()))
    for i in ids:
        llm.abort_request(i)
    while llm.has_unfinished_requests():
        llm.step()
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    names = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    device = {pid for pid, name in names.items() if "GPU" in name or "gpu" in name}
    totals: dict[str, float] = {}
    for e in events:
        if e.get("ph") == "X" and (e.get("pid") in device or not device):
            totals[e["name"]] = totals.get(e["name"], 0.0) + e.get("dur", 0.0)
    whole = sum(totals.values()) or 1.0
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:25]
    return [{"op": k, "us_per_call": v / calls, "share": v / whole} for k, v in top]


# name: (query groups, queries per group, context positions, all groups of one sequence)
ATTENTION_SHAPES = {
    "decode_b1_ctx384": (1, 1, 384, False),
    "decode_b64_ctx384": (64, 1, 384, False),
    "decode_b256_ctx256": (256, 1, 256, False),
    "decode_b8_ctx4096": (8, 1, 4096, False),
    "prompt_1x2048": (128, 16, 2048, True),
}
SMALL_ATTENTION_SHAPES = {"decode_b8_ctx64": (8, 1, 64, False), "prompt_1x64": (4, 16, 64, True)}


def attention_rows(shapes: dict, heads: int, kv_heads: int, head_dim: int, dtype) -> dict:
    """Time `attention.paged_attention` under each backend on random pools and tables: per
    shape the ms of one call (median of 20) and the faster backend."""
    import jax.numpy as jnp  # noqa: PLC0415

    from jaxpp import attention  # noqa: PLC0415

    block = 16
    rows = {}
    for name, (groups, queries, context, one_sequence) in shapes.items():
        rng = np.random.default_rng(0)
        per_seq = context // block
        sequences = 1 if one_sequence else groups
        pages = sequences * per_seq + 1
        tables = rng.permutation(pages)[: sequences * per_seq].reshape(sequences, per_seq)
        seq = np.zeros(groups, np.int32) if one_sequence else np.arange(groups, dtype=np.int32)
        if one_sequence:  # a prompt: group g holds positions [16 g, 16 g + 16)
            q_pos = np.arange(groups * queries, dtype=np.int32).reshape(groups, queries)
        else:  # decode rows at the end of their context
            q_pos = np.full((groups, 1), context - 1, np.int32)
        kind = "prompt" if queries > 1 else "decode"
        key = jax.random.key(1)
        q = jax.random.normal(key, (groups, queries, heads, head_dim), dtype)
        k_pool = jax.random.normal(key, (pages, kv_heads, head_dim, block), dtype)
        v_pool = jax.random.normal(key, (pages, kv_heads, block, head_dim), dtype)
        args = (q, jnp.asarray(q_pos), jnp.asarray(seq), k_pool, v_pool, jnp.asarray(tables))
        row = {}
        for backend in ("xla", "pallas"):
            os.environ["JAXPP_ATTENTION"] = backend
            f = jax.jit(lambda *a, k=kind: attention.paged_attention(*a, jnp.int32(0), kind=k))
            try:
                f(*args).block_until_ready()
                times = []
                for _ in range(20):
                    t = time.perf_counter()
                    f(*args).block_until_ready()
                    times.append(time.perf_counter() - t)
                row[f"{backend}_ms"] = 1e3 * float(np.median(times))
            except Exception as e:  # a kernel that does not compile loses its column only
                row[f"{backend}_error"] = repr(e)[:300]
        timed = [b for b in ("xla", "pallas") if f"{b}_ms" in row]
        row["faster"] = min(timed, key=lambda b: row[f"{b}_ms"]) if timed else None
        rows[name] = row
        log(f"attention {name}: {row}")
    os.environ.pop("JAXPP_ATTENTION")
    return rows


def float32_parity(hf_device: str) -> dict:
    """The demo model in float32: jaxpp logits against transformers float32 eager logits."""
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    ids = list(range(3, 67))
    llm = jaxpp.LLM(jaxpp.DEMO_MODEL, dtype="float32", max_num_seqs=4, max_model_len=256)
    ours = llm.logits([ids])[0]
    del llm
    model = AutoModelForCausalLM.from_pretrained(
        str(jaxpp.DEMO_MODEL), dtype=torch.float32, attn_implementation="eager"
    ).to(hf_device)
    with torch.inference_mode():
        ref = model(torch.tensor([ids], device=hf_device)).logits[0].float().cpu().numpy()
    return {"relative_max_diff": float(np.abs(ours - ref).max() / np.abs(ref).max())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu-bench"))
    p.add_argument("--preset", default=None, help="default llama-3.1-8b (llama-32m with --small)")
    p.add_argument("--small", action="store_true", help="CPU dry run: small model and lengths")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--rows", default=None, help="comma-separated subset of the rows")
    p.add_argument("--no-float32", action="store_true", help="skip the float32 parity row")
    p.add_argument("--attention", choices=("auto", "xla", "pallas"), default="auto")
    p.add_argument("--no-attention-row", action="store_true", help="skip the attention row")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = SMALL_ROWS if args.small else ROWS
    engines = SMALL_ENGINES if args.small else ENGINES
    if args.rows:
        rows = {k: rows[k] for k in args.rows.split(",")}
    preset = args.preset or ("llama-32m" if args.small else "llama-3.1-8b")
    import torch  # noqa: PLC0415

    hf_device = "cuda" if torch.cuda.is_available() else "cpu"
    report: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "jax": jax.__version__,
        "device_kind": jax.devices()[0].device_kind,
        "torch": torch.__version__,
        "attention_backend": args.attention,
        "rows": {},
    }

    def save() -> None:
        (out / "gpu_bench.json").write_text(json.dumps(report, indent=1, default=str))

    t = time.perf_counter()
    ckpt = preset_dir(preset, os.environ.get("JAXPP_CACHE_DIR", "/tmp/jaxpp-presets"))
    report["checkpoint_s"] = time.perf_counter() - t
    log(f"checkpoint {ckpt} in {report['checkpoint_s']:.1f}s")
    report["copy"] = measure_bandwidth(64 if args.small else 2048)
    log(f"copy {report['copy']['bytes_per_s'] / 1e9:.0f} GB/s")
    if not args.no_float32:
        report["float32"] = float32_parity(hf_device)
        log(f"float32 logits vs transformers: {report['float32']['relative_max_diff']:.2e}")
    if not args.no_attention_row:
        shape = json.loads((Path(ckpt) / "config.json").read_text())
        heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
        head_dim = shape.get("head_dim") or shape["hidden_size"] // heads
        report["attention"] = attention_rows(
            SMALL_ATTENTION_SHAPES if args.small else ATTENTION_SHAPES,
            heads, kv_heads, head_dim, "float32" if args.small else "bfloat16",
        )  # fmt: skip
    save()
    os.environ["JAXPP_ATTENTION"] = args.attention

    t = time.perf_counter()
    hf = HFRunner(ckpt, "bfloat16", "sdpa", hf_device)
    report["hf_load_s"] = time.perf_counter() - t
    peak = peak_flops("bfloat16", args.peak_tflops)
    llm, engine_name = None, None
    tokens: dict[str, list] = {}  # row -> jaxpp's tokens (FP8 rows compare with bf16's)
    for name, (engine, n, prompt, new) in rows.items():
        if engines[engine].get("pp", 1) > len(jax.devices()):
            log(f"{name}: skipped, {len(jax.devices())} device(s) here")
            continue
        if engine != engine_name:
            del llm
            gc.collect()
            jax.clear_caches()
            t = time.perf_counter()
            kwargs = dict(engines[engine])
            os.environ["JAXPP_FP8_GEMM"] = kwargs.pop("gemm", "auto")
            llm = jaxpp.LLM(ckpt, dtype="bfloat16", **kwargs)
            engine_name = engine
            report[f"load_{engine}_s"] = time.perf_counter() - t
            log(f"jaxpp {engine} engine loaded in {report[f'load_{engine}_s']:.1f}s")
        spread = SPREAD.get(name, 0.0)
        requests = random_requests(
            n, prompt, new, spread, llm.config.vocab_size, seed=n + prompt
        )  # fmt: skip
        row: dict = {"requests": n, "prompt": prompt, "new": new, "spread": spread}
        t = time.perf_counter()
        # A long row warms on a tenth of its requests (the same lengths): its programs.
        warm = run_pass(llm, requests[: max(64, n // 10)], 1e9, lambda *a: None)
        row["warm_s"], row["warm_compilations"] = time.perf_counter() - t, warm.compilations
        best = min(
            (run_pass(llm, requests, 1e9, lambda *a: None) for _ in range(1 if n >= 1000 else 2)),
            key=lambda r: r.duration,
        )
        row["jaxpp"] = summarize(best)
        row["jaxpp"]["compilations_timed"] = best.compilations
        row["jaxpp"]["ticks"] = best.stats["ticks"]
        row["jaxpp"]["calls"] = best.stats["calls"]
        jaxpp_tokens = [list(o.outputs[0].token_ids) for o in best.outputs]
        tokens[name] = jaxpp_tokens
        if name == "serving_1000":
            row["of_bar"] = row["jaxpp"]["output_tokens_per_s"] / SERVING_BAR
        elif new > 1:
            steady = steady_decode(llm, requests)
            moved = decode_bytes(llm, n, prompt + new / 2)
            steady["bytes"] = moved
            if steady["tick_s"]:
                steady["bytes_per_s"] = moved / steady["tick_s"]
                steady["of_copy"] = steady["bytes_per_s"] / report["copy"]["bytes_per_s"]
                steady["copy_bound_s"] = moved / report["copy"]["bytes_per_s"]
            row["steady"] = steady
        else:
            flops = prefill_flops(llm.config, [len(r.prompt) for r in requests])
            row["prefill"] = {
                "flops_per_s": flops / best.duration,
                "mfu": flops / best.duration / peak if peak else None,
            }
        if FP8_ROWS.get(name) in report["rows"]:
            row["vs_bf16"] = against_bf16(row, report["rows"][FP8_ROWS[name]], tokens, name)
        log(
            f"{name}: jaxpp {best.duration:.3f}s, warm {row['warm_s']:.1f}s "
            f"({warm.compilations} compilations)"
        )
        save()
        if name == "decode_b64":
            try:
                row["profile"] = profile_decode(llm, requests, out)
            except Exception as e:  # a summary is a bonus: never lose the row for it
                row["profile_error"] = repr(e)
            save()
        if name in NO_TRANSFORMERS:
            report["rows"][name] = row
            save()
            continue
        hf.generate_batch([Request(requests[0].prompt, 2)])
        runs = [hf.run_pass([requests]) for _ in range(1 if n * new >= 256 * 128 else 2)]
        hf_s, hf_tokens = min(runs, key=lambda r: r[0])
        out_tokens = sum(r.output_len for r in requests)
        row["hf"] = {
            "duration_s": hf_s,
            "output_tokens_per_s": out_tokens / hf_s,
            "same_tokens": sum(a == b for a, b in zip(hf_tokens, jaxpp_tokens, strict=True)) / n,
        }
        row["ratio"] = hf_s / best.duration
        report["rows"][name] = row
        log(f"{name}: transformers {hf_s:.3f}s -> jaxpp/tf {row['ratio']:.2f}x")
        save()
    print_table(report)
    return 0


def print_table(report: dict) -> None:
    print(
        f"\n{report['device_kind']}, jax {report['jax']}, torch {report['torch']}, "
        f"copy {report['copy']['bytes_per_s'] / 1e12:.2f} TB/s"
    )
    print("| run | jaxpp | transformers | jaxpp / tf | steady tick (bytes at copy rate) |")
    print("|---|---|---|---|---|")
    for name, r in report["rows"].items():
        j = r["jaxpp"]
        if "prefill" in r:
            mfu = r["prefill"]["mfu"]
            what = f"{j['duration_s'] * 1e3:.1f} ms, {r['prefill']['flops_per_s'] / 1e12:.0f} TF/s"
            what += f" ({100 * mfu:.0f}% MFU)" if mfu else ""
            tail = ""
        elif name == "serving_1000":
            what = f"{j['output_tokens_per_s']:.0f} out tok/s, TTFT p50 {j['ttft_s']['p50']:.3f}s"
            print(f"| {name} | {what} | - | - | {100 * r['of_bar']:.0f}% of {SERVING_BAR} |")
            continue
        else:
            what = f"{j['output_tokens_per_s']:.0f} out tok/s, TTFT p50 {j['ttft_s']['p50']:.3f}s"
            s = r["steady"]
            tail = "n/a"
            if s["tick_s"]:
                tail = (
                    f"{s['tick_s'] * 1e3:.2f} ms = {100 * s['of_copy']:.0f}% of copy rate "
                    f"({s['copy_bound_s'] * 1e3:.2f} ms)"
                )
        if name in FP8_ROWS:  # against the bf16 row, not transformers
            v = r.get("vs_bf16")
            ratio = f"{v['speedup']:.2f}x, {100 * v['same_tokens']:.0f}% same tokens" if v else "-"
            print(f"| {name} | {what} | {FP8_ROWS[name]} (bf16) | {ratio} | {tail} |")
            continue
        print(
            f"| {name} | {what} | {r['hf']['output_tokens_per_s']:.0f} out tok/s | "
            f"{r['ratio']:.2f}x | {tail} |"
        )
    if "float32" in report:
        print(f"float32 logits vs transformers: {report['float32']['relative_max_diff']:.1e}")
    print(f"engine rows with JAXPP_ATTENTION={report['attention_backend']}")
    for name, r in report.get("attention", {}).items():
        cols = "  ".join(
            f"{b} {r[b + '_ms']:.3f} ms" if b + "_ms" in r else f"{b} failed"
            for b in ("xla", "pallas")
        )
        print(f"  attention {name}: {cols}  -> {r['faster']}")
    for name, r in report["rows"].items():
        for op in r.get("profile", [])[:12]:
            print(
                f"  {name} {op['us_per_call']:9.0f} us/call {100 * op['share']:5.1f}%  "
                f"{op['op'][:90]}"
            )


if __name__ == "__main__":
    sys.exit(main())
