"""Where the ring's tick spends its time: a serving pass under JAX's profiler, the step programs'
operations summed by what they compute.

    JAX_NUM_CPU_DEVICES=P python scripts/profile_tick.py --preset llama-32m --pp P \
        --input-len 264 --output-len 132 --range-ratio 0.94 --num-prompts 256 --batch-size 32

compiles every program (`LLM.warmup`), serves the workload, and traces `--calls` calls from
the middle of the run under `jax.profiler` (a whole run overflows the profiler's buffer), then
prints per category the milliseconds per tick of those calls (the operations' own time,
loops' bodies excluded from the loops, over all XLA threads) and its share. Each operation of
the optimized HLO is put in a category by the innermost `jax.named_scope` in its name (the
tick's phases are scoped in the programs), else by its JAX primitive ("unscoped:...").
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import re
import sys
import tempfile
import time

CONTAINER = re.compile(r"(while|call|conditional)\b")  # operations that run other operations
# Scope names (jax.named_scope in the programs) -> category, innermost first.
SCOPES = (
    "attend_decode", "attend_prompt", "write_kv", "qkv", "o_proj", "mlp", "norm", "embed",
    "lm_head", "sample", "ring", "entry", "grammar", "verify", "propose",
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama-32m")
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--input-len", type=int, default=264)
    p.add_argument("--output-len", type=int, default=132)
    p.add_argument("--range-ratio", type=float, default=0.94)
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calls", type=int, default=40, help="calls traced, from the middle")
    p.add_argument("--trace-dir", default=None, help="keep the profiler's trace here")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_NUM_CPU_DEVICES", str(args.pp))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import jax  # noqa: PLC0415

    from jaxpp.bench.workloads import preset_dir, random_requests  # noqa: PLC0415
    from jaxpp.config import ModelConfig  # noqa: PLC0415
    from jaxpp.engine import LLM  # noqa: PLC0415

    model_dir = preset_dir(args.preset)
    vocab = ModelConfig.from_dir(model_dir).vocab_size
    lengths = (args.input_len, args.output_len, args.range_ratio, vocab, args.seed)
    requests = random_requests(args.num_prompts, *lengths, math.inf)
    llm = LLM(model_dir, dtype=args.dtype, pp=args.pp, max_num_seqs=args.batch_size)
    llm.warmup()
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="jaxpp-profile-")
    window = _serve(llm, requests, args.calls, trace_dir, jax)
    ticks = window["ticks"]
    categories = categorize(llm, trace_dir)
    total = sum(categories.values())
    report = {
        "ticks": ticks,
        "duration_s": window["seconds"],
        "tick_ms": 1e3 * window["seconds"] / ticks,
        "output_tok_s": window["tokens"] / window["seconds"],
        "op_ms_per_tick": {k: v / 1e3 / ticks for k, v in categories.most_common()},
        "op_share": {k: v / total for k, v in categories.most_common()},
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(
        f"{ticks} ticks in {window['seconds']:.1f} s: {report['tick_ms']:.1f} ms per tick, "
        f"{report['output_tok_s']:.1f} output tok/s; operations' own time per tick:"
    )
    for name, ms in report["op_ms_per_tick"].items():
        print(f"  {name:<16} {ms:8.2f} ms  {100 * report['op_share'][name]:5.1f}%")
    return 0


def _serve(llm, requests, calls: int, trace_dir: str, jax) -> dict:
    """Serve `requests` (all at once), tracing `calls` calls from the middle of the run;
    returns the traced window's ticks, seconds and tokens."""
    from jaxpp.bench.serving import greedy_params  # noqa: PLC0415

    for r in requests:
        llm.add_request(r.prompt, greedy_params(r))
    llm.scheduler.reset_stats()
    stats = llm.scheduler.stats
    total = sum(r.output_len for r in requests)
    window: dict = {}
    while llm.has_unfinished_requests():
        if not window and stats.tokens >= total // 3:  # a third of the way in
            jax.profiler.start_trace(trace_dir)
            window = {"calls": stats.calls, "ticks": stats.ticks, "tokens": stats.tokens,
                      "start": time.perf_counter()}  # fmt: skip
        llm.step()
        if window and "seconds" not in window and stats.calls - window["calls"] >= calls:
            jax.profiler.stop_trace()
            window = {
                "ticks": stats.ticks - window["ticks"],
                "tokens": stats.tokens - window["tokens"],
                "seconds": time.perf_counter() - window["start"],
            }
    return window


def categorize(llm, trace_dir: str) -> collections.Counter:
    """Microseconds of the programs' operations per category, from the trace."""
    where = _operation_categories(llm)
    times: collections.Counter = collections.Counter()
    for path in glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True):
        events = json.load(gzip.open(path))["traceEvents"]
        for operation, own in _own_times(events):
            times[where.get(operation, "other")] += own
    return times


def _own_times(events: list[dict]):
    """((program, operation), microseconds) of every XLA thunk event but loops and calls,
    whose bodies are events of their own (on whichever thread ran them)."""
    for e in events:
        a = e.get("args", {})
        if e.get("ph") == "X" and "hlo_op" in a and not CONTAINER.match(a["hlo_op"]):
            yield (a["hlo_module"], a["hlo_op"]), e["dur"]


def _operation_categories(llm) -> dict[tuple[str, str], str]:
    """(program, operation) -> category, read off every step program's optimized HLO."""
    found: dict[tuple[str, str], str] = {}
    for text in llm.programs.optimized_hlo():
        module = re.match(r"HloModule ([\w.\-]+)", text).group(1)
        for line in text.splitlines():
            m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*op_name=\"([^\"]*)\"", line)
            if m:
                found[module, m.group(1)] = _category(m.group(2))
    return found


def _category(op_name: str) -> str:
    """The innermost scope of SCOPES in the operation's name, else its JAX primitive."""
    parts = op_name.split("/")
    for part in reversed(parts):
        if part in SCOPES:
            return part
    return "unscoped:" + parts[-1]


if __name__ == "__main__":
    sys.exit(main())
