"""The human-readable report of `jaxpp bench` (the --json object holds the same figures)."""

from __future__ import annotations

import numpy as np


def jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    return str(x)


def _ms(x):
    return "n/a" if x is None else f"{1e3 * x:.2f}"


def print_report(r: dict) -> None:
    lay = r["layout"]
    print(
        f"\n==== jaxpp serving ({r['num_prompts']} requests, {lay['max_num_seqs']} rows,"
        f" pp={lay['pp']} tp={lay['tp']} dp={lay['dp']} M={lay['microbatches']}"
        f" budget={lay['max_num_batched_tokens']} pages={lay['kv_pages']}x{lay['block_size']}"
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
    print(
        f"peak running {p['peak_running']}, KV pages peak {p['kv_blocks_peak']} of "
        f"{p['kv_blocks_total']}, preemptions {p['preemptions']}, prompt tokens "
        f"{p['prompt_tokens']}, {p['tokens_per_busy_stage_tick']:.1f} tokens per busy stage-tick"
    )
    print(
        f"prefix cache: {p['prefix_cache_hit_tokens']} of {p['prompt_tokens']} prompt tokens found "
        f"({p['prefix_cache_hit_rate']:.1%}), {p['prefix_cache_evictions']} pages evicted"
    )
    spec = p.get("spec_decode")
    if spec is not None:
        print(
            f"speculative decoding: {spec['num_draft_tokens']} drafts verified, "
            f"{spec['num_accepted_tokens']} accepted ({spec['acceptance_rate']:.1%}), "
            f"{spec['mean_acceptance_length']:.2f} tokens per verified row, "
            f"{spec['draft_tokens_per_tick']:.1f} drafts per tick"
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
