"""`jaxpp plan`: memory and modelled speed of a layout, a trace replay, or a layout search.

    jaxpp plan --preset llama-3.1-405b --pp 16 --tp 8 --dtype bfloat16 --hardware h100-sxm
    jaxpp plan --model path/to/hf-dir --pp 4 --cluster-config cluster.json --trace t.jsonl
    jaxpp plan --preset llama-3.1-70b --search --devices 8 --hardware l4 --max-tpot-ms 200
    jaxpp plan --preset llama-3.1-70b --quantization fp8 --hardware h200   # FP8 weights

No weights are read: the model is its config.json. Memory per device is the engine's own
(jaxpp/layout.py); speed is modelled (jaxpp/costmodel.py, jaxpp/replay.py; docs/plan.md says
where the model is approximate).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from jaxpp.cli.errors import EXIT_USAGE
from jaxpp.cli.flags import add_quantization_flag, engine_config

GB = 1e9


def add_parser(subparsers) -> None:
    """Register the `plan` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser(
        "plan",
        help="memory and modelled speed of a pipeline layout, without weights or devices",
        description=__doc__.split("\n\n")[0],
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a Hugging Face model dir or its config.json")
    src.add_argument("--preset", help="name of configs/NAME.json")
    hw = p.add_mutually_exclusive_group()
    hw.add_argument(
        "--hardware",
        default=None,
        help="configs/hardware/NAME.json, a path to one, or this-cpu (default h100-sxm)",
    )
    hw.add_argument("--cluster-config", help="an LLMServingSim cluster config JSON, read as is")
    for name in ("pp", "tp", "dp"):
        p.add_argument(f"--{name}", type=int, default=None, help="default 1 (or the cluster's)")
    p.add_argument("--layer-partition", default=None, help="layers per stage, e.g. 10,10,12")
    p.add_argument("--num-microbatches", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None, help="sequence rows (default 256)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    add_quantization_flag(p)
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="tokens a micro-batch carries per tick (default: the engine's for the platform)",
    )
    p.add_argument("--block-size", type=int, default=16, help="positions per KV page")
    p.add_argument("--decode-chunk", type=int, default=16)
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the replay reuses cached prompt pages, as the engine (default: on)",
    )
    p.add_argument(
        "--memory-fraction",
        type=float,
        default=None,
        help="share of a GPU's memory JAX allocates (XLA_PYTHON_CLIENT_MEM_FRACTION; "
        "default: the profile's, 0.75 as JAX)",
    )
    p.add_argument("--input-len", type=int, default=512, help="prompt tokens of the speed table")
    p.add_argument("--output-len", type=int, default=128, help="output tokens of the speed table")
    p.add_argument(
        "--batch-sizes",
        default=None,
        help="comma-separated batch sizes of the speed table (default: 1 and the most at once)",
    )
    p.add_argument("--trace", help="replay an LLMServingSim JSONL trace")
    p.add_argument("--log-interval", type=float, default=5.0, help="modelled seconds per line")
    p.add_argument("--search", action="store_true", help="rank the layouts of --devices")
    p.add_argument("--devices", type=int, default=None, help="device count for --search")
    p.add_argument("--max-tpot-ms", type=float, default=None, help="latency bound for --search")
    p.add_argument("--top", type=int, default=5, help="layouts --search prints")
    p.add_argument("--json", action="store_true", help="print one JSON object, nothing else")
    p.set_defaults(func=run, handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except ValueError as e:
        print(f"jaxpp plan: error: {e}", file=sys.stderr)
        return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    from jaxpp.bench import ensure_cpu_devices  # noqa: PLC0415

    cluster: dict = {}
    if args.hardware == "this-cpu":
        # Two simulated devices at least, so that the probe can time a collective.
        ensure_cpu_devices(max(2, (args.dp or 1) * (args.pp or 1) * (args.tp or 1)))
    from jaxpp import planner  # noqa: PLC0415
    from jaxpp.hardware import load_hardware, read_cluster_config  # noqa: PLC0415

    if args.cluster_config:
        hardware, cluster = read_cluster_config(args.cluster_config)
    else:
        hardware = load_hardware(args.hardware or "h100-sxm")
    if args.memory_fraction is not None:
        if not 0 < args.memory_fraction <= 1:
            raise ValueError(f"--memory-fraction={args.memory_fraction} is invalid: (0, 1]")
        hardware = dataclasses.replace(hardware, memory_fraction=args.memory_fraction)
    tp = args.tp or cluster.get("tp_size", 1)
    pp = args.pp or cluster.get("pp_size", 1)
    dp = args.dp or max(1, cluster.get("num_npus", tp * pp) // (tp * pp))
    model = args.model or args.preset
    if args.search:
        devices = args.devices or cluster.get("num_npus") or dp * pp * tp
        return _search(args, planner, model, devices, hardware)
    config = engine_config(args, pp=pp, tp=tp, dp=dp)
    plan = planner.plan(model, hardware=hardware, config=config)
    batches = None if args.trace else _batch_sizes(args.batch_sizes, plan)
    report = {"plan": _memory_report(plan)}
    say = (lambda *a: None) if args.json else print
    say(_memory_text(plan, report["plan"]))
    if plan.overflow_bytes:
        say("speed: not modelled, the layout does not fit")
    elif args.trace:
        from jaxpp.bench import read_trace  # noqa: PLC0415

        requests = read_trace(args.trace, plan.layout.config.vocab_size)
        too_long = [len(r.prompt) + r.output_len for r in requests]
        if max(too_long) > plan.layout.max_model_len + 1:
            raise ValueError(
                f"--trace {args.trace}: a request needs {max(too_long)} positions, more than "
                f"max_model_len={plan.layout.max_model_len}"
            )
        say(f"\ntrace replay ({len(requests)} requests, modelled time):")
        result = plan.serve(requests, args.log_interval, say)
        report["trace"] = result.summary(requests) | {"intervals": result.intervals}
        say(_summary_text(report["trace"]))
    else:
        report["speed"] = plan.speed(batches, args.input_len, args.output_len)
        say(_speed_text(plan, report["speed"], args.input_len, args.output_len))
    if args.json:
        print(json.dumps(report, default=str))
    return 0


def _batch_sizes(spec: str | None, plan) -> list[int]:
    if spec is None:
        return sorted({1, plan.sequences_at_once(plan.layout.max_model_len)})
    try:
        sizes = [int(x) for x in spec.split(",")]
    except ValueError:
        raise ValueError(f"--batch-sizes {spec!r}: expected comma-separated integers") from None
    bad = [b for b in sizes if not 1 <= b <= plan.max_num_seqs]
    if bad:
        raise ValueError(f"--batch-sizes: {bad[0]} is not in 1 .. the {plan.max_num_seqs} rows")
    return sizes


def _memory_report(plan) -> dict:
    lay, hw = plan.layout, plan.hardware
    return {
        "model": plan.model,
        "hardware": hw.name,
        "layout": {
            "dp": lay.dp,
            "pp": lay.pp,
            "tp": lay.tp,
            "partition": list(lay.partition),
            "layer_slots_per_stage": lay.layers_per_stage,
            "microbatches": lay.microbatches,
            "dtype": str(lay.dtype.__name__ if hasattr(lay.dtype, "__name__") else lay.dtype),
            "max_num_seqs": plan.max_num_seqs,
            "max_model_len": lay.max_model_len,
            "max_num_batched_tokens": lay.token_budget,
            "block_size": lay.block_size,
            "kv_pages": plan.pages,
        },
        "device_memory": plan.device_memory(),
        "usable_bytes": plan.usable_bytes,
        "free_bytes": plan.usable_bytes - plan.params_bytes - plan.kv_bytes,
        "overflow_bytes": plan.overflow_bytes,
        "kv_capacity_tokens": plan.kv_capacity_tokens,
        "kv_budget_bytes": plan.kv_budget,
        "sequences_of_max_model_len": plan.sequences_at_once(lay.max_model_len),
    } | _fp8_report(plan)


def _fp8_report(plan) -> dict:
    """With FP8 weights: what the same layout holds with the model's float weights."""
    base = plan.unquantized
    if base is None:
        return {}
    return {
        "fp8": {
            "method": plan.layout.config.quantization.method,
            "params_bytes": plan.params_bytes,
            "unquantized_params_bytes": base.params_bytes,
            "kv_pages": plan.pages,
            "unquantized_kv_pages": base.pages,
            "unquantized_overflow_bytes": base.overflow_bytes,
        }
    }


def _memory_text(plan, r: dict) -> str:
    lay, hw, cfg = plan.layout, plan.hardware, plan.layout.config
    d = r["layout"]
    empty = lay.pp * lay.layers_per_stage - cfg.num_layers
    lines = [
        f"jaxpp plan: {plan.model} ({cfg.num_layers} layers, {d['dtype']}) on "
        f"{lay.devices} x {hw.name} ({hw.devices_per_node} per node)",
        f"layout: dp={lay.dp} pp={lay.pp} tp={lay.tp}, partition {list(lay.partition)} "
        f"({lay.layers_per_stage} layer slots per stage"
        + (f", {empty} of them empty and skipped" if empty else "")
        + f"), {lay.microbatches} micro-batches, {plan.max_num_seqs} rows, "
        f"{lay.token_budget} tokens per tick",
        "memory per device (every device holds the same shard shapes):",
        f"  params {plan.params_bytes / GB:.3f} GB, KV cache {plan.kv_bytes / GB:.3f} GB, "
        f"free {r['free_bytes'] / GB:.3f} GB of {r['usable_bytes'] / GB:.3f} GB usable "
        f"({hw.memory_bytes / GB:.1f} GB x {hw.memory_fraction:g})",
        f"  KV capacity: {plan.pages:,} pages of {lay.block_size} positions per replica = "
        f"{r['kv_capacity_tokens']:,} tokens in {r['kv_budget_bytes'] / GB:.2f} GB per device "
        f"({plan.kv_token_bytes / 1e3:.1f} kB per token per device): "
        f"{r['sequences_of_max_model_len']:,} sequences of max_model_len={lay.max_model_len} "
        "at once, more of shorter ones",
    ]
    if plan.overflow_bytes:
        lines.append(
            f"  DOES NOT FIT: device 0 (replica 0, stage 0, tensor rank 0), and every other "
            f"device alike, needs {(plan.params_bytes + plan.kv_bytes) / GB:.2f} GB: over by "
            f"{plan.overflow_bytes / GB:.2f} GB"
        )
    else:
        lines.append("  fits on every device")
    if "fp8" in r:
        f = r["fp8"]
        base = plan.unquantized
        held = (
            f"does not fit (over by {f['unquantized_overflow_bytes'] / GB:.2f} GB)"
            if f["unquantized_overflow_bytes"]
            else f"hold {f['unquantized_kv_pages']:,}"
        )
        lines.append(
            f"  FP8 weights ({f['method']}): params {f['params_bytes'] / GB:.3f} GB per device "
            f"against {f['unquantized_params_bytes'] / GB:.3f} GB in {d['dtype']}; "
            f"{plan.pages:,} KV pages, where the {d['dtype']} weights {held}"
            + (f" (+{plan.pages - base.pages:,})" if not base.overflow_bytes else "")
        )
    return "\n".join(lines)


def _speed_text(plan, rows: list[dict], input_len: int, output_len: int) -> str:
    lay = plan.layout
    lines = [
        f"\nspeed (modelled; {input_len} prompt + {output_len} output tokens per request, all "
        "arriving at once):",
        "  batch   tick ms   TPOT ms   TTFT ms   out tok/s   bubble   per tick: layers / head / "
        "transfer / collectives ms",
    ]
    for row in rows:
        split = " / ".join(f"{1e3 * v / row['ticks']:.2f}" for v in row["time_split"].values())
        lines.append(
            f"  {row['batch']:5d}  {1e3 * row['tick_s']:8.2f}  {1e3 * row['tpot_s']['mean']:8.2f}"
            f"  {1e3 * row['ttft_s']['mean']:8.1f}  {row['output_tokens_per_s']:10.1f}"
            f"   {row['bubble_fraction']:6.3f}   {split}"
        )
    chunks = -(-input_len // lay.token_budget)
    S = lay.pp
    lines.append(
        f"  prefill of one prompt: {chunks} chunks of up to {lay.token_budget} tokens ride "
        f"{chunks + S - 1} ticks, bubble (S-1)/(n+S-1) = {(S - 1) / (chunks + S - 1):.3f}; a "
        f"fresh ring fills in {S - 1} ticks"
    )
    return "\n".join(lines)


def _summary_text(s: dict) -> str:
    def ms(p):
        return " / ".join("n/a" if p[k] is None else f"{1e3 * p[k]:.1f}" for k in p)

    return "\n".join(
        [
            f"duration {s['duration_s']:.3f} s, {s['requests_per_s']:.2f} requests/s, "
            f"output {s['output_tokens_per_s']:.1f} tok/s, total {s['total_tokens_per_s']:.1f}",
            f"TTFT ms mean/p50/p99 {ms(s['ttft_s'])}",
            f"TPOT ms mean/p50/p99 {ms(s['tpot_s'])}",
            f"E2E  ms mean/p50/p99 {ms(s['e2e_s'])}",
            f"tick {1e3 * s['tick_s']:.2f} ms, bubble {s['bubble_fraction']:.3f}, "
            f"occupancy {s['occupancy']:.3f}, device idle {s['device_idle_fraction']:.3f}",
        ]
    )


def _search(args, planner, model, devices: int, hardware) -> int:
    max_tpot = args.max_tpot_ms / 1e3 if args.max_tpot_ms else None
    found = planner.search(
        model,
        devices,
        hardware=hardware,
        input_len=args.input_len,
        output_len=args.output_len,
        max_tpot=max_tpot,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        decode_chunk=args.decode_chunk,
        quantization=args.quantization,
    )
    if not found:
        raise ValueError(f"no layout of {devices} devices fits the weights of {model}")
    rows = [
        {
            "dp": c.plan.layout.dp,
            "pp": c.plan.layout.pp,
            "tp": c.plan.layout.tp,
            "microbatches": c.plan.layout.microbatches,
            "partition": list(c.plan.layout.partition),
            "rows": c.plan.max_num_seqs,
            "batch": c.batch,
            "meets_bound": c.meets_bound,
            "output_tokens_per_s": c.throughput,
            "tpot_s": c.result["tpot_s"]["mean"],
            "ttft_s": c.result["ttft_s"]["mean"],
            "bubble_fraction": c.result["bubble_fraction"],
        }
        for c in found
    ]
    why = planner.why_first(found[0], found[1]) if len(found) > 1 else "the only layout that fits"
    if args.json:
        print(json.dumps({"layouts": rows, "why": why}))
        return 0
    bound = f", mean TPOT <= {args.max_tpot_ms:g} ms" if max_tpot else ""
    print(
        f"jaxpp plan --search: {model} on {devices} x {hardware.name}, {args.input_len} prompt + "
        f"{args.output_len} output tokens{bound}; {len(found)} layouts fit"
    )
    print("  rank  dp  pp  tp    M   rows  batch  out tok/s   TPOT ms   TTFT ms  bubble  bound")
    for i, r in enumerate(rows[: args.top], 1):
        print(
            f"  {i:4d} {r['dp']:3d} {r['pp']:3d} {r['tp']:3d} {r['microbatches']:4d} "
            f"{r['rows']:6d} {r['batch']:6d} {r['output_tokens_per_s']:10.1f} "
            f"{1e3 * r['tpot_s']:9.2f} {1e3 * r['ttft_s']:9.1f}  {r['bubble_fraction']:.3f}"
            f"  {'met' if r['meets_bound'] else 'MISSED'}"
        )
    second = rows[1] if len(rows) > 1 else None
    if second:
        print(
            f"winner over dp={second['dp']} pp={second['pp']} tp={second['tp']} "
            f"M={second['microbatches']}: {why}"
        )
    return 0
